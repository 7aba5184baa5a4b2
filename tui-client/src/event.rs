//! [`Event`]: everything the UI loop reacts to, from the terminal, the network and the clock.

use std::time::SystemTime;

use confab::ConversationEvent;
use crossterm::event::{KeyEvent, MouseEvent};

/// One thing that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A key was pressed.
    Key(KeyEvent),
    /// Text was pasted (bracketed paste: it arrives whole, newlines included).
    Paste(String),
    /// The mouse did something (the wheel scrolls).
    Mouse(MouseEvent),
    /// The terminal is now this many columns and rows.
    Resize(u16, u16),
    /// The connection reported something.
    Net(ConversationEvent),
    /// The clock ticked: typing notices expire, pings go out.
    Tick(SystemTime),
}

impl Event {
    /// The UI event for a terminal event, if it is one the UI uses.
    pub fn from_terminal(event: crossterm::event::Event) -> Option<Self> {
        use crossterm::event::{Event as Term, KeyEventKind};
        match event {
            Term::Key(key) if key.kind != KeyEventKind::Release => Some(Event::Key(key)),
            Term::Paste(text) => Some(Event::Paste(text)),
            Term::Mouse(mouse) => Some(Event::Mouse(mouse)),
            Term::Resize(width, height) => Some(Event::Resize(width, height)),
            _ => None,
        }
    }
}
