//! [`App`]: the client's state, and [`App::update`], the one place it changes.
//!
//! `update` takes an [`Event`] and returns the [`Effect`]s it asks of the network (send a
//! message, join a room…); it does no I/O itself, so it is tested directly, and the UI
//! loop stays responsive whatever the network does.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use confab::{
    ConnectionState, ConversationEvent, HistoryDirection,
    pb::{self, PresenceKind, chat_response::Event as ServerEvent},
};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEventKind};

use crate::{
    advice,
    command::{self, COMMANDS, Command},
    event::Event,
    input::Input,
    scrollback::{self, Detached, Older},
};

/// How often typing notices are repeated while typing.
const TYPING_REFRESH: Duration = Duration::from_secs(3);
/// How long a typing notice shows without a refresh.
const TYPING_SHOWN: Duration = Duration::from_secs(6);
/// How often the round-trip time is measured.
const PING_EVERY: Duration = Duration::from_secs(2);

/// What the UI asks of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send `text` to `room`.
    Say { room: String, text: String },
    /// Send an action (`/me`) to `room`.
    Act { room: String, text: String },
    /// Join a room.
    Join(String),
    /// Leave a room.
    Leave(String),
    /// Tell `room` this user is (or stopped) typing.
    Typing { room: String, typing: bool },
    /// Set a room's topic.
    SetTopic { room: String, topic: String },
    /// List the server's rooms.
    ListRooms,
    /// Ping, carrying the send time in microseconds since the epoch.
    Ping(i64),
    /// (Owner) let `user` into `room`.
    Invite { room: String, user: String },
    /// (Owner) put `user` out of `room`.
    Kick {
        room: String,
        user: String,
        reason: String,
    },
    /// (Owner) put `user` out of `room` for good.
    Ban {
        room: String,
        user: String,
        reason: String,
    },
    /// Chat under another nickname from now on.
    Nick(String),
    /// Read up to `limit` messages of `room`'s log before or after `seq` (scrolling past
    /// what is held).
    History {
        room: String,
        direction: HistoryDirection,
        seq: u64,
        limit: u32,
    },
}

/// One line of a room's scrollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A chat message.
    Message {
        /// Its seq.
        seq: u64,
        /// When the server accepted it.
        at: SystemTime,
        /// The sender.
        from: String,
        /// The text.
        text: String,
        /// `/me` action.
        action: bool,
    },
    /// Someone changed their nickname.
    Renamed {
        /// When.
        at: SystemTime,
        /// The old nickname.
        from: String,
        /// The new one.
        to: String,
    },
    /// Someone arrived or left.
    Presence {
        /// When.
        at: SystemTime,
        /// Who.
        user: String,
        /// Arrived (true) or left.
        joined: bool,
    },
    /// The topic changed.
    Topic {
        /// When.
        at: SystemTime,
        /// Who changed it.
        by: String,
        /// The new topic.
        topic: String,
    },
    /// A notice from the client itself (help, room lists, connection news).
    Info(String),
    /// Something went wrong (a refused command, a failed request).
    Error(String),
}

impl Entry {
    /// The seq of a message (other entries are not in the room's log).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Entry::Message { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// A message of the room's log as an entry.
    pub(crate) fn message(message: &pb::ChatMessage) -> Self {
        Entry::Message {
            seq: message.seq,
            at: timestamp(message.sent_at),
            from: message.sender.clone(),
            text: message.text.clone(),
            action: message.kind() == pb::MessageKind::Action,
        }
    }

    /// When it happened, for timestamps and day separators (notices have none).
    pub fn at(&self) -> Option<SystemTime> {
        match self {
            Entry::Message { at, .. }
            | Entry::Presence { at, .. }
            | Entry::Renamed { at, .. }
            | Entry::Topic { at, .. } => Some(*at),
            Entry::Info(_) | Entry::Error(_) => None,
        }
    }
}

/// One room as the client sees it.
#[derive(Debug, Clone, Default)]
pub struct RoomView {
    /// The room name.
    pub name: String,
    /// The topic line.
    pub topic: String,
    /// Who is present.
    pub members: BTreeSet<String>,
    /// The scrollback held in memory (at most the app's cap; see `scrollback.rs`).
    pub entries: VecDeque<Entry>,
    /// Whether the server has older messages than the oldest held.
    pub older: Older,
    /// Set while the view is so far back that the live tail is not held.
    pub detached: Option<Detached>,
    /// Messages that arrived while another room was shown.
    pub unread: usize,
    /// Index of the first entry not read when the room was last shown (the read marker).
    pub marker: Option<usize>,
    /// How many entries the view is scrolled up from the bottom.
    pub scroll: usize,
    /// Entries that arrived below the view while it was scrolled up.
    pub new_below: usize,
    /// Who is typing, and when they last said so.
    pub typing: BTreeMap<String, SystemTime>,
    /// Whether the server confirmed the join.
    pub joined: bool,
}

impl RoomView {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Users typing now, in name order.
    pub fn typists(&self) -> Vec<&str> {
        self.typing.keys().map(String::as_str).collect()
    }
}

/// The whole client state.
#[derive(Debug, Clone)]
pub struct App {
    /// This user's nickname.
    pub nickname: String,
    /// Open rooms, as tabs, in the order they were joined.
    pub rooms: Vec<RoomView>,
    /// The room shown.
    pub active: usize,
    /// The line being typed.
    pub input: Input,
    /// The connection, as last reported.
    pub connection: ConnectionState,
    /// Whether the connection was ever lost (so a reconnect is news).
    pub reconnected: bool,
    /// The last measured round-trip time.
    pub rtt: Option<Duration>,
    /// A hint under the input (usage, unknown command); cleared by the next key.
    pub hint: Option<String>,
    /// The terminal's size, for paging.
    pub size: (u16, u16),
    /// The clock at the last tick.
    pub now: SystemTime,
    /// The offset from UTC that timestamps are shown in.
    pub offset: chrono::FixedOffset,
    /// When the last ping went out.
    last_ping: Option<SystemTime>,
    /// The room a typing notice was sent to, and when.
    typing_sent: Option<(String, SystemTime)>,
    /// Set by `/quit` and Ctrl-C.
    pub quit: bool,
    /// No server was named: a refused connection comes with advice on starting one.
    pub advise_on_refusal: bool,
    /// Entries each room holds in memory.
    pub scrollback: usize,
}

impl App {
    /// A client for `nickname` that is joining `rooms`, at time `now`, in a terminal of `size`.
    pub fn new(nickname: &str, rooms: &[String], now: SystemTime, size: (u16, u16)) -> Self {
        Self {
            nickname: nickname.to_owned(),
            rooms: rooms.iter().map(|r| RoomView::new(r)).collect(),
            active: 0,
            input: Input::default(),
            connection: ConnectionState::Connecting {
                attempt: 0,
                server: String::new(),
            },
            reconnected: false,
            rtt: None,
            hint: None,
            size,
            now,
            offset: chrono::FixedOffset::east_opt(0).expect("zero is a valid offset"),
            last_ping: None,
            typing_sent: None,
            quit: false,
            advise_on_refusal: false,
            scrollback: scrollback::SCROLLBACK,
        }
    }

    /// The room shown, if any.
    pub fn active_room(&self) -> Option<&RoomView> {
        self.rooms.get(self.active)
    }

    fn active_name(&self) -> Option<String> {
        self.active_room().map(|r| r.name.clone())
    }

    fn room_mut(&mut self, name: &str) -> Option<&mut RoomView> {
        self.rooms.iter_mut().find(|r| r.name == name)
    }

    /// Entries a page moves by.
    fn page(&self) -> usize {
        usize::from(self.size.1.saturating_sub(8) / 2).max(1)
    }

    /// Applies one event; returns what it asks of the network.
    pub fn update(&mut self, event: Event) -> Vec<Effect> {
        match event {
            Event::Key(key) => self.key(key),
            Event::Paste(text) => {
                // A paste is one message, newlines and all; typed Enter sends it.
                self.input
                    .insert(&text.replace("\r\n", "\n").replace('\r', "\n"));
                self.typing_started()
            }
            Event::Mouse(mouse) => match mouse.kind {
                MouseEventKind::ScrollUp => self.scroll_up(3),
                MouseEventKind::ScrollDown => self.scroll_down(3),
                _ => Vec::new(),
            },
            Event::Resize(width, height) => {
                self.size = (width, height);
                Vec::new()
            }
            Event::Net(event) => self.net(event),
            Event::Tick(now) => self.tick(now),
        }
    }

    fn key(&mut self, key: KeyEvent) -> Vec<Effect> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        if key.code != KeyCode::Tab {
            self.hint = None;
        }
        match key.code {
            KeyCode::Char('c') if ctrl => {
                self.quit = true;
                return self.typing_stopped();
            }
            KeyCode::Char('a') if ctrl => self.input.home(),
            KeyCode::Char('e') if ctrl => self.input.end(),
            KeyCode::Char('w') if ctrl => self.input.kill_word(),
            KeyCode::Char('u') if ctrl => self.input.kill_to_start(),
            KeyCode::Char('k') if ctrl => self.input.kill_to_end(),
            KeyCode::Char('n') if ctrl => self.switch(self.active + 1),
            KeyCode::Char('p') if ctrl => self.switch(self.active + self.rooms.len().max(1) - 1),
            KeyCode::Char(digit @ '1'..='9') if alt => {
                self.switch(digit as usize - '1' as usize);
            }
            KeyCode::Right if alt => self.switch(self.active + 1),
            KeyCode::Left if alt => self.switch(self.active + self.rooms.len().max(1) - 1),
            KeyCode::Char(c) if !ctrl && !alt => {
                self.input.insert(&c.to_string());
                return self.typing_started();
            }
            KeyCode::Backspace => {
                self.input.backspace();
                if self.input.is_empty() {
                    return self.typing_stopped();
                }
            }
            KeyCode::Delete => self.input.delete(),
            KeyCode::Left => self.input.left(),
            KeyCode::Right => self.input.right(),
            KeyCode::Home => self.input.home(),
            KeyCode::End => self.input.end(),
            KeyCode::Up => self.input.previous(),
            KeyCode::Down => self.input.next(),
            KeyCode::PageUp => return self.scroll_up(self.page()),
            KeyCode::PageDown => return self.scroll_down(self.page()),
            KeyCode::Tab => self.complete(),
            KeyCode::Enter => return self.submit(),
            _ => {}
        }
        Vec::new()
    }

    /// Shows room `index` (wrapping), moving the read marker.
    fn switch(&mut self, index: usize) {
        if self.rooms.is_empty() {
            return;
        }
        let index = index % self.rooms.len();
        if let Some(old) = self.rooms.get_mut(self.active) {
            old.marker = None;
        }
        self.active = index;
        let room = &mut self.rooms[index];
        room.marker =
            (room.unread > 0).then(|| room.entries.len() - room.unread.min(room.entries.len()));
        room.unread = 0;
    }

    fn scroll_up(&mut self, by: usize) -> Vec<Effect> {
        if let Some(room) = self.rooms.get_mut(self.active) {
            room.scroll = (room.scroll + by).min(room.entries.len().saturating_sub(1));
        }
        self.history_wanted()
    }

    fn scroll_down(&mut self, by: usize) -> Vec<Effect> {
        if let Some(room) = self.rooms.get_mut(self.active) {
            room.scroll = room.scroll.saturating_sub(by);
            if room.scroll == 0 && room.detached.is_none() {
                room.new_below = 0;
            }
        }
        self.history_wanted()
    }

    /// The pages of history the room shown needs, its view being near an end of what it
    /// holds.
    fn history_wanted(&mut self) -> Vec<Effect> {
        let page = self.page();
        let limit = scrollback::page_size(self.scrollback);
        let Some(room) = self.rooms.get_mut(self.active) else {
            return Vec::new();
        };
        let older = scrollback::wants_older(room, page).map(|seq| (HistoryDirection::Older, seq));
        let newer = scrollback::wants_newer(room, page).map(|seq| (HistoryDirection::Newer, seq));
        older
            .into_iter()
            .chain(newer)
            .map(|(direction, seq)| Effect::History {
                room: room.name.clone(),
                direction,
                seq,
                limit,
            })
            .collect()
    }

    /// Tab: completes a command at the start of the line, else a nickname in the room.
    fn complete(&mut self) {
        let (start, word) = self.input.word_before_cursor();
        if word.is_empty() {
            return;
        }
        let candidates: Vec<String> = if start == 0 && word.starts_with('/') {
            command::complete(&word)
                .into_iter()
                .map(|c| format!("{c} "))
                .collect()
        } else {
            let lower = word.to_lowercase();
            self.active_room()
                .map(|room| {
                    room.members
                        .iter()
                        .filter(|m| m.to_lowercase().starts_with(&lower) && **m != self.nickname)
                        .map(|m| {
                            if start == 0 {
                                format!("{m}: ")
                            } else {
                                format!("{m} ")
                            }
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        match candidates.as_slice() {
            [] => {}
            [only] => self.input.replace_before_cursor(start, only),
            many => {
                let prefix = common_prefix(many);
                if prefix.chars().count() > word.chars().count() {
                    self.input.replace_before_cursor(start, &prefix);
                }
                self.hint = Some(many.iter().map(|c| c.trim()).collect::<Vec<_>>().join("  "));
            }
        }
    }

    fn submit(&mut self) -> Vec<Effect> {
        let line = self.input.text();
        let command = match command::parse(&line) {
            Ok(None) => return Vec::new(),
            Ok(Some(command)) => command,
            Err(hint) => {
                self.hint = Some(hint.0);
                return Vec::new();
            }
        };
        let room = self.active_name();
        // Commands that work without a connection (fixing a refused nickname) are not
        // held back by the missing room either.
        let needs_room = matches!(
            command,
            Command::Say(_)
                | Command::Me(_)
                | Command::Topic(_)
                | Command::Who
                | Command::Leave(None)
                | Command::Invite(_)
                | Command::Kick(..)
                | Command::Ban(..)
        );
        if needs_room && room.is_none() {
            self.hint = Some("you are in no room: /join ROOM first".into());
            return Vec::new();
        }
        let room = room.unwrap_or_default();
        self.input.take();
        let mut effects = self.typing_stopped();
        match command {
            Command::Say(text) => effects.push(Effect::Say { room, text }),
            Command::Me(text) => effects.push(Effect::Act { room, text }),
            Command::Join(name) => effects.extend(self.join(name)),
            Command::Leave(name) => effects.extend(self.leave(name.unwrap_or(room))),
            Command::Topic(topic) => effects.push(Effect::SetTopic { room, topic }),
            Command::Who => {
                let members = self
                    .active_room()
                    .map(|r| r.members.iter().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                self.notice(Entry::Info(format!("in {room}: {members}")));
            }
            Command::Invite(user) => effects.push(Effect::Invite { room, user }),
            Command::Kick(user, reason) => effects.push(Effect::Kick { room, user, reason }),
            Command::Ban(user, reason) => effects.push(Effect::Ban { room, user, reason }),
            Command::Rooms => effects.push(Effect::ListRooms),
            Command::Nick(nickname) => {
                // Connected, the server's `renamed` reply says it is done (or an error why
                // not); refused or offline, the next login uses it.
                if !matches!(self.connection, ConnectionState::Connected { .. }) {
                    self.notice(Entry::Info(format!("you will be {nickname}")));
                    self.nickname.clone_from(&nickname);
                }
                effects.push(Effect::Nick(nickname));
            }
            Command::Help => {
                for (_, help) in COMMANDS {
                    self.notice(Entry::Info((*help).to_owned()));
                }
                self.notice(Entry::Info(
                    "keys: Ctrl-N/Ctrl-P or Alt-1..9 switch rooms · PgUp/PgDn or the wheel scroll · Tab completes · Up/Down recall · Ctrl-C quits"
                        .into(),
                ));
            }
            Command::Quit => self.quit = true,
        }
        effects
    }

    /// `/join NAME`: switches to the room's tab, opening it (and joining) if new.
    fn join(&mut self, name: String) -> Option<Effect> {
        if !valid_room_name(&name) {
            self.hint = Some(format!(
                "{name:?} is not a room name: use a-z 0-9 _ -, starting with a letter or digit"
            ));
            return None;
        }
        match self.rooms.iter().position(|r| r.name == name) {
            Some(index) => {
                self.switch(index);
                // A tab left behind by a kick: join again.
                (!self.rooms[index].joined).then_some(Effect::Join(name))
            }
            None => {
                self.rooms.push(RoomView::new(&name));
                self.switch(self.rooms.len() - 1);
                Some(Effect::Join(name))
            }
        }
    }

    /// `/leave [NAME]`: closes the room's tab and leaves it.
    fn leave(&mut self, name: String) -> Option<Effect> {
        let Some(index) = self.rooms.iter().position(|r| r.name == name) else {
            self.hint = Some(format!("you are not in {name}"));
            return None;
        };
        self.rooms.remove(index);
        if self.active >= self.rooms.len() {
            self.active = self.rooms.len().saturating_sub(1);
        } else if index < self.active {
            self.active -= 1;
        }
        Some(Effect::Leave(name))
    }

    /// A typing notice for the room shown, unless one went out recently (or the line is a
    /// command).
    fn typing_started(&mut self) -> Vec<Effect> {
        let Some(room) = self.active_name() else {
            return Vec::new();
        };
        if self.input.text().starts_with('/') && !self.input.text().starts_with("/me ") {
            return Vec::new();
        }
        let fresh = self.typing_sent.as_ref().is_some_and(|(sent_room, at)| {
            *sent_room == room && self.now.duration_since(*at).unwrap_or_default() < TYPING_REFRESH
        });
        if fresh {
            return Vec::new();
        }
        self.typing_sent = Some((room.clone(), self.now));
        vec![Effect::Typing { room, typing: true }]
    }

    /// Tells the room the typing stopped, if it was told it started.
    fn typing_stopped(&mut self) -> Vec<Effect> {
        match self.typing_sent.take() {
            Some((room, _)) => vec![Effect::Typing {
                room,
                typing: false,
            }],
            None => Vec::new(),
        }
    }

    fn tick(&mut self, now: SystemTime) -> Vec<Effect> {
        self.now = now;
        for room in &mut self.rooms {
            room.typing
                .retain(|_, at| now.duration_since(*at).unwrap_or_default() < TYPING_SHOWN);
        }
        let due = self
            .last_ping
            .is_none_or(|at| now.duration_since(at).unwrap_or_default() >= PING_EVERY);
        if due && matches!(self.connection, ConnectionState::Connected { .. }) {
            self.last_ping = Some(now);
            return vec![Effect::Ping(micros(now))];
        }
        Vec::new()
    }

    /// Adds `entry` to the room shown (or the first room; notices need somewhere to go).
    fn notice(&mut self, entry: Entry) {
        let index = self.active.min(self.rooms.len().saturating_sub(1));
        if self.rooms.is_empty() {
            self.rooms.push(RoomView::new("(no room)"));
        }
        let cap = self.scrollback;
        push(&mut self.rooms[index], entry, true, cap);
    }

    fn net(&mut self, event: ConversationEvent) -> Vec<Effect> {
        match event {
            ConversationEvent::Connection(state) => self.connection_changed(state),
            ConversationEvent::Server(response) => {
                if let Some(event) = response.event {
                    self.server(event);
                }
            }
            ConversationEvent::Rooms(rooms) => {
                let list = rooms
                    .iter()
                    .map(|r| format!("{} ({})", r.name, r.member_count))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.notice(Entry::Info(format!("rooms: {list}")));
            }
            ConversationEvent::Failed(reason) => {
                // Whatever failed, a page of history asked for may be asked for again.
                for room in &mut self.rooms {
                    scrollback::page_failed(room);
                }
                self.notice(Entry::Error(reason));
            }
            ConversationEvent::Refused { error, .. } => self.refused(error),
            ConversationEvent::History {
                room,
                direction,
                messages,
                more,
            } => {
                let cap = self.scrollback;
                let Some(view) = self.room_mut(&room) else {
                    return Vec::new();
                };
                let page = messages.iter().map(Entry::message).collect();
                match direction {
                    HistoryDirection::Older => scrollback::older_page(view, page, more, cap),
                    HistoryDirection::Newer => scrollback::newer_page(view, page, more, cap),
                }
                if self.active_name().as_deref() == Some(room.as_str()) {
                    return self.history_wanted();
                }
            }
        }
        Vec::new()
    }

    fn connection_changed(&mut self, state: ConnectionState) {
        match &state {
            ConnectionState::Refused { reason, login } => {
                // Said once: nothing more happens until the user acts.
                self.notice(Entry::Error(reason.clone()));
                if *login {
                    self.notice(Entry::Info(advice::FIX_NICK.into()));
                }
            }
            ConnectionState::Disconnected { reason, retry_in } => {
                if !matches!(self.connection, ConnectionState::Disconnected { .. }) {
                    self.notice(Entry::Error(format!(
                        "connection lost ({reason}); reconnecting in {:.1}s",
                        retry_in.as_secs_f64()
                    )));
                    if self.advise_on_refusal && reason.contains("connection refused") {
                        self.notice(Entry::Info(advice::NO_SERVER.into()));
                    }
                }
                self.reconnected = true;
                for room in &mut self.rooms {
                    room.typing.clear();
                }
            }
            ConnectionState::Connected { resume_complete } if self.reconnected => {
                self.notice(Entry::Info(if *resume_complete {
                    "reconnected; nothing was missed".into()
                } else {
                    "reconnected; some messages are no longer available".into()
                }));
            }
            _ => {}
        }
        self.connection = state;
    }

    fn server(&mut self, event: ServerEvent) {
        let shown = self.active_name();
        match event {
            ServerEvent::Joined(joined) => self.on_joined(joined),
            ServerEvent::Message(message) => {
                let cap = self.scrollback;
                let Some(room) = self.room_mut(&message.room) else {
                    return;
                };
                room.typing.remove(&message.sender);
                let visible = shown.as_deref() == Some(message.room.as_str());
                push(room, Entry::message(&message), visible, cap);
            }
            ServerEvent::Presence(presence) => self.on_presence(presence),
            // The server skips a stream's own typing notices by name; after a rename that
            // name is the old one, so the client skips its own too.
            ServerEvent::Typing(typing) if typing.user == self.nickname => {}
            ServerEvent::Typing(typing) => {
                let now = self.now;
                if let Some(room) = self.room_mut(&typing.room) {
                    if typing.typing {
                        room.typing.insert(typing.user, now);
                    } else {
                        room.typing.remove(&typing.user);
                    }
                }
            }
            ServerEvent::RoomUpdated(update) => self.on_room_updated(update),
            ServerEvent::Gap(gap) => {
                let cap = self.scrollback;
                if let Some(room) = self.room_mut(&gap.room) {
                    let entry = if gap.reset {
                        scrollback::reset(room);
                        Entry::Info(
                            "the server lost this room's history; it starts again here".into(),
                        )
                    } else {
                        Entry::Info(format!(
                            "messages {}–{} are no longer stored",
                            gap.from_seq, gap.to_seq
                        ))
                    };
                    push_quiet(room, entry, true, cap);
                }
            }
            ServerEvent::Error(error) => self.refused(error),
            ServerEvent::Pong(pong) => {
                let sent =
                    UNIX_EPOCH + Duration::from_micros(pong.client_time_micros.unsigned_abs());
                self.rtt = SystemTime::now().duration_since(sent).ok();
            }
            ServerEvent::Left(left) => self.on_left(left),
            ServerEvent::ModerationDone(done) => {
                self.notice(Entry::Info(format!("done: {} in {}", done.user, done.room)));
            }
            ServerEvent::Renamed(renamed) => {
                self.nickname.clone_from(&renamed.nickname);
                self.notice(Entry::Info(format!("you are now {}", renamed.nickname)));
            }
            ServerEvent::Ack(_) | ServerEvent::Reconnect(_) => {}
        }
    }

    /// A room joined: its members, topic, and whether older messages can be read back.
    fn on_joined(&mut self, joined: pb::Joined) {
        let Some(info) = joined.room else { return };
        if let Some(room) = self.room_mut(&info.name) {
            room.joined = true;
            room.topic = info.topic;
            room.members = joined.members.into_iter().collect();
            // The join replays from a seq: what is before it can be read back.
            let held_from = room.entries.iter().find_map(Entry::seq);
            if joined.replay_from_seq > 1
                && room.older == Older::None
                && held_from.is_none_or(|seq| seq > 1)
            {
                room.older = Older::Available;
            }
        }
    }

    /// Someone arrived in or left a room.
    fn on_presence(&mut self, presence: pb::PresenceEvent) {
        let shown = self.active_name();
        let cap = self.scrollback;
        let kind = presence.kind();
        let Some(room) = self.room_mut(&presence.room) else {
            return;
        };
        let at = timestamp(presence.at);
        let entry = match kind {
            PresenceKind::Renamed => {
                room.members.remove(&presence.previous);
                room.typing.remove(&presence.previous);
                room.members.insert(presence.user.clone());
                Entry::Renamed {
                    at,
                    from: presence.previous,
                    to: presence.user,
                }
            }
            PresenceKind::Joined => {
                room.members.insert(presence.user.clone());
                Entry::Presence {
                    at,
                    user: presence.user,
                    joined: true,
                }
            }
            PresenceKind::Left | PresenceKind::Unspecified => {
                room.members.remove(&presence.user);
                room.typing.remove(&presence.user);
                Entry::Presence {
                    at,
                    user: presence.user,
                    joined: false,
                }
            }
        };
        let visible = shown.as_deref() == Some(presence.room.as_str());
        push_quiet(room, entry, visible, cap);
    }

    /// A room's topic changed.
    fn on_room_updated(&mut self, update: pb::RoomUpdated) {
        let shown = self.active_name();
        let Some(info) = update.room else { return };
        let (now, cap) = (self.now, self.scrollback);
        let visible = shown.as_deref() == Some(info.name.as_str());
        if let Some(room) = self.room_mut(&info.name) {
            room.topic = info.topic.clone();
            let entry = Entry::Topic {
                at: now,
                by: update.updated_by,
                topic: info.topic,
            };
            push_quiet(room, entry, visible, cap);
        }
    }

    /// Put out of a room by its owner.
    fn on_left(&mut self, left: pb::Left) {
        let how = match left.reason() {
            pb::LeaveReason::Kicked => "kicked out of",
            pb::LeaveReason::Banned => "banned from",
            pb::LeaveReason::Requested | pb::LeaveReason::Unspecified => return,
        };
        let because = if left.message.is_empty() {
            String::new()
        } else {
            format!(": {}", left.message)
        };
        let cap = self.scrollback;
        if let Some(room) = self.room_mut(&left.room) {
            room.joined = false;
            room.members.clear();
            let entry = Entry::Error(format!(
                "you were {how} {} by {}{because}",
                left.room, left.by
            ));
            push_quiet(room, entry, true, cap);
        }
    }

    /// Shows a command the server refused, with what was wrong.
    fn refused(&mut self, error: pb::CommandError) {
        let fields: Vec<String> = error
            .field_violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        // A join the server refused leaves no tab behind.
        if error
            .field_violations
            .iter()
            .any(|v| v.field.starts_with("join."))
        {
            self.rooms.retain(|r| r.joined);
            self.active = self.active.min(self.rooms.len().saturating_sub(1));
        }
        let detail = if fields.is_empty() {
            error.message
        } else {
            fields.join("; ")
        };
        self.notice(Entry::Error(format!("server refused: {detail}")));
    }
}

/// Adds a message-like entry: counts as unread when not shown, keeps a scrolled view still.
fn push(room: &mut RoomView, entry: Entry, visible: bool, cap: usize) {
    if !visible && matches!(entry, Entry::Message { .. }) {
        room.unread += 1;
    }
    push_quiet(room, entry, visible, cap);
}

/// Adds an entry without counting it unread.
fn push_quiet(room: &mut RoomView, entry: Entry, visible: bool, cap: usize) {
    scrollback::push_live(room, entry, visible, cap);
}

fn timestamp(at: Option<prost_types::Timestamp>) -> SystemTime {
    at.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(UNIX_EPOCH)
}

fn micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn common_prefix(words: &[String]) -> String {
    let Some(first) = words.first() else {
        return String::new();
    };
    let mut prefix: Vec<char> = first.chars().collect();
    for word in &words[1..] {
        let shared = prefix
            .iter()
            .zip(word.chars())
            .take_while(|(a, b)| a.to_lowercase().eq(b.to_lowercase()))
            .count();
        prefix.truncate(shared);
    }
    prefix.into_iter().collect()
}

/// The server's room-name rule, checked before asking it.
pub fn valid_room_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
pub(crate) mod tests {
    use confab::{ChatMessage, ChatMessageRecord, pb::ChatResponse};
    use crossterm::event::{KeyEvent, MouseEvent};

    use super::*;

    /// 2026-11-22 10:00:00 UTC: the fixed clock of every test.
    pub(crate) fn clock() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_341_600)
    }

    pub(crate) fn app() -> App {
        App::new("alice", &["lobby".to_string()], clock(), (80, 24))
    }

    fn key(code: KeyCode) -> Event {
        Event::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn ctrl(c: char) -> Event {
        Event::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
    }

    pub(crate) fn server(event: ServerEvent) -> Event {
        Event::Net(ConversationEvent::Server(ChatResponse {
            request_id: 0,
            event: Some(event),
        }))
    }

    pub(crate) fn message(room: &str, seq: u64, from: &str, text: &str, minutes: u64) -> Event {
        server(ServerEvent::Message(ChatMessage::new(ChatMessageRecord {
            room: room.into(),
            seq,
            sender: from.into(),
            text: text.into(),
            kind: pb::MessageKind::Text as i32,
            client_msg_id: format!("id{seq}"),
            sent_at: Some((clock() + Duration::from_secs(60 * minutes)).into()),
        })))
    }

    pub(crate) fn joined(room: &str, members: &[&str], topic: &str) -> Event {
        server(ServerEvent::Joined(pb::Joined {
            room: Some(pb::RoomInfo {
                name: room.into(),
                topic: topic.into(),
                ..Default::default()
            }),
            members: members.iter().map(|m| m.to_string()).collect(),
            replay_from_seq: 1,
            epoch: "e1".into(),
        }))
    }

    fn type_line(app: &mut App, text: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        for c in text.chars() {
            effects.extend(app.update(key(KeyCode::Char(c))));
        }
        effects.extend(app.update(key(KeyCode::Enter)));
        effects
    }

    #[test]
    fn enter_sends_the_line_to_the_room_shown_and_stops_typing() {
        let mut app = app();
        let effects = type_line(&mut app, "hi all");
        assert_eq!(
            effects,
            [
                Effect::Typing {
                    room: "lobby".into(),
                    typing: true
                },
                Effect::Typing {
                    room: "lobby".into(),
                    typing: false
                },
                Effect::Say {
                    room: "lobby".into(),
                    text: "hi all".into()
                },
            ]
        );
        assert!(app.input.is_empty());
    }

    #[test]
    fn typing_notices_are_throttled() {
        let mut app = app();
        let first = app.update(key(KeyCode::Char('a')));
        let second = app.update(key(KeyCode::Char('b')));
        assert_eq!(first.len(), 1);
        assert!(
            second.is_empty(),
            "no second notice within the refresh period"
        );
        app.update(Event::Tick(clock() + Duration::from_secs(4)));
        assert_eq!(
            app.update(key(KeyCode::Char('c'))).len(),
            1,
            "refreshed after it"
        );
    }

    #[test]
    fn commands_become_effects_and_tabs() {
        let mut app = app();
        let effects = type_line(&mut app, "/me waves");
        assert_eq!(
            effects.last(),
            Some(&Effect::Act {
                room: "lobby".into(),
                text: "waves".into()
            }),
            "an action counts as typing, then goes out"
        );
        assert_eq!(
            type_line(&mut app, "/join rust"),
            [Effect::Join("rust".into())]
        );
        assert_eq!(app.active_room().unwrap().name, "rust");
        assert_eq!(
            type_line(&mut app, "/topic all things rust"),
            [Effect::SetTopic {
                room: "rust".into(),
                topic: "all things rust".into()
            }]
        );
        assert_eq!(
            type_line(&mut app, "/leave"),
            [Effect::Leave("rust".into())]
        );
        assert_eq!(app.rooms.len(), 1);
        assert_eq!(app.active_room().unwrap().name, "lobby");
        assert_eq!(type_line(&mut app, "/rooms"), [Effect::ListRooms]);
        assert!(type_line(&mut app, "/quit").is_empty());
        assert!(app.quit);
    }

    #[test]
    fn bad_commands_leave_the_line_and_show_a_hint() {
        let mut app = app();
        assert!(type_line(&mut app, "/frob").is_empty());
        assert!(
            app.hint
                .as_deref()
                .unwrap()
                .contains("unknown command /frob")
        );
        assert_eq!(app.input.text(), "/frob", "the line stays to be fixed");
        app.update(ctrl('u'));
        assert!(type_line(&mut app, "/join Not Valid").is_empty());
        assert!(app.hint.as_deref().unwrap().contains("usage: /join"));
        app.update(ctrl('u'));
        assert!(type_line(&mut app, "/join UPPER").is_empty());
        assert!(app.hint.as_deref().unwrap().contains("not a room name"));
        assert_eq!(app.rooms.len(), 1);
    }

    #[test]
    fn a_multi_line_paste_is_one_message() {
        let mut app = app();
        app.update(Event::Paste("line one\r\nline two".into()));
        let effects = app.update(key(KeyCode::Enter));
        assert!(effects.contains(&Effect::Say {
            room: "lobby".into(),
            text: "line one\nline two".into()
        }));
    }

    #[test]
    fn tab_completes_nicknames_and_commands() {
        let mut app = app();
        app.update(joined("lobby", &["alice", "bob", "bert", "carol"], ""));
        app.update(key(KeyCode::Char('c')));
        app.update(key(KeyCode::Tab));
        assert_eq!(app.input.text(), "carol: ");
        app.update(ctrl('u'));
        for c in "hi b".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        app.update(key(KeyCode::Tab));
        assert_eq!(
            app.input.text(),
            "hi b",
            "ambiguous: nothing longer in common"
        );
        assert_eq!(app.hint.as_deref(), Some("bert  bob"));
        app.update(key(KeyCode::Char('o')));
        app.update(key(KeyCode::Tab));
        assert_eq!(app.input.text(), "hi bob ");
        app.update(ctrl('u'));
        app.update(key(KeyCode::Char('/')));
        app.update(key(KeyCode::Char('w')));
        app.update(key(KeyCode::Tab));
        assert_eq!(app.input.text(), "/who ");
    }

    #[test]
    fn messages_in_other_rooms_count_as_unread_and_set_the_read_marker() {
        let mut app = App::new("alice", &["lobby".into(), "rust".into()], clock(), (80, 24));
        app.update(message("rust", 1, "bob", "one", 0));
        app.update(message("rust", 2, "bob", "two", 0));
        app.update(message("lobby", 1, "bob", "here", 0));
        assert_eq!((app.rooms[0].unread, app.rooms[1].unread), (0, 2));
        app.update(ctrl('n'));
        assert_eq!(app.active_room().unwrap().name, "rust");
        assert_eq!(app.rooms[1].unread, 0);
        assert_eq!(app.rooms[1].marker, Some(0));
        app.update(ctrl('p'));
        assert_eq!(
            app.rooms[1].marker, None,
            "the marker goes once the room was read"
        );
    }

    #[test]
    fn a_scrolled_view_stays_put_and_counts_what_arrives_below() {
        let mut app = app();
        for seq in 1..=40 {
            app.update(message("lobby", seq, "bob", &format!("m{seq}"), 0));
        }
        app.update(key(KeyCode::PageUp));
        let scrolled = app.rooms[0].scroll;
        assert!(scrolled > 0);
        app.update(message("lobby", 41, "bob", "new", 0));
        app.update(message("lobby", 42, "bob", "newer", 0));
        assert_eq!(
            app.rooms[0].scroll,
            scrolled + 2,
            "the same entries stay in view"
        );
        assert_eq!(app.rooms[0].new_below, 2);
        for _ in 0..10 {
            app.update(key(KeyCode::PageDown));
        }
        assert_eq!((app.rooms[0].scroll, app.rooms[0].new_below), (0, 0));
        app.update(Event::Mouse(MouseEvent {
            kind: MouseEventKind::ScrollUp,
            column: 0,
            row: 0,
            modifiers: KeyModifiers::NONE,
        }));
        assert_eq!(app.rooms[0].scroll, 3);
    }

    #[test]
    fn ones_own_typing_notice_is_not_shown() {
        let mut app = app();
        app.update(joined("lobby", &["alice"], ""));
        app.update(server(ServerEvent::Typing(pb::TypingEvent {
            room: "lobby".into(),
            user: "alice".into(),
            typing: true,
        })));
        assert!(app.rooms[0].typing.is_empty());
    }

    #[test]
    fn a_rename_moves_the_member_and_is_said_once() {
        let mut app = app();
        app.update(joined("lobby", &["alice", "bob"], ""));
        app.update(server(ServerEvent::Presence(pb::PresenceEvent {
            room: "lobby".into(),
            user: "robert".into(),
            kind: PresenceKind::Renamed as i32,
            at: None,
            previous: "bob".into(),
        })));
        let room = &app.rooms[0];
        assert_eq!(room.members.iter().collect::<Vec<_>>(), ["alice", "robert"]);
        assert_eq!(
            room.entries.back(),
            Some(&Entry::Renamed {
                at: UNIX_EPOCH,
                from: "bob".into(),
                to: "robert".into()
            })
        );
    }

    #[test]
    fn presence_and_typing_follow_the_room() {
        let mut app = app();
        app.update(joined("lobby", &["alice"], "hi"));
        app.update(server(ServerEvent::Presence(pb::PresenceEvent {
            room: "lobby".into(),
            user: "bob".into(),
            kind: PresenceKind::Joined as i32,
            at: None,
            previous: String::new(),
        })));
        app.update(server(ServerEvent::Typing(pb::TypingEvent {
            room: "lobby".into(),
            user: "bob".into(),
            typing: true,
        })));
        assert_eq!(app.rooms[0].typists(), ["bob"]);
        assert!(app.rooms[0].members.contains("bob"));
        app.update(Event::Tick(clock() + Duration::from_secs(10)));
        assert!(app.rooms[0].typists().is_empty(), "typing notices expire");
    }

    #[test]
    fn a_reconnect_is_told_in_the_room() {
        let mut app = app();
        app.update(Event::Net(ConversationEvent::Connection(
            ConnectionState::Connected {
                resume_complete: true,
            },
        )));
        app.update(Event::Net(ConversationEvent::Connection(
            ConnectionState::Disconnected {
                reason: "the server closed the stream".into(),
                retry_in: Duration::from_millis(500),
            },
        )));
        app.update(Event::Net(ConversationEvent::Connection(
            ConnectionState::Connected {
                resume_complete: true,
            },
        )));
        let notes: Vec<&Entry> = app.rooms[0].entries.iter().collect();
        assert!(matches!(notes[0], Entry::Error(e) if e.contains("connection lost")));
        assert!(matches!(notes[1], Entry::Info(i) if i.contains("reconnected")));
    }

    #[test]
    fn server_errors_show_the_field_that_was_wrong() {
        let mut app = app();
        app.update(server(ServerEvent::Error(pb::CommandError {
            code: 3,
            message: "invalid send.text: the text is empty".into(),
            field_violations: vec![pb::FieldViolation {
                field: "send.text".into(),
                description: "the text is empty".into(),
            }],
            retry_after: None,
        })));
        assert!(
            matches!(&app.rooms[0].entries[0], Entry::Error(e) if e.contains("send.text: the text is empty"))
        );
    }

    #[test]
    fn the_owner_moderates_the_room_shown_and_a_kick_is_explained() {
        let mut app = app();
        app.update(joined("lobby", &["alice", "bob"], ""));
        assert_eq!(
            type_line(&mut app, "/kick bob enough now").last(),
            Some(&Effect::Kick {
                room: "lobby".into(),
                user: "bob".into(),
                reason: "enough now".into()
            })
        );
        assert_eq!(
            type_line(&mut app, "/invite carol").last(),
            Some(&Effect::Invite {
                room: "lobby".into(),
                user: "carol".into()
            })
        );
        app.update(server(ServerEvent::Left(pb::Left {
            room: "lobby".into(),
            reason: pb::LeaveReason::Banned as i32,
            by: "bob".into(),
            message: "spam".into(),
        })));
        let room = &app.rooms[0];
        assert!(!room.joined && room.members.is_empty());
        assert!(
            matches!(room.entries.back(), Some(Entry::Error(e)) if e == "you were banned from lobby by bob: spam"),
            "{:?}",
            room.entries.back()
        );
        assert_eq!(
            type_line(&mut app, "/join lobby").last(),
            Some(&Effect::Join("lobby".into())),
            "the tab stays, and /join tries again"
        );
    }

    #[test]
    fn ctrl_c_quits() {
        let mut app = app();
        app.update(ctrl('c'));
        assert!(app.quit);
    }
}
