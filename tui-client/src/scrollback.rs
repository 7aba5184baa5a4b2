//! A room's scrollback: at most [`SCROLLBACK`] entries in memory, however long the client
//! runs, with the rest of the room's log read back from the server as the view reaches an
//! end of what is held.
//!
//! - Live entries are appended; past the cap the oldest are dropped, and the room notes
//!   that older messages exist ([`Older::Available`]).
//! - Scrolling up near the oldest entry held asks for a page of older messages
//!   ([`wants_older`]); they are put in front of what is held, skipping any already there,
//!   and the view stays on the same lines. If that takes the room past the cap, the newest
//!   entries are dropped instead and the room is *detached* from the live tail
//!   ([`Detached`]): live messages are then only counted, not held.
//! - Scrolling back down near the newest entry held while detached asks for the messages
//!   after it ([`wants_newer`]), and once the view has caught up with the newest message
//!   seen live the room is attached again.
//!
//! Joins, leaves, topic changes and notices are not in the server's log: those dropped at
//! either end are gone for good; messages never are.

use crate::app::{Entry, RoomView};

/// Entries a room holds in memory.
pub const SCROLLBACK: usize = 2_000;
/// Messages asked for per page of history, at most.
pub const HISTORY_PAGE: u32 = 200;

/// Messages asked for per page with a cap of `cap` entries: a quarter of it at most, so
/// that a page put in front of a full room drops only entries below the view (the view
/// is near the top when it asks, and far fewer than `cap` lines tall).
pub fn page_size(cap: usize) -> u32 {
    u32::try_from(cap / 4)
        .unwrap_or(u32::MAX)
        .clamp(1, HISTORY_PAGE)
}

/// Whether the server holds messages older than the oldest held here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Older {
    /// No: the room's log starts at the oldest message held.
    #[default]
    None,
    /// Yes, to be read when the view gets there.
    Available,
    /// Yes, and a page of them is on its way.
    Fetching,
}

/// A room whose newest held entry is not the room's newest message: the view was scrolled
/// back so far that the live tail was dropped to keep the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detached {
    /// The newest seq known to exist (seen live, or dropped).
    pub newest: u64,
    /// Whether a page of newer messages is on its way.
    pub fetching: bool,
}

/// The seq of the oldest message held.
fn oldest_seq(room: &RoomView) -> Option<u64> {
    room.entries.iter().find_map(Entry::seq)
}

/// The seq of the newest message held.
fn newest_seq(room: &RoomView) -> Option<u64> {
    room.entries.iter().rev().find_map(Entry::seq)
}

/// Forgets everything held of the room: its log started again on the server (a reset), so
/// the seqs held name nothing any more, and the new log's messages take them.
pub fn reset(room: &mut RoomView) {
    room.entries.clear();
    room.older = Older::None;
    room.detached = None;
    room.marker = None;
    room.scroll = 0;
    room.new_below = 0;
}

/// Adds a live entry (counted unread by the caller); `visible`: the room is shown.
pub fn push_live(room: &mut RoomView, entry: Entry, visible: bool, cap: usize) {
    if let Some(detached) = &mut room.detached {
        // Not held while the view is back in history; read back on the way down.
        if let Some(seq) = entry.seq() {
            detached.newest = detached.newest.max(seq);
            if visible {
                room.new_below += 1;
            }
        }
        return;
    }
    room.entries.push_back(entry);
    if visible && room.scroll > 0 {
        room.scroll += 1;
        room.new_below += 1;
    }
    drop_oldest(room, cap);
}

/// Drops the oldest entries past `cap`, keeping the read marker and the view on theirs.
fn drop_oldest(room: &mut RoomView, cap: usize) {
    let mut dropped = 0;
    while room.entries.len() > cap {
        if let Some(entry) = room.entries.pop_front()
            && entry.seq().is_some()
            && room.older == Older::None
        {
            room.older = Older::Available;
        }
        dropped += 1;
    }
    if dropped > 0 {
        room.marker = room.marker.and_then(|m| m.checked_sub(dropped));
        room.scroll = room.scroll.min(room.entries.len().saturating_sub(1));
    }
}

/// Drops the newest entries past `cap` (the view is back in history), detaching the room.
fn drop_newest(room: &mut RoomView, cap: usize) {
    while room.entries.len() > cap {
        let Some(entry) = room.entries.pop_back() else {
            break;
        };
        room.scroll = room.scroll.saturating_sub(1);
        if let Some(seq) = entry.seq() {
            let detached = room.detached.get_or_insert(Detached {
                newest: seq,
                fetching: false,
            });
            detached.newest = detached.newest.max(seq);
        }
        if room.marker.is_some_and(|m| m >= room.entries.len()) {
            room.marker = None;
        }
    }
}

/// The seq to read older messages before, when the view (`page` lines tall) is near the
/// oldest entry held and there are older messages to read; marks the page as asked for.
pub fn wants_older(room: &mut RoomView, page: usize) -> Option<u64> {
    let near_top = room.scroll + page >= room.entries.len();
    if room.older != Older::Available || !near_top {
        return None;
    }
    let before = oldest_seq(room)?;
    room.older = Older::Fetching;
    Some(before)
}

/// The seq to read newer messages after, when the room is detached and the view is within
/// `page` lines of the newest entry held; marks the page as asked for.
pub fn wants_newer(room: &mut RoomView, page: usize) -> Option<u64> {
    let detached = room.detached.as_mut()?;
    if detached.fetching || room.scroll > page {
        return None;
    }
    let after = room.entries.iter().rev().find_map(Entry::seq)?;
    detached.fetching = true;
    Some(after)
}

/// Puts a page of older messages (oldest first) in front of what is held; `more`: the
/// log goes on before them.
pub fn older_page(room: &mut RoomView, page: Vec<Entry>, more: bool, cap: usize) {
    let before = oldest_seq(room).unwrap_or(u64::MAX);
    let page: Vec<Entry> = page
        .into_iter()
        .filter(|entry| entry.seq().is_some_and(|seq| seq < before))
        .collect();
    let added = page.len();
    for entry in page.into_iter().rev() {
        room.entries.push_front(entry);
    }
    room.marker = room.marker.map(|m| m + added);
    room.older = if more { Older::Available } else { Older::None };
    drop_newest(room, cap);
}

/// Adds a page of newer messages (oldest first) after what is held; `more`: the log goes
/// on after them. The room is attached again once it holds the newest message known.
pub fn newer_page(room: &mut RoomView, page: Vec<Entry>, more: bool, cap: usize) {
    let Some(detached) = room.detached else {
        return;
    };
    let after = newest_seq(room).unwrap_or(0);
    for entry in page {
        if entry.seq().is_some_and(|seq| seq > after) {
            room.entries.push_back(entry);
            // Below the view, which stays where it is.
            if room.scroll > 0 {
                room.scroll += 1;
            }
        }
    }
    let held = newest_seq(room).unwrap_or(0);
    room.detached = (more || held < detached.newest).then_some(Detached {
        newest: detached.newest,
        fetching: false,
    });
    if room.detached.is_none() {
        room.new_below = room.new_below.min(room.scroll);
    }
    drop_oldest(room, cap);
}

/// A page that will not come (the request failed): it may be asked for again.
pub fn page_failed(room: &mut RoomView) {
    if room.older == Older::Fetching {
        room.older = Older::Available;
    }
    if let Some(detached) = &mut room.detached {
        detached.fetching = false;
    }
}

#[cfg(test)]
mod tests {
    use confab::{ChatMessage, ChatMessageRecord, ConversationEvent, HistoryDirection};

    use super::*;
    use crate::{
        app::{
            App, Effect,
            tests::{app, joined, message},
        },
        event::Event,
    };

    /// The server's log of room `lobby`: messages 1..=n.
    fn server_log(n: u64) -> Vec<ChatMessage> {
        (1..=n).map(log_message).collect()
    }

    /// Answers every history effect from `log`, as the server would, until none is left;
    /// returns how many pages were read.
    fn serve(app: &mut App, mut effects: Vec<Effect>, log: &[ChatMessage]) -> usize {
        let mut pages = 0;
        while let Some(effect) = effects.pop() {
            let Effect::History {
                room,
                direction,
                seq,
                limit,
            } = effect
            else {
                continue;
            };
            pages += 1;
            let (messages, more): (Vec<ChatMessage>, bool) = match direction {
                HistoryDirection::Older => {
                    let before: Vec<_> = log.iter().filter(|m| m.seq < seq).cloned().collect();
                    let start = before.len().saturating_sub(limit as usize);
                    (before[start..].to_vec(), start > 0)
                }
                HistoryDirection::Newer => {
                    let after: Vec<_> = log.iter().filter(|m| m.seq > seq).cloned().collect();
                    let end = after.len().min(limit as usize);
                    (after[..end].to_vec(), end < after.len())
                }
            };
            effects.extend(app.update(Event::Net(ConversationEvent::History {
                room,
                direction,
                messages,
                more,
            })));
        }
        pages
    }

    fn held(app: &App) -> Vec<u64> {
        app.rooms[0].entries.iter().filter_map(Entry::seq).collect()
    }

    fn page_up(app: &mut App) -> Vec<Effect> {
        app.update(Event::Key(crossterm::event::KeyEvent::new(
            crossterm::event::KeyCode::PageUp,
            crossterm::event::KeyModifiers::NONE,
        )))
    }

    fn page_down(app: &mut App) -> Vec<Effect> {
        app.update(Event::Key(crossterm::event::KeyEvent::new(
            crossterm::event::KeyCode::PageDown,
            crossterm::event::KeyModifiers::NONE,
        )))
    }

    #[test]
    fn a_flood_of_20000_keeps_the_room_at_its_cap() {
        let mut app = app();
        app.update(joined("lobby", &["alice"], ""));
        for seq in 1..=20_000 {
            app.update(message("lobby", seq, "bob", "flood", 0));
            assert!(app.rooms[0].entries.len() <= SCROLLBACK);
        }
        assert_eq!(app.rooms[0].entries.len(), SCROLLBACK);
        assert_eq!(held(&app), (18_001..=20_000).collect::<Vec<_>>());
        assert_eq!(app.rooms[0].older, Older::Available);
    }

    #[test]
    fn scrolling_back_past_the_cap_reads_older_pages_in_order_without_duplicates() {
        let log = server_log(1_000);
        let mut app = app();
        app.scrollback = 300;
        app.update(joined("lobby", &["alice"], ""));
        for m in &log[500..] {
            app.update(message("lobby", m.seq, "bob", &m.text, 0));
        }
        assert_eq!(held(&app), (701..=1_000).collect::<Vec<_>>());

        // All the way up: every message from 1 is read back, in order, once; the cap
        // holds throughout, and the view never jumps more than a page.
        let mut pages = 0;
        let mut bottom = u64::MAX;
        for _ in 0..1_000 {
            let effects = page_up(&mut app);
            pages += serve(&mut app, effects, &log);
            let room = &app.rooms[0];
            assert!(room.entries.len() <= 300);
            let shown = room.entries[room.entries.len() - 1 - room.scroll]
                .seq()
                .unwrap();
            assert!(
                bottom == u64::MAX || bottom - shown <= 8,
                "the view jumped from {bottom} to {shown}"
            );
            bottom = shown;
        }
        let seqs = held(&app);
        assert_eq!(seqs.first(), Some(&1), "reached the start");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert!(pages >= 4, "{pages} pages");
        assert_eq!(app.rooms[0].older, Older::None);
        assert!(app.rooms[0].detached.is_some(), "the live tail was let go");

        // Live messages meanwhile are counted, not held.
        let log = server_log(1_005);
        for m in &log[1_000..] {
            app.update(message("lobby", m.seq, "bob", &m.text, 0));
        }
        assert!(held(&app).iter().all(|seq| *seq < 1_001));

        // All the way down again: back to the live tail, including what came meanwhile.
        for _ in 0..1_000 {
            let effects = page_down(&mut app);
            serve(&mut app, effects, &log);
            assert!(app.rooms[0].entries.len() <= 300);
        }
        assert!(app.rooms[0].detached.is_none(), "attached again");
        let seqs = held(&app);
        assert_eq!(seqs.last(), Some(&1_005));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        app.update(message("lobby", 1_006, "bob", "live again", 0));
        assert_eq!(held(&app).last(), Some(&1_006));
    }

    fn log_message(seq: u64) -> ChatMessage {
        ChatMessage::new(ChatMessageRecord {
            room: "lobby".into(),
            seq,
            sender: "bob".into(),
            text: format!("m{seq}"),
            kind: 1,
            client_msg_id: format!("id{seq}"),
            sent_at: None,
        })
    }

    #[test]
    fn a_page_that_overlaps_what_is_held_adds_nothing_twice() {
        let mut app = app();
        app.update(joined("lobby", &["alice"], ""));
        for seq in 10..=20 {
            app.update(message("lobby", seq, "bob", "x", 0));
        }
        let room = &mut app.rooms[0];
        let page = (5..=12)
            .map(|seq| Entry::message(&log_message(seq)))
            .collect();
        older_page(room, page, true, 100);
        assert_eq!(held(&app), (5..=20).collect::<Vec<_>>());
    }
}
