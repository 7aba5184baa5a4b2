//! [`Input`]: the line editor under the message pane.
//!
//! Emacs-style keys as in a shell: Ctrl-A/E (start, end), Ctrl-W (delete word), Ctrl-U
//! (delete to start), Ctrl-K (delete to end), Home/End, Left/Right, Backspace/Delete; Up
//! and Down recall sent lines. The cursor counts characters, not bytes.

/// How many sent lines Up/Down can recall.
const HISTORY: usize = 200;

/// The line being typed, its cursor, and the lines sent before.
#[derive(Debug, Default, Clone)]
pub struct Input {
    /// The text, as characters, so the cursor can move over any of them.
    chars: Vec<char>,
    /// Cursor position in `chars` (0..=len).
    cursor: usize,
    /// Lines sent, oldest first.
    history: Vec<String>,
    /// While recalling: the index into `history`, and the line being typed before.
    recall: Option<(usize, String)>,
}

impl Input {
    /// The text.
    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    /// The cursor, in characters from the start.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Whether nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Inserts `text` at the cursor.
    pub fn insert(&mut self, text: &str) {
        for c in text.chars() {
            self.chars.insert(self.cursor, c);
            self.cursor += 1;
        }
    }

    /// Replaces the whole line.
    pub fn set(&mut self, text: &str) {
        self.chars = text.chars().collect();
        self.cursor = self.chars.len();
    }

    /// Takes the line out (to send it), remembering it for recall.
    pub fn take(&mut self) -> String {
        let text = self.text();
        if !text.trim().is_empty() && self.history.last() != Some(&text) {
            self.history.push(text.clone());
            if self.history.len() > HISTORY {
                self.history.remove(0);
            }
        }
        self.chars.clear();
        self.cursor = 0;
        self.recall = None;
        text
    }

    /// Backspace.
    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    /// Delete.
    pub fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    /// Left.
    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    /// Right.
    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    /// Ctrl-A, Home.
    pub fn home(&mut self) {
        self.cursor = 0;
    }

    /// Ctrl-E, End.
    pub fn end(&mut self) {
        self.cursor = self.chars.len();
    }

    /// Ctrl-U: deletes from the start of the line to the cursor.
    pub fn kill_to_start(&mut self) {
        self.chars.drain(..self.cursor);
        self.cursor = 0;
    }

    /// Ctrl-K: deletes from the cursor to the end of the line.
    pub fn kill_to_end(&mut self) {
        self.chars.truncate(self.cursor);
    }

    /// Ctrl-W: deletes the word before the cursor (and the spaces after it).
    pub fn kill_word(&mut self) {
        let mut start = self.cursor;
        while start > 0 && self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        self.chars.drain(start..self.cursor);
        self.cursor = start;
    }

    /// The word the cursor is at the end of, and where it starts (for completion).
    pub fn word_before_cursor(&self) -> (usize, String) {
        let mut start = self.cursor;
        while start > 0 && !self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        (start, self.chars[start..self.cursor].iter().collect())
    }

    /// Replaces the characters from `start` to the cursor with `text`.
    pub fn replace_before_cursor(&mut self, start: usize, text: &str) {
        self.chars.drain(start..self.cursor);
        self.cursor = start;
        self.insert(text);
    }

    /// Up: recalls the previous sent line.
    pub fn previous(&mut self) {
        let index = match &self.recall {
            Some((0, _)) => return,
            Some((index, _)) => index - 1,
            None if self.history.is_empty() => return,
            None => {
                self.recall = Some((self.history.len(), self.text()));
                self.history.len() - 1
            }
        };
        if let Some((at, _)) = &mut self.recall {
            *at = index;
        }
        let line = self.history[index].clone();
        self.set(&line);
    }

    /// Down: goes back toward the line being typed.
    pub fn next(&mut self) {
        let Some((index, draft)) = self.recall.clone() else {
            return;
        };
        if index + 1 >= self.history.len() {
            self.recall = None;
            self.set(&draft);
        } else {
            self.recall = Some((index + 1, draft));
            let line = self.history[index + 1].clone();
            self.set(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> Input {
        let mut input = Input::default();
        input.insert(text);
        input
    }

    #[test]
    fn editing_moves_by_characters() {
        let mut input = typed("héllo");
        input.left();
        input.left();
        input.backspace();
        assert_eq!(input.text(), "hélo");
        input.home();
        input.delete();
        assert_eq!((input.text().as_str(), input.cursor()), ("élo", 0));
        input.end();
        input.insert("!");
        assert_eq!(input.text(), "élo!");
    }

    #[test]
    fn kill_keys_delete_words_and_line_parts() {
        let mut input = typed("one two  three");
        input.kill_word();
        assert_eq!(input.text(), "one two  ");
        input.kill_word();
        assert_eq!(input.text(), "one ");
        let mut input = typed("left right");
        for _ in 0..5 {
            input.left();
        }
        input.kill_to_end();
        assert_eq!(input.text(), "left ");
        input.insert("x");
        input.left();
        input.kill_to_start();
        assert_eq!((input.text().as_str(), input.cursor()), ("x", 0));
    }

    #[test]
    fn up_and_down_recall_sent_lines_and_keep_the_draft() {
        let mut input = Input::default();
        for line in ["first", "second"] {
            input.insert(line);
            input.take();
        }
        input.insert("draft");
        input.previous();
        assert_eq!(input.text(), "second");
        input.previous();
        assert_eq!(input.text(), "first");
        input.previous();
        assert_eq!(input.text(), "first");
        input.next();
        assert_eq!(input.text(), "second");
        input.next();
        assert_eq!(input.text(), "draft");
    }

    #[test]
    fn completion_replaces_the_word_before_the_cursor() {
        let mut input = typed("hi al");
        let (start, word) = input.word_before_cursor();
        assert_eq!((start, word.as_str()), (3, "al"));
        input.replace_before_cursor(start, "alice: ");
        assert_eq!(input.text(), "hi alice: ");
    }
}
