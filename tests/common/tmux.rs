//! [`Tmux`]: the real `confab` binary in a tmux window of its own, typed at and read like
//! a person would. Only the terminal client's tests include this file
//! (`#[path = "common/tmux.rs"] mod tmux;`): the binary is theirs.

#![allow(dead_code)] // each test file uses its own part of this

use std::{process::Command, sync::atomic::Ordering, time::Duration};

use crate::common::DEADLINE;

const CONFAB: &str = env!("CARGO_BIN_EXE_confab");

/// A shell in a tmux window of its own (own socket), in which a test runs `confab`.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// A 100×24 shell; `confab ARGS` runs in it, and when it exits the shell prints its
    /// exit code and whether the terminal is back in cooked mode.
    pub fn start(name: &str, args: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tmux = Self {
            socket: format!("confab-test-{}-{n}-{name}", std::process::id()),
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "24",
            "bash --norc --noprofile",
        ]);
        let line = format!(
            "clear; TERM=xterm-256color {CONFAB} {args}; echo \"EXIT:$?\"; stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)' | paste -sd' '"
        );
        tmux.run(&["send-keys", "-t", "t", "-l", &line]);
        tmux.run(&["send-keys", "-t", "t", "Enter"]);
        tmux
    }

    pub fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Types `text` as keystrokes.
    pub fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", "t", "-l", text]);
    }

    /// Presses named keys (`Enter`, `C-c`, `PageUp`).
    pub fn press(&self, key: &str) {
        self.run(&["send-keys", "-t", "t", key]);
    }

    pub fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// A tmux format about the pane (`#{alternate_on}`).
    pub fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "t", format])
            .trim()
            .to_owned()
    }

    /// Polls the screen until `check` holds; returns the screen.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let screen = self.capture();
            if check(&screen) {
                return screen;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; the screen:\n{screen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_for_text(&self, text: &str) -> String {
        self.wait_for(text, |screen| screen.contains(text)).await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The input line: the last line that starts with the prompt.
pub fn input_line(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .find(|l| l.starts_with("> "))
        .unwrap_or("")
}
