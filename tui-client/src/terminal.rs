//! Entering and leaving the full-screen terminal, and putting it back however we leave.
//!
//! `ratatui::init` turns on raw mode and the alternate screen and installs a panic hook
//! that undoes them; mouse capture and bracketed paste are ours, so our own hook (and
//! [`restore`]) turns them off too. `main` calls [`restore`] on every way out: `/quit`,
//! Ctrl-C, the terminal going away, an error.

use std::io::{self, stdout};

use crossterm::{
    event::{DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture},
    execute,
};
use ratatui::DefaultTerminal;

/// Takes over the terminal: raw mode, alternate screen, mouse wheel, bracketed paste.
pub fn init() -> io::Result<DefaultTerminal> {
    let terminal = ratatui::try_init()?;
    let ratatui_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = execute!(stdout(), DisableMouseCapture, DisableBracketedPaste);
        ratatui_hook(info);
    }));
    execute!(stdout(), EnableMouseCapture, EnableBracketedPaste)?;
    Ok(terminal)
}

/// Gives the terminal back as it was.
pub fn restore() {
    let _ = execute!(stdout(), DisableMouseCapture, DisableBracketedPaste);
    ratatui::restore();
}
