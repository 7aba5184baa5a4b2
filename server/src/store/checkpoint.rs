//! [`Checkpointer`]: the SQLite store's WAL is copied back into the database on a thread
//! of its own, so that a commit, and every ack queued behind it, does not wait for a
//! checkpoint (short of the WAL's bound, below).
//!
//! SQLite's automatic checkpoint runs inside the commit that takes the WAL past
//! `wal_autocheckpoint` pages: that commit copies a thousand pages into the database and
//! syncs it before it returns, and the writes queued behind it wait the while. That was
//! most of the SQLite engine's p99 at light load (rooms 1,000 × 10 at 2 msg/s each: p99
//! 10–12 ms, against 5 ms on the memory engine).
//!
//! Here the writer connection's WAL hook replaces the automatic checkpoint:
//! - at [`SOFT_PAGES`] it only signals this thread, which runs a PASSIVE checkpoint
//!   on a connection of its own. A passive checkpoint takes no lock that a writer needs,
//!   so commits go on while it copies.
//! - at [`HARD_PAGES`] the writer checkpoints inline, as SQLite would have. The WAL
//!   starts over only when a write finds every frame copied, and steady commits can keep
//!   the background copy one step behind forever. By then the background has copied
//!   nearly all of it, and the inline checkpoint copies only the tail. If the background
//!   is checkpointing at that moment (a slow sync, say), the inline one is skipped and
//!   the next commit tries again.
//! - at [`LIMIT_PAGES`] the writer waits for the background's checkpoint to end, copies
//!   everything and waits until no one reads the WAL, so that the next commit starts it
//!   over (a RESTART checkpoint): the WAL's bound, whatever the disk does. The wait is
//!   ours (the `turn` both take): SQLite returns BUSY at once, without its busy handler,
//!   to a checkpoint that finds another one running.

use std::{
    ffi::c_int,
    sync::{
        Arc, Condvar, Mutex, TryLockError,
        atomic::{AtomicI32, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
};

use rusqlite::{Connection, ErrorCode, hooks::Wal, wal::CheckpointMode};

use super::StoreError;

/// WAL pages at which the background checkpoint starts (SQLite's own default point).
pub(super) const SOFT_PAGES: c_int = 1000;
/// WAL pages added between two signals: each checkpoint syncs the WAL and the database,
/// so a busy writer should not start one per commit.
pub(super) const STEP_PAGES: c_int = SOFT_PAGES / 4;
/// WAL pages at which the writer checkpoints inline, if the lock is free.
pub(super) const HARD_PAGES: c_int = 4 * SOFT_PAGES;
/// WAL pages at which the writer waits for the lock to checkpoint: the WAL's bound.
pub(super) const LIMIT_PAGES: c_int = 2 * HARD_PAGES;
/// WAL pages below [`HARD_PAGES`] from which a commit is left to the writer thread: more
/// than one caller's commit can add (see `writer::LEAD_BYTES`).
const HARD_MARGIN: c_int = 512;

/// The background checkpoint thread of one store, fed by its writer connection's hook.
pub(super) struct Checkpointer {
    thread: JoinHandle<()>,
    done: Arc<Done>,
    wal: Arc<WalPages>,
}

/// The WAL's size in pages after the writer's last commit.
#[derive(Default)]
pub(super) struct WalPages(AtomicI32);

impl WalPages {
    /// Within [`HARD_MARGIN`] of [`HARD_PAGES`], or past it: a commit may checkpoint
    /// inline, or wait, which only the writer thread should do.
    pub(super) fn near_hard_point(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= HARD_PAGES - HARD_MARGIN
    }
}

/// How many background checkpoints have run; the store's tests wait on it.
#[derive(Default)]
pub(super) struct Done {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Done {
    fn one_more(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// Waits until more than `count` background checkpoints have run, or `limit` has
    /// passed; whether they had.
    #[cfg(test)]
    pub(super) fn wait_past(&self, count: u64, limit: std::time::Duration) -> bool {
        let done = self.count.lock().unwrap();
        let (done, _) = self
            .changed
            .wait_timeout_while(done, limit, |done| *done <= count)
            .unwrap();
        *done > count
    }
}

impl Checkpointer {
    /// Starts the thread on `connection`, a connection of its own to the writer's
    /// database, and installs the hook on `writer` (which turns SQLite's automatic
    /// checkpoint off on it).
    pub(super) fn attach(
        connection: Connection,
        writer: &mut Connection,
    ) -> Result<Self, StoreError> {
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        // One pending signal is enough: a checkpoint copies every frame there is.
        let (signal, signals) = mpsc::sync_channel(1);
        // Held by whoever checkpoints, so that the writer can wait for the background.
        let turn = Arc::new(Mutex::new(()));
        let done = Arc::new(Done::default());
        let thread = std::thread::Builder::new()
            .name("confab-store-checkpoint".into())
            .spawn({
                let (turn, done) = (turn.clone(), done.clone());
                move || checkpoint_loop(connection, signals, &turn, &done)
            })
            .map_err(|e| StoreError::io("cannot start the checkpoint thread", e))?;
        let mut hook = Hook::default();
        let size = Arc::new(WalPages::default());
        let wal_pages = size.clone();
        writer.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            wal_pages.0.store(pages, Ordering::Relaxed);
            on_commit(wal, pages, &signal, &turn, &mut hook);
            // An error from the hook would fail a statement whose commit already happened.
            Ok(())
        }))?;
        Ok(Self {
            thread,
            done,
            wal: size,
        })
    }

    /// The WAL's size, as the hook last saw it.
    pub(super) fn wal_pages(&self) -> Arc<WalPages> {
        self.wal.clone()
    }

    /// The count of background checkpoints.
    pub(super) fn done(&self) -> Arc<Done> {
        self.done.clone()
    }

    /// Takes the hook off `writer` (dropping its signal, which ends the thread) and waits
    /// for the thread, so that a checkpoint of the writer's own can follow.
    pub(super) fn stop(self, writer: &mut Connection) {
        if let Err(error) = writer.wal_hook(None::<fn(&mut Wal, c_int) -> rusqlite::Result<()>>) {
            tracing::warn!(%error, "cannot remove the WAL hook");
        }
        if self.thread.join().is_err() {
            tracing::error!("the store's checkpoint thread panicked");
        }
    }
}

/// What the writer's hook does after a commit.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Nothing,
    /// Wake the background checkpoint.
    Signal,
    /// Checkpoint on the writer, now, unless the background holds the lock.
    Inline,
    /// Checkpoint on the writer, waiting for the lock and for the WAL to be free to
    /// start over.
    Wait,
}

/// The hook's memory between commits: the WAL's size at the last signal.
#[derive(Debug, Default)]
struct Hook {
    signalled_at: c_int,
}

impl Hook {
    /// What to do once a commit has left the WAL `pages` long.
    fn after_commit(&mut self, pages: c_int) -> Action {
        if pages < self.signalled_at {
            self.signalled_at = 0; // the WAL started over
        }
        if pages >= LIMIT_PAGES {
            Action::Wait
        } else if pages >= HARD_PAGES {
            Action::Inline
        } else if pages >= SOFT_PAGES && pages >= self.signalled_at + STEP_PAGES {
            self.signalled_at = pages;
            Action::Signal
        } else {
            Action::Nothing
        }
    }
}

/// The writer's WAL hook: runs after each commit with the WAL's size in pages.
fn on_commit(
    wal: &mut Wal,
    pages: c_int,
    signal: &SyncSender<()>,
    turn: &Mutex<()>,
    hook: &mut Hook,
) {
    match hook.after_commit(pages) {
        Action::Nothing => {}
        Action::Signal => match signal.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::warn!("the checkpoint thread is gone");
            }
        },
        Action::Inline => {
            // The background is copying already: the next commit tries again.
            let _turn = match turn.try_lock() {
                Ok(turn) => turn,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            match wal.checkpoint() {
                Ok(()) => {}
                Err(error) if error.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {}
                Err(error) => tracing::warn!(%error, pages, "inline checkpoint failed"),
            }
        }
        Action::Wait => {
            let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = wal.checkpoint_v2(CheckpointMode::RESTART) {
                tracing::warn!(%error, pages, "the WAL is over its bound and cannot be copied");
            }
        }
    }
}

/// The checkpoint thread: one PASSIVE checkpoint per signal, until the hook is dropped.
fn checkpoint_loop(connection: Connection, signals: Receiver<()>, turn: &Mutex<()>, done: &Done) {
    while signals.recv().is_ok() {
        let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
        match connection.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok(_) => done.one_more(),
            Err(error) if error.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {}
            // The next signal tries again; the writer's checkpoint at the limit bounds the WAL.
            Err(error) => tracing::warn!(%error, "background checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_signals_from_the_soft_point_and_checkpoints_itself_only_at_the_hard_one() {
        let mut hook = Hook::default();
        assert_eq!(hook.after_commit(10), Action::Nothing);
        assert_eq!(hook.after_commit(SOFT_PAGES - 1), Action::Nothing);
        assert_eq!(hook.after_commit(SOFT_PAGES), Action::Signal);
        // Not on every commit: a checkpoint syncs two files.
        assert_eq!(hook.after_commit(SOFT_PAGES + 1), Action::Nothing);
        assert_eq!(
            hook.after_commit(SOFT_PAGES + STEP_PAGES - 1),
            Action::Nothing
        );
        assert_eq!(hook.after_commit(SOFT_PAGES + STEP_PAGES), Action::Signal);
        assert_eq!(hook.after_commit(HARD_PAGES - 1), Action::Signal);
        assert_eq!(hook.after_commit(HARD_PAGES), Action::Inline);
        assert_eq!(hook.after_commit(HARD_PAGES + 7), Action::Inline);
        assert_eq!(hook.after_commit(LIMIT_PAGES), Action::Wait);
    }

    #[test]
    fn a_wal_that_started_over_is_signalled_again_at_the_soft_point() {
        let mut hook = Hook::default();
        assert_eq!(hook.after_commit(SOFT_PAGES + 100), Action::Signal);
        assert_eq!(hook.after_commit(3), Action::Nothing);
        assert_eq!(hook.after_commit(SOFT_PAGES), Action::Signal);
    }
}
