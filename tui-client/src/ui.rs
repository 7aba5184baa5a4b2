//! Rendering: `impl Widget for &App`. It only reads the state; [`cursor`] says where the
//! terminal cursor goes.
//!
//! ```text
//!  lobby  rust(3)                                  tabs, with unread counts
//!  #lobby — say hi                                 topic
//!  12:04 <alice> hello                 │ members   messages │ members
//!  ── new ──                           │ alice
//!  12:05 * bob waves                   │ bob
//!  alice is typing…                                typing notices, or a hint
//!  ● connected · rtt 0.4 ms            you         status bar
//!  > hi al_                                        input
//! ```

use std::time::{Duration, SystemTime};

use chrono::{DateTime, FixedOffset, NaiveDate};
use confab::ConnectionState;
use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Layout, Position, Rect},
    style::{Color, Style, Stylize},
    text::{Line, Span},
    widgets::{Block, Borders, Paragraph, Widget},
};
use unicode_width::UnicodeWidthChar;

use crate::app::{App, Entry, RoomView};

/// Width of the member list, when the terminal is wide enough for one.
const MEMBERS_WIDTH: u16 = 20;
/// Width of the `12:34 ` timestamp column.
const TIME_WIDTH: usize = 6;

/// Colours a nickname may get; the same nickname always gets the same one.
const NICK_COLOURS: [Color; 12] = [
    Color::Red,
    Color::Green,
    Color::Yellow,
    Color::Blue,
    Color::Magenta,
    Color::Cyan,
    Color::LightRed,
    Color::LightGreen,
    Color::LightYellow,
    Color::LightBlue,
    Color::LightMagenta,
    Color::LightCyan,
];

/// A stable colour for `nick` (FNV-1a of its bytes).
pub fn nick_colour(nick: &str) -> Color {
    let hash = nick.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    NICK_COLOURS[(hash % NICK_COLOURS.len() as u64) as usize]
}

struct Areas {
    tabs: Rect,
    topic: Rect,
    messages: Rect,
    members: Option<Rect>,
    notice: Rect,
    status: Rect,
    input: Rect,
}

fn areas(area: Rect) -> Areas {
    let [tabs, topic, body, notice, status, input] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    let (messages, members) = if body.width >= MEMBERS_WIDTH * 3 {
        let [messages, members] =
            Layout::horizontal([Constraint::Fill(1), Constraint::Length(MEMBERS_WIDTH)])
                .areas(body);
        (messages, Some(members))
    } else {
        (body, None)
    };
    Areas {
        tabs,
        topic,
        messages,
        members,
        notice,
        status,
        input,
    }
}

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let areas = areas(area);
        tabs(self).render(areas.tabs, buf);
        topic(self).render(areas.topic, buf);
        if let Some(room) = self.active_room() {
            messages(self, room, areas.messages, buf);
            if let Some(members_area) = areas.members {
                members(self, room, members_area, buf);
            }
        } else {
            Paragraph::new("You are in no room. Type /join ROOM, or /help.")
                .dim()
                .render(areas.messages, buf);
        }
        notice(self).render(areas.notice, buf);
        status(self, areas.status.width).render(areas.status, buf);
        input_line(self, areas.input.width).render(areas.input, buf);
    }
}

/// Where the terminal cursor goes: in the input line, at the editing position.
pub fn cursor(app: &App, area: Rect) -> Position {
    let input = areas(area).input;
    let (_, column) = input_window(app, input.width);
    Position::new(input.x + column, input.y)
}

fn tabs(app: &App) -> Line<'static> {
    let mut spans = Vec::new();
    for (index, room) in app.rooms.iter().enumerate() {
        let label = if room.unread > 0 {
            format!(" {}({}) ", room.name, room.unread)
        } else {
            format!(" {} ", room.name)
        };
        let style = if index == app.active {
            Style::new().reversed().bold()
        } else if room.unread > 0 {
            Style::new().bold()
        } else {
            Style::new().dim()
        };
        spans.push(Span::styled(label, style));
    }
    Line::from(spans)
}

fn topic(app: &App) -> Line<'static> {
    let Some(room) = app.active_room() else {
        return Line::default();
    };
    let topic = if room.topic.is_empty() {
        Span::styled("(no topic)", Style::new().dim())
    } else {
        Span::raw(room.topic.clone())
    };
    Line::from(vec![
        Span::styled(format!("#{} — ", room.name), Style::new().bold()),
        topic,
    ])
    .style(Style::new().bg(Color::DarkGray))
}

fn local(app: &App, at: SystemTime) -> DateTime<FixedOffset> {
    DateTime::<chrono::Utc>::from(at).with_timezone(&app.offset)
}

fn day_separator(date: NaiveDate, width: usize) -> Line<'static> {
    let label = format!(" {} ", date.format("%A %-d %B %Y"));
    let side = width.saturating_sub(label.chars().count()) / 2;
    Line::styled(
        format!("{}{label}{}", "─".repeat(side), "─".repeat(side)),
        Style::new().dim(),
    )
}

fn read_marker(width: usize) -> Line<'static> {
    let label = " new ";
    let side = width.saturating_sub(label.len()) / 2;
    Line::styled(
        format!("{}{label}{}", "─".repeat(side), "─".repeat(side)),
        Style::new().fg(Color::Red),
    )
}

/// The lines of one entry, wrapped to `width`, continuation lines indented.
fn entry_lines(app: &App, entry: &Entry, width: usize) -> Vec<Line<'static>> {
    let time = entry
        .at()
        .map(|at| local(app, at).format("%H:%M ").to_string())
        .unwrap_or_else(|| " ".repeat(TIME_WIDTH));
    let mut spans = vec![(time, Style::new().dim())];
    match entry {
        Entry::Message {
            from,
            text,
            action: false,
            ..
        } => {
            let mut nick = Style::new().fg(nick_colour(from));
            if *from == app.nickname {
                nick = nick.bold();
            }
            spans.push(("<".into(), Style::new().dim()));
            spans.push((from.clone(), nick));
            spans.push(("> ".into(), Style::new().dim()));
            spans.push((text.clone(), Style::new()));
        }
        Entry::Message {
            from,
            text,
            action: true,
            ..
        } => {
            spans.push(("* ".into(), Style::new().italic()));
            spans.push((from.clone(), Style::new().fg(nick_colour(from)).italic()));
            spans.push((format!(" {text}"), Style::new().italic()));
        }
        Entry::Presence { user, joined, .. } => {
            let (arrow, verb) = if *joined {
                ("→ ", "joined")
            } else {
                ("← ", "left")
            };
            spans.push((arrow.into(), Style::new().dim()));
            spans.push((user.clone(), Style::new().fg(nick_colour(user)).dim()));
            spans.push((format!(" {verb}"), Style::new().dim()));
        }
        Entry::Renamed { from, to, .. } => {
            spans.push(("↔ ".into(), Style::new().dim()));
            spans.push((from.clone(), Style::new().fg(nick_colour(from)).dim()));
            spans.push((" is now known as ".into(), Style::new().dim()));
            spans.push((to.clone(), Style::new().fg(nick_colour(to))));
        }
        Entry::Topic { by, topic, .. } => {
            spans.push(("✎ ".into(), Style::new().dim()));
            spans.push((by.clone(), Style::new().fg(nick_colour(by))));
            let what = if topic.is_empty() {
                " cleared the topic".to_owned()
            } else {
                format!(" set the topic: {topic}")
            };
            spans.push((what, Style::new().dim()));
        }
        Entry::Info(text) => spans.push((format!("-- {text}"), Style::new().fg(Color::Cyan))),
        Entry::Error(text) => spans.push((format!("!! {text}"), Style::new().fg(Color::Red))),
    }
    wrap(spans, width, TIME_WIDTH)
}

/// Wraps styled text to `width` columns, breaking at spaces where it can and at newlines
/// always; lines after the first are indented by `indent`.
fn wrap(spans: Vec<(String, Style)>, width: usize, indent: usize) -> Vec<Line<'static>> {
    let width = width.max(indent + 8);
    let mut lines = Vec::new();
    let mut line: Vec<(char, Style)> = Vec::new();
    let mut used = 0;
    let flush = |line: &mut Vec<(char, Style)>, lines: &mut Vec<Line<'static>>| {
        let mut spans: Vec<Span<'static>> = Vec::new();
        let mut run = String::new();
        let mut style = None;
        for (c, s) in line.drain(..) {
            if style.is_some_and(|st| st != s) {
                spans.push(Span::styled(
                    std::mem::take(&mut run),
                    style.unwrap_or_default(),
                ));
            }
            style = Some(s);
            run.push(c);
        }
        if !run.is_empty() {
            spans.push(Span::styled(run, style.unwrap_or_default()));
        }
        lines.push(Line::from(spans));
    };
    for (text, style) in spans {
        for c in text.chars() {
            if c == '\n' {
                flush(&mut line, &mut lines);
                line.extend(std::iter::repeat_n((' ', Style::new()), indent));
                used = indent;
                continue;
            }
            let w = c.width().unwrap_or(0);
            if used + w > width {
                // Break at the last space past the indent, if there is one.
                let cut = line
                    .iter()
                    .rposition(|(ch, _)| *ch == ' ')
                    .filter(|&at| at > indent);
                let carry: Vec<(char, Style)> = match cut {
                    Some(at) => line.split_off(at + 1),
                    None => Vec::new(),
                };
                flush(&mut line, &mut lines);
                line.extend(std::iter::repeat_n((' ', Style::new()), indent));
                line.extend(carry);
                used = line.iter().map(|(ch, _)| ch.width().unwrap_or(0)).sum();
            }
            line.push((c, style));
            used += w;
        }
    }
    flush(&mut line, &mut lines);
    lines
}

fn messages(app: &App, room: &RoomView, area: Rect, buf: &mut Buffer) {
    let width = usize::from(area.width);
    let height = usize::from(area.height);
    let end = room.entries.len().saturating_sub(room.scroll);
    // Walk back from the newest visible entry until the pane is full.
    let mut blocks: Vec<Vec<Line<'static>>> = Vec::new();
    let mut filled = 0;
    for index in (0..end).rev() {
        let entry = &room.entries[index];
        let mut lines = Vec::new();
        if let Some(at) = entry.at() {
            let date = local(app, at).date_naive();
            let previous = room.entries.range(..index).rev().find_map(Entry::at);
            if previous.is_none_or(|p| local(app, p).date_naive() != date) {
                lines.push(day_separator(date, width));
            }
        }
        if room.marker == Some(index) {
            lines.push(read_marker(width));
        }
        lines.extend(entry_lines(app, entry, width));
        filled += lines.len();
        blocks.push(lines);
        if filled >= height {
            break;
        }
    }
    let lines: Vec<Line<'static>> = blocks.into_iter().rev().flatten().collect();
    let skip = lines.len().saturating_sub(height);
    let shown: Vec<Line<'static>> = lines.into_iter().skip(skip).collect();
    // The newest line sits at the bottom, as in every chat client; space is left above.
    let used = u16::try_from(shown.len())
        .unwrap_or(area.height)
        .min(area.height);
    let bottom = Rect::new(area.x, area.bottom() - used, area.width, used);
    Paragraph::new(shown).render(bottom, buf);

    if room.new_below > 0 && area.height > 0 {
        let label = format!(" {} new ↓ ", room.new_below);
        let w = u16::try_from(label.chars().count())
            .unwrap_or(area.width)
            .min(area.width);
        let spot = Rect::new(area.right() - w, area.bottom() - 1, w, 1);
        Line::styled(label, Style::new().black().on_yellow()).render(spot, buf);
    }
}

fn members(app: &App, room: &RoomView, area: Rect, buf: &mut Buffer) {
    let block = Block::new()
        .borders(Borders::LEFT)
        .border_style(Style::new().dim())
        .title(format!(" {} here ", room.members.len()));
    let inner = block.inner(area);
    block.render(area, buf);
    let lines: Vec<Line<'static>> = room
        .members
        .iter()
        .map(|m| {
            let mut style = Style::new().fg(nick_colour(m));
            if *m == app.nickname {
                style = style.bold();
            }
            Line::styled(format!(" {m}"), style)
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

fn notice(app: &App) -> Line<'static> {
    if let Some(hint) = &app.hint {
        return Line::styled(hint.clone(), Style::new().fg(Color::Yellow));
    }
    let Some(room) = app.active_room() else {
        return Line::default();
    };
    let typists = room.typists();
    let text = match typists.as_slice() {
        [] => return Line::default(),
        [one] => format!("{one} is typing…"),
        [one, two] => format!("{one} and {two} are typing…"),
        many => format!("{} people are typing…", many.len()),
    };
    Line::styled(text, Style::new().dim().italic())
}

fn status(app: &App, width: u16) -> Line<'static> {
    let mut spans = match &app.connection {
        ConnectionState::Connected { resume_complete } => {
            let mut spans = vec![Span::styled("● connected", Style::new().fg(Color::Green))];
            if let Some(rtt) = app.rtt {
                spans.push(Span::raw(format!(" · rtt {}", format_rtt(rtt))));
            }
            if app.reconnected {
                spans.push(Span::raw(if *resume_complete {
                    " · resumed"
                } else {
                    " · resumed with gaps"
                }));
            }
            spans
        }
        ConnectionState::Connecting { attempt: 0, .. } => {
            vec![Span::styled(
                "○ connecting…",
                Style::new().fg(Color::Yellow),
            )]
        }
        ConnectionState::Connecting { attempt, server } => vec![Span::styled(
            format!("○ reconnecting to {server} (attempt {})…", attempt + 1),
            Style::new().fg(Color::Yellow),
        )],
        ConnectionState::Disconnected { reason, retry_in } => vec![Span::styled(
            format!(
                "○ disconnected: {reason} · retry in {:.1}s",
                retry_in.as_secs_f64()
            ),
            Style::new().fg(Color::Red),
        )],
        ConnectionState::Refused { login: true, .. } => vec![Span::styled(
            "✕ nickname refused · /nick NAME to try another",
            Style::new().fg(Color::Red),
        )],
        ConnectionState::Refused { login: false, .. } => vec![Span::styled(
            "✕ server refused · see the message above",
            Style::new().fg(Color::Red),
        )],
    };
    let left: usize = spans.iter().map(|s| s.content.chars().count()).sum();
    let nick = format!("{} ", app.nickname);
    let pad = usize::from(width).saturating_sub(left + nick.chars().count());
    spans.push(Span::raw(" ".repeat(pad)));
    spans.push(Span::styled(
        nick,
        Style::new().fg(nick_colour(&app.nickname)).bold(),
    ));
    Line::from(spans).style(Style::new().bg(Color::Black))
}

fn format_rtt(rtt: Duration) -> String {
    if rtt < Duration::from_millis(10) {
        format!("{:.1} ms", rtt.as_secs_f64() * 1000.0)
    } else {
        format!("{} ms", rtt.as_millis())
    }
}

/// The slice of the input shown (it scrolls sideways to keep the cursor in view), and the
/// cursor's column within the input line.
fn input_window(app: &App, width: u16) -> (String, u16) {
    let prompt = 2; // "> "
    let room = usize::from(width).saturating_sub(prompt + 1).max(1);
    let chars: Vec<char> = app
        .input
        .text()
        .chars()
        .map(|c| if c == '\n' { '↵' } else { c })
        .collect();
    let cursor = app.input.cursor();
    let start = cursor.saturating_sub(room);
    let shown: String = chars[start..].iter().take(room).collect();
    let column = prompt
        + chars[start..cursor]
            .iter()
            .map(|c| c.width().unwrap_or(0))
            .sum::<usize>();
    (shown, u16::try_from(column).unwrap_or(width))
}

fn input_line(app: &App, width: u16) -> Line<'static> {
    let (shown, _) = input_window(app, width);
    Line::from(vec![
        Span::styled("> ", Style::new().bold()),
        Span::raw(shown),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nick_always_gets_the_same_colour() {
        assert_eq!(nick_colour("alice"), nick_colour("alice"));
        let distinct: std::collections::HashSet<_> =
            ["alice", "bob", "carol", "dave", "erin", "frank"]
                .iter()
                .map(|n| nick_colour(n))
                .collect();
        assert!(distinct.len() >= 3, "colours should tell people apart");
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_indents() {
        let lines = wrap(
            vec![
                ("12:00 ".into(), Style::new()),
                ("one two three four".into(), Style::new()),
            ],
            16,
            6,
        );
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        assert_eq!(text, ["12:00 one two ", "      three four"]);
    }

    #[test]
    fn newlines_in_a_message_start_new_lines() {
        let lines = wrap(
            vec![
                ("12:00 ".into(), Style::new()),
                ("a\nb".into(), Style::new()),
            ],
            40,
            6,
        );
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        assert_eq!(text, ["12:00 a", "      b"]);
    }
}

#[cfg(test)]
mod snapshots {
    use std::time::Duration;

    use confab::ConnectionState;
    use ratatui::{Terminal, backend::TestBackend};

    use crate::{
        app::{
            App,
            tests::{app, joined, message},
        },
        event::Event,
    };

    fn render(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| frame.render_widget(app, frame.area()))
            .unwrap();
        terminal.backend().to_string()
    }

    fn conversation() -> App {
        let mut app = app();
        app.update(Event::Net(confab::ConversationEvent::Connection(
            ConnectionState::Connected {
                resume_complete: true,
            },
        )));
        app.rtt = Some(Duration::from_micros(420));
        app.update(joined("lobby", &["alice", "bob", "carol"], "say hi"));
        app.update(message("lobby", 1, "bob", "morning all", 0));
        app.update(message(
            "lobby",
            2,
            "carol",
            "hi bob, how was the trip? long enough to need two lines here",
            1,
        ));
        app.update(message("lobby", 3, "alice", "welcome back", 2));
        app
    }

    #[test]
    fn the_main_screen() {
        insta::assert_snapshot!(render(&conversation(), 72, 14));
    }

    #[test]
    fn a_narrow_terminal_drops_the_member_list() {
        insta::assert_snapshot!(render(&conversation(), 40, 12));
    }

    #[test]
    fn reconnecting_and_scrolled_up_with_new_messages_below() {
        let mut app = conversation();
        for seq in 4..=30 {
            app.update(message("lobby", seq, "bob", &format!("line {seq}"), 3));
        }
        app.update(Event::Key(crossterm::event::KeyEvent::from(
            crossterm::event::KeyCode::PageUp,
        )));
        app.update(message("lobby", 31, "carol", "you missed this", 4));
        app.update(Event::Net(confab::ConversationEvent::Connection(
            ConnectionState::Disconnected {
                reason: "transport error".into(),
                retry_in: Duration::from_millis(1500),
            },
        )));
        insta::assert_snapshot!(render(&app, 72, 14));
    }

    #[test]
    fn typing_and_a_hint() {
        let mut app = conversation();
        app.update(crate::app::tests::server(
            confab::pb::chat_response::Event::Typing(confab::pb::TypingEvent {
                room: "lobby".into(),
                user: "bob".into(),
                typing: true,
            }),
        ));
        let typing = render(&app, 72, 14);
        for c in "/nope".chars() {
            app.update(Event::Key(crossterm::event::KeyEvent::from(
                crossterm::event::KeyCode::Char(c),
            )));
        }
        app.update(Event::Key(crossterm::event::KeyEvent::from(
            crossterm::event::KeyCode::Enter,
        )));
        insta::assert_snapshot!(format!("{typing}\n{}", render(&app, 72, 14)));
    }
}
