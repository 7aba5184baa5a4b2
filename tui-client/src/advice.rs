//! What a person is told when the first thing they try does not work.

/// Shown when nothing listens on the default address.
pub const NO_SERVER: &str = "no Confab server is running on 127.0.0.1:50051: start one with \
`confab-server` (it needs nothing else), name another with --server HOST:PORT, or try \
`confab demo`, which brings its own";

/// Shown when the server refuses the nickname.
pub const FIX_NICK: &str = "type /nick NAME to try another nickname, or /quit";
