//! [`Writer`]: the SQLite store's one write connection, and who commits on it.
//!
//! Writes queue in order, and one leader at a time commits what has queued, in one
//! transaction, then calls each write's callback in order.
//!
//! **Leader commits.** A caller whose write finds no commit under way leads: it commits
//! the queue itself, on its own thread, and returns. A message at light load therefore
//! costs no thread switch. Before, each one woke the writer thread and was woken back by
//! it; on one core, that hand-off was a fifth of the CPU at a stream's top send rate (a
//! stream's sends commit one at a time: see BENCHMARKS.md).
//!
//! **The writer thread** leads whenever a caller should not:
//! - when writes queued up while a caller committed: they are handed to the thread, so a
//!   caller commits one group and no more, and under load groups grow on the thread as
//!   they did before;
//! - for retention and close, which can take long: they never block a caller.
//!
//! A caller that leads blocks its thread (a runtime worker) for one commit: SQLite writes
//! the group to the WAL without `fsync` (WAL mode, `synchronous = NORMAL`), and
//! checkpoints run elsewhere ([`super::checkpoint`]).

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};

use rusqlite::Connection;

use super::{
    StoreError,
    checkpoint::Checkpointer,
    sqlite::{Write, commit},
};

/// Most writes one transaction takes.
pub(super) const MAX_GROUP: usize = 4096;

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
}

#[derive(Default)]
struct Queue {
    writes: Vec<Write>,
    /// A leader is committing (or about to): a new write only queues.
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

    /// Queues `write`, and commits it here when no one else is committing.
    pub(super) fn write(&self, write: Write) {
        let mut queue = self.shared.queue();
        if queue.closed {
            drop(queue);
            write.done(Err(StoreError::Closed));
            return;
        }
        let heavy = write.is_heavy();
        if matches!(write, Write::Close(_)) {
            queue.closed = true;
        }
        queue.writes.push(write);
        if queue.leading {
            return;
        }
        queue.leading = true;
        if heavy {
            self.shared.hand_off(queue);
            return;
        }
        drop(queue);
        self.shared.lead_once();
    }

    /// Queues the close and waits for the thread to commit what came before it,
    /// checkpoint and exit.
    pub(super) fn close(&self, close: Write) {
        self.write(close);
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

    /// Gives the lead (held by the caller, with `queue`) to the thread.
    fn hand_off(&self, mut queue: MutexGuard<'_, Queue>) {
        queue.handed_off = true;
        drop(queue);
        self.handed_off.notify_one();
    }

    /// A caller's lead: commits what has queued, unless that holds a heavy write, then
    /// gives up the lead, or hands it to the thread when more has queued meanwhile.
    fn lead_once(&self) {
        let _unwinding = HandOffOnPanic(self);
        let mut connection = self.connection();
        let group = {
            let mut queue = self.queue();
            if queue.writes.iter().any(Write::is_heavy) {
                return self.hand_off(queue);
            }
            std::mem::take(&mut queue.writes)
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

    /// The thread: waits for the lead, commits until the queue is empty, and after the
    /// close, stops the checkpoints and truncates the WAL.
    fn thread_loop(&self, checkpointer: Checkpointer) {
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
