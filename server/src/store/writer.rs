//! [`Writer`]: the SQLite store's one write connection, and who commits on it.
//!
//! Writes queue in order, and one leader at a time commits what has queued, in one
//! transaction, then calls each write's callback in order.
//!
//! **Leader commits.** A message that finds no commit under way comes back to its caller
//! as a [`Lead`]: the caller commits the queue itself, on its own thread, once it has let
//! go of its own locks (the engine appends under the room's lock) and queued the rest of
//! its run (a stream's sends already at hand), so that one commit carries the run. A
//! message at light load therefore costs no thread switch. Before, each one woke the
//! writer thread and was woken back by it; on one core, that hand-off was a fifth of the
//! CPU at a stream's top send rate (then a stream's sends committed one at a time: see
//! BENCHMARKS.md).
//!
//! **The writer thread** leads whenever a caller should not:
//! - when writes queued up while a caller committed: they are handed to the thread, so a
//!   caller commits one small group and no more, and under load groups grow on the thread
//!   as they did before;
//! - for every write but a message (rooms, topics, access, retention, close): they are
//!   rare, and retention and close can take long;
//! - when the WAL is near the point where a commit checkpoints inline
//!   ([`super::checkpoint`]), or the message is large: a caller never copies the WAL, nor
//!   waits at its bound;
//! - when the caller drops its [`Lead`] instead of committing.
//!
//! A caller that leads blocks its thread (a runtime worker) for one commit of at most
//! [`LEAD_GROUP`] messages and [`LEAD_BYTES`] of text: SQLite writes them to the WAL
//! without `fsync` (WAL mode, `synchronous = NORMAL`).
//!
//! **If the thread panics** (in a callback, say), the store closes: what has queued and
//! every later write fail as closed, as they did when the thread was a channel's reader.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};

use rusqlite::Connection;

use super::{
    Lead, Leader, StoreError,
    checkpoint::{Checkpointer, WalPages},
    sqlite::{Write, commit},
};

/// Most writes one transaction takes.
const MAX_GROUP: usize = 4096;
/// Most writes a caller's lead commits; the rest go to the thread.
const LEAD_GROUP: usize = 64;
/// Most text a caller's lead commits (a larger message goes to the thread alone): with
/// [`LEAD_GROUP`], what bounds the WAL pages one lead adds.
const LEAD_BYTES: usize = 256 * 1024;

/// The write connection and its queue; see the module doc.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The writer thread, joined on close.
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the thread when it is handed the lead.
    handed_off: Condvar,
    /// The connection, locked by the leader while it commits.
    connection: Mutex<Committer>,
    /// The WAL's size after the last commit.
    wal: Arc<WalPages>,
}

#[derive(Default)]
struct Queue {
    writes: Vec<Write>,
    /// A leader is committing, or a caller holds the lead: a new write only queues.
    leading: bool,
    /// The lead is the thread's.
    handed_off: bool,
    /// Close has queued: later writes fail.
    closed: bool,
}

/// The write connection, and the failure that stops it.
struct Committer {
    connection: Connection,
    /// Fail-stop: once a commit fails, every later write fails with its error.
    failure: Option<StoreError>,
}

impl Writer {
    /// Starts the writer thread over `connection`; `checkpointer` is stopped on close.
    pub(super) fn start(
        connection: Connection,
        checkpointer: Checkpointer,
    ) -> Result<Self, StoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            handed_off: Condvar::new(),
            connection: Mutex::new(Committer {
                connection,
                failure: None,
            }),
            wal: checkpointer.wal_pages(),
        });
        let thread = std::thread::Builder::new()
            .name("confab-store-writer".into())
            .spawn({
                let shared = shared.clone();
                move || shared.thread_loop(checkpointer)
            })
            .map_err(|e| StoreError::io("cannot start the writer thread", e))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a message; the lead comes back when no one else is committing.
    pub(super) fn append(&self, write: Write) -> Lead {
        let large = write.text_bytes() > LEAD_BYTES;
        let Some(mut queue) = self.shared.push(write) else {
            return Lead::none();
        };
        if large || self.shared.wal.near_hard_point() {
            self.shared.hand_off(queue);
            return Lead::none();
        }
        queue.leading = true;
        Lead::to(self.shared.clone())
    }

    /// Queues any other write, for the thread to commit.
    pub(super) fn queue(&self, write: Write) {
        if let Some(queue) = self.shared.push(write) {
            self.shared.hand_off(queue);
        }
    }

    /// Waits until no one leads (the thread has let go of the lead it was handed), so that
    /// the next message's caller leads.
    #[cfg(test)]
    pub(super) fn wait_idle(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.shared.queue().leading {
            assert!(
                std::time::Instant::now() < deadline,
                "the lead was never let go"
            );
            std::thread::yield_now();
        }
    }

    /// Queues the close and waits for the thread to commit what came before it,
    /// checkpoint and exit.
    pub(super) fn close(&self, close: Write) {
        self.queue(close);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the store writer panicked");
        }
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every update under this lock is a push, a take or a flag: a poisoned queue is
        // still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connection(&self) -> MutexGuard<'_, Committer> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `write` (or fails it, once closed); the queue if no one leads, for the
    /// caller to take the lead or hand it off.
    fn push(&self, write: Write) -> Option<MutexGuard<'_, Queue>> {
        let mut queue = self.queue();
        if queue.closed {
            drop(queue);
            write.done(Err(StoreError::Closed));
            return None;
        }
        if matches!(write, Write::Close(_)) {
            queue.closed = true;
        }
        queue.writes.push(write);
        (!queue.leading).then_some(queue)
    }

    /// Gives the lead to the thread.
    fn hand_off(&self, mut queue: MutexGuard<'_, Queue>) {
        queue.leading = true;
        queue.handed_off = true;
        drop(queue);
        self.handed_off.notify_one();
    }

    /// The thread: waits for the lead, commits until the queue is empty, and after the
    /// close, stops the checkpoints and truncates the WAL.
    fn thread_loop(&self, checkpointer: Checkpointer) {
        let _unwinding = CloseOnPanic(self);
        let mut queue = self.queue();
        loop {
            while !queue.handed_off {
                queue = self
                    .handed_off
                    .wait(queue)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if queue.writes.is_empty() {
                queue.handed_off = false;
                queue.leading = false;
                continue;
            }
            let take = queue.writes.len().min(MAX_GROUP);
            let group: Vec<Write> = queue.writes.drain(..take).collect();
            drop(queue);
            let closing = group.iter().any(|w| matches!(w, Write::Close(_)));
            let mut connection = self.connection();
            connection.apply(group);
            if closing {
                let connection = &mut connection.connection;
                checkpointer.stop(connection);
                if let Err(error) = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                    tracing::warn!(%error, "checkpoint at close failed");
                }
                return;
            }
            drop(connection);
            queue = self.queue();
        }
    }
}

impl Leader for Shared {
    /// A caller's lead: commits what has queued (up to [`LEAD_GROUP`] writes), then gives
    /// up the lead, or hands it to the thread when more is queued.
    fn lead(&self) {
        let _unwinding = HandOffOnPanic(self);
        let mut connection = self.connection();
        let group: Vec<Write> = {
            let mut queue = self.queue();
            // Messages only (a close that queued meanwhile must end on the thread), and no
            // more than the bounds: the WAL must not reach its hard point in a lead.
            let mut bytes = 0;
            let take = queue
                .writes
                .iter()
                .take(LEAD_GROUP)
                .take_while(|w| {
                    bytes += w.text_bytes();
                    matches!(w, Write::Message(..)) && bytes <= LEAD_BYTES
                })
                .count();
            queue.writes.drain(..take).collect()
        };
        connection.apply(group);
        drop(connection);
        let mut queue = self.queue();
        if queue.writes.is_empty() {
            queue.leading = false;
        } else {
            self.hand_off(queue);
        }
    }

    fn decline(&self) {
        self.hand_off(self.queue());
    }
}

/// A caller's lead goes to the thread if the caller panics while it holds it (in a
/// callback, say): otherwise every later write would queue behind a lead no one holds.
struct HandOffOnPanic<'a>(&'a Shared);

impl Drop for HandOffOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.hand_off(self.0.queue());
        }
    }
}

/// If the thread panics (in a callback, say), the store closes: what has queued, and every
/// later write, fails as closed instead of waiting for a thread that is gone.
struct CloseOnPanic<'a>(&'a Shared);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let orphans = {
            let mut queue = self.0.queue();
            queue.closed = true;
            queue.leading = true;
            std::mem::take(&mut queue.writes)
        };
        for write in orphans {
            write.done(Err(StoreError::Closed));
        }
    }
}

impl Committer {
    /// Commits `group` in one transaction (or fails it, once stopped) and reports to each
    /// write in order.
    fn apply(&mut self, group: Vec<Write>) {
        let result = match &self.failure {
            Some(error) => Err(error.clone()),
            None => commit(&mut self.connection, &group),
        };
        if let (Err(error), None) = (&result, &self.failure) {
            tracing::error!(%error, "store commit failed; refusing further writes");
            self.failure = Some(error.clone());
        }
        for write in group {
            write.done(result.clone());
        }
    }
}
