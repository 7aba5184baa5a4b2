//! Where rooms and their logs live: the [`Store`] trait and its engines.
//!
//! Writes are ordered and asynchronous. The hub calls [`Store::append`] under the room's
//! lock, so each room's messages reach the store in seq order; the store never assigns
//! seqs itself. Each write carries a [`Committed`] callback that the engine calls once the
//! write is durable (or failed), in the order the writes were made. The hub publishes a
//! message to its readers from that callback, so readers only ever see committed
//! messages: a message seen before a crash is still there, with the same seq, after it.
//! An append may hand its commit back to the caller ([`Lead`]), to run on the caller's
//! thread once the room's lock is let go.
//!
//! Reads are synchronous and return messages in ascending seq order. They are short
//! (one index range, at most a page) and see only committed data.
//!
//! Engines: [`SqliteStore`], the default (one SQLite file, one writer that commits in
//! groups), and [`MemoryStore`] (`--in-memory`: nothing survives the process).

mod checkpoint;
#[cfg(test)]
mod conformance;
mod memory;
mod sqlite;
mod writer;

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use confab::ChatMessage;
use tokio::sync::oneshot;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// A store failure. The client sees INTERNAL; the cause goes to the log. `Clone`, since
/// one failed commit answers every sender waiting on it (hence the `Arc`s).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The data dir could not be made or locked, or the writer thread started.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, for the log.
        what: String,
        /// Why it failed.
        source: std::sync::Arc<std::io::Error>,
    },
    /// Another server holds the data dir.
    #[error("{0} is in use by another confab-server")]
    InUse(std::path::PathBuf),
    /// The database was written by a newer server.
    #[error("the database has schema version {found}, newer than this server knows ({known})")]
    NewerSchema {
        /// The database's version.
        found: usize,
        /// The newest this server knows.
        known: usize,
    },
    /// SQLite failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] std::sync::Arc<rusqlite::Error>),
    /// A write named a room the store does not have.
    #[error("room {0:?} is not in the store")]
    NoSuchRoom(String),
    /// A message was appended out of seq order (the hub's bug, never the client's).
    #[error("room {room:?}: seq {seq} appended after {head}")]
    OutOfOrder {
        /// The room.
        room: String,
        /// The seq appended.
        seq: u64,
        /// The room's head before it.
        head: u64,
    },
    /// The store was closed (at shutdown) or its writer stopped.
    #[error("the store is closed")]
    Closed,
    /// A read on a blocking thread panicked.
    #[error("a store read panicked")]
    ReadPanicked,
}

impl StoreError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source: std::sync::Arc::new(source),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Sqlite(std::sync::Arc::new(error))
    }
}

/// Called once a write is durable (`Ok`) or has failed, in the order writes were made.
/// It runs on the engine's writer (or inline): it must be quick and must not block.
pub type Committed = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A [`Committed`] callback that resolves a future, for callers that just wait.
pub fn on_commit() -> (Committed, impl Future<Output = Result<(), StoreError>>) {
    let (tx, rx) = oneshot::channel();
    let done: Committed = Box::new(move |result| {
        let _ = tx.send(result);
    });
    let wait = async move { rx.await.unwrap_or_else(|_| Err(StoreError::Closed)) };
    (done, wait)
}

/// The commit of an appended message, when its caller may run it: [`Lead::commit`]
/// commits on the caller's thread, with no hand-off to another. The engine takes it once
/// it has let go of its own locks. Dropped, it goes to the store's own thread, so a write
/// is never left waiting for a lead no one holds.
#[must_use = "a lead not committed goes to the store's thread"]
pub struct Lead(Option<Arc<dyn Leader>>);

/// What a [`Lead`] commits with (the SQLite store's writer).
pub(crate) trait Leader: Send + Sync {
    /// Commits what has queued, here.
    fn lead(&self);
    /// Hands the commit to the store's thread.
    fn decline(&self);
}

impl Lead {
    /// No commit for the caller: the store commits on its own.
    pub fn none() -> Self {
        Lead(None)
    }

    /// The caller's commit, run by `leader`.
    pub(crate) fn to(leader: Arc<dyn Leader>) -> Self {
        Lead(Some(leader))
    }

    /// Whether there is a commit for the caller to run.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Commits now, on this thread (when there is anything to commit). Blocks for one
    /// commit of a few writes.
    pub fn commit(mut self) {
        if let Some(leader) = self.0.take() {
            leader.lead();
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if let Some(leader) = self.0.take() {
            leader.decline();
        }
    }
}

/// What the store keeps about a room besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomRecord {
    /// The room name (already validated).
    pub name: String,
    /// The topic line.
    pub topic: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// Who created it: its owner.
    pub created_by: String,
    /// Whether only the owner and invited users may join.
    pub private: bool,
    /// Who is invited or banned, by lower-cased nickname.
    pub access: BTreeMap<String, Access>,
    /// The seq of its newest message ever, 0 if none: numbering continues from here after
    /// a restart, even when retention removed every message.
    pub head_seq: u64,
    /// Its epoch: seqs count within it. Made when the room is, and made again only if its
    /// log is lost (see `chat.v1.Joined.epoch`).
    pub epoch: String,
}

/// A stored message's idempotency key, and when it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentKey {
    /// Who sent it.
    pub sender: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// When the server accepted it.
    pub sent_at: SystemTime,
}

/// A user's standing in a room, besides being its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// May join the room even if it is private.
    Invited,
    /// May not join the room.
    Banned,
}

impl Access {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Invited => "invited",
            Access::Banned => "banned",
        }
    }

    /// From what [`Access::as_str`] stored.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "invited" => Some(Access::Invited),
            "banned" => Some(Access::Banned),
            _ => None,
        }
    }
}

/// How long and how much of each room's log to keep. `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many newest messages per room.
    pub max_messages: Option<u64>,
    /// Remove messages older than this.
    pub max_age: Option<Duration>,
}

impl Retention {
    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.max_messages.is_some() || self.max_age.is_some()
    }
}

/// The storage engine behind the hub.
pub trait Store: Send + Sync + 'static {
    /// Every room, for the hub to load at start.
    fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError>;

    /// Records a new room; the hub has checked that the name is free.
    fn create_room(&self, room: RoomRecord, done: Committed);

    /// Appends `message` to its room's log; called in seq order per room. The caller
    /// commits the returned [`Lead`] once it holds no lock (or drops it).
    fn append(&self, message: ChatMessage, done: Committed) -> Lead;

    /// Sets `room`'s topic.
    fn set_topic(&self, room: &str, topic: &str, done: Committed);

    /// Records `user`'s standing in `room` (`None`: neither invited nor banned).
    fn set_access(&self, room: &str, user: &str, access: Option<Access>, done: Committed);

    /// Removes what `retention` no longer keeps; `done` runs when that is durable.
    fn apply_retention(&self, retention: Retention, done: Committed);

    /// Up to `limit` messages of `room` with seq > `after_seq`, oldest first.
    fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// Up to `limit` messages of `room` with seq < `before_seq`, the newest of them,
    /// returned oldest first.
    fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// The seq of the oldest message of `room` still stored, if any.
    fn first_seq(&self, room: &str) -> Result<Option<u64>, StoreError>;

    /// The seq stored for `client_msg_id` from `sender` in `room`, if that message was
    /// sent after `since`.
    fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError>;

    /// The idempotency keys of `room`'s messages sent at or after `since`, newest first:
    /// what the hub must recognise as retries when it starts.
    fn sent_since(&self, room: &str, since: SystemTime) -> Result<Vec<SentKey>, StoreError>;

    /// Makes every write so far durable and stops accepting new ones (at shutdown).
    fn close(&self) {}
}

/// Microseconds since the Unix epoch, as stored.
pub(crate) fn to_micros(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`to_micros`].
pub(crate) fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// When a message was accepted (the epoch if it carries no time, which the hub never does).
pub(crate) fn sent_at(message: &ChatMessage) -> SystemTime {
    message
        .sent_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
