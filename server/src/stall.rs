//! [`Watchdog`]: finds the server streams whose client has stopped reading.
//!
//! A stream's room events are pulled by its response body ([`crate::outbound::Events`]),
//! and hyper polls a body only while the client's HTTP/2 flow-control window is open. A
//! client that stops reading closes its window, and from then on nothing of the body runs:
//! a timer inside it would wake a task that does not poll it. So each stream has a
//! [`Watch`] that the body keeps current at almost no cost (one relaxed add and one store
//! per poll): how many times it was polled, and whether it has output hyper has not taken
//! (it was woken, or it just handed over an event and may have more).
//!
//! One task per server looks at every watch four times per stall timeout. A watch that had
//! output waiting and was not polled through a whole timeout is stalled: its stream's task
//! is told, and ends the stream with RESOURCE_EXHAUSTED (the client resumes from the last
//! seq it got). Idle streams cost nothing between looks: no timer per stream.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::Wake,
    time::Duration,
};

use dashmap::DashMap;
use futures::task::AtomicWaker;
use tokio::sync::Notify;

/// Looks per stall timeout: a stall is found between one timeout and 1¼ of it.
const LOOKS_PER_TIMEOUT: u64 = 4;

/// Every open stream's [`Watch`], and how long a stream may go unread.
#[derive(Debug)]
pub struct Watchdog {
    watches: DashMap<u64, Arc<Watch>>,
    next_id: AtomicU64,
    stall_timeout: Duration,
}

impl Watchdog {
    /// A watchdog that calls a stream stalled after `stall_timeout` unread.
    pub fn new(stall_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            watches: DashMap::new(),
            next_id: AtomicU64::new(0),
            stall_timeout,
        })
    }

    /// A watch for a new stream, looked at until its [`Watched`] is dropped.
    pub fn watch(self: &Arc<Self>) -> Watched {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::default());
        self.watches.insert(id, watch.clone());
        Watched {
            watch,
            id,
            watchdog: self.clone(),
        }
    }

    /// Looks at every watch four times per stall timeout, for as long as it runs.
    pub async fn run(self: Arc<Self>) {
        let period = (self.stall_timeout / LOOKS_PER_TIMEOUT as u32).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = 0;
        loop {
            tick.tick().await;
            look += 1;
            self.look(look);
        }
    }

    /// One look at every watch: the `look`th (counting from 1).
    fn look(&self, look: u64) {
        for watch in self.watches.iter() {
            if watch.look(look) {
                watch.stalled.notify_one();
            }
        }
    }

    /// How many streams are watched (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.watches.len()
    }
}

/// One stream's watch, as its body and its task share it. As a waker (the one the body
/// gives its sources) it marks output waiting and wakes hyper's task for the body.
#[derive(Debug, Default)]
pub struct Watch {
    /// Polls of the body so far.
    polls: AtomicU64,
    /// Whether the body has (or may have) output that hyper has not taken.
    waiting: AtomicBool,
    /// The waker of the task that polls the body.
    body: AtomicWaker,
    /// Told when the stream has stalled.
    stalled: Notify,
    /// The watchdog's own: the polls it saw at its last look.
    seen_polls: AtomicU64,
    /// The watchdog's own: the look since which output has waited unpolled (0: none).
    still_since: AtomicU64,
}

impl Watch {
    /// The body is being polled by the task of `waker`: nothing waits untaken until it
    /// says so.
    pub fn polled(&self, waker: &std::task::Waker) {
        self.body.register(waker);
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// The body handed over an event, and may have more: hyper polls again unless the
    /// client's window is closed.
    pub fn handed_over(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// Resolves when the watchdog finds the stream stalled.
    pub async fn stalled(&self) {
        self.stalled.notified().await;
    }

    /// Whether, at the `look`th look, output has waited unpolled for a whole timeout.
    fn look(&self, look: u64) -> bool {
        let polls = self.polls.load(Ordering::Relaxed);
        let moved = self.seen_polls.swap(polls, Ordering::Relaxed) != polls;
        if moved || !self.waiting.load(Ordering::Relaxed) {
            self.still_since.store(0, Ordering::Relaxed);
            return false;
        }
        match self.still_since.load(Ordering::Relaxed) {
            0 => {
                self.still_since.store(look, Ordering::Relaxed);
                false
            }
            since if look - since >= LOOKS_PER_TIMEOUT => {
                self.still_since.store(0, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.waiting.store(true, Ordering::Relaxed);
        self.body.wake();
    }
}

/// A stream's registration with the [`Watchdog`]: dropping it stops the looks.
#[derive(Debug)]
pub struct Watched {
    watch: Arc<Watch>,
    id: u64,
    watchdog: Arc<Watchdog>,
}

impl Watched {
    /// The stream's watch.
    pub fn watch(&self) -> &Arc<Watch> {
        &self.watch
    }

    /// How long the stream may go unread.
    pub fn stall_timeout(&self) -> Duration {
        self.watchdog.stall_timeout
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watchdog.watches.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use futures::FutureExt as _;

    use super::*;

    fn stalled_now(watch: &Watch) -> bool {
        watch.stalled().now_or_never().is_some()
    }

    #[test]
    fn output_left_unpolled_for_a_whole_timeout_is_a_stall() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let watched = watchdog.watch();
        let watch = watched.watch();
        watch.polled(Waker::noop());
        watch.handed_over();
        // Look 1 sees the poll; look 2 first sees it still; a whole timeout is four looks
        // more.
        for look in 1..=5 {
            watchdog.look(look);
            assert!(!stalled_now(watch), "look {look}");
        }
        watchdog.look(6);
        assert!(stalled_now(watch));
    }

    #[test]
    fn a_body_that_is_polled_or_has_nothing_waiting_is_not_stalled() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let watched = watchdog.watch();
        let watch = watched.watch().clone();
        for look in 1..=20 {
            // Woken and polled between every two looks: a reader keeping up.
            Waker::from(watch.clone()).wake_by_ref();
            watch.polled(Waker::noop());
            watch.handed_over();
            watchdog.look(look);
        }
        assert!(!stalled_now(&watch));
        // Polled, then nothing to send for a long time: an idle stream.
        watch.polled(Waker::noop());
        for look in 21..=40 {
            watchdog.look(look);
        }
        assert!(!stalled_now(&watch));
        // A wake it is not polled for starts the count.
        Waker::from(watch.clone()).wake_by_ref();
        for look in 41..=45 {
            watchdog.look(look);
        }
        assert!(stalled_now(&watch));
    }

    #[test]
    fn a_poll_within_the_timeout_starts_the_count_again() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let watched = watchdog.watch();
        let watch = watched.watch();
        watch.handed_over();
        for look in 1..=3 {
            watchdog.look(look);
        }
        watch.polled(Waker::noop());
        watch.handed_over();
        for look in 4..=8 {
            watchdog.look(look);
            assert!(!stalled_now(watch), "look {look}");
        }
        watchdog.look(9);
        assert!(stalled_now(watch));
    }

    #[test]
    fn a_dropped_registration_is_looked_at_no_more() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let first = watchdog.watch();
        let second = watchdog.watch();
        assert_eq!(watchdog.len(), 2);
        drop(first);
        assert_eq!(watchdog.len(), 1);
        drop(second);
        assert_eq!(watchdog.len(), 0);
    }
}
