//! [`CursorSet`]: the delivery streams of every room a session (or subscription) reads, as one
//! stream of `(room, delivery)`, polled by readiness.
//!
//! A `StreamMap` polls every stream on every wake-up: a user in 64 rooms pays 64 polls
//! (each a broadcast-ring check under its locks) for one delivery, which is what saturated
//! the server in the many-rooms benchmark. `futures`' `SelectAll` polls only woken streams,
//! but allocates a task node per item and routes every wake through it, which cost the
//! one-room fan-out more than it saved. So this set does both:
//!
//! - with at most [`DIRECT`] streams, it polls each one with the caller's waker, in turn
//!   from where the last item came (as a `StreamMap` does, but fairly and without cloning
//!   the key);
//! - past that, each stream gets a waker of its own that puts the stream's id on a ready
//!   queue and wakes the caller; a poll takes ids off the queue and polls only those
//!   streams. Nothing is allocated per item or per wake.
//!
//! Invariant of the ready queue: a stream's `queued` flag is set exactly while its id is
//! on the queue (set before the push, cleared by the poll that pops it, before polling
//! the stream), so a wake is never lost and an id is queued at most once. Ids are never
//! reused, so a removed stream's id left on the queue is skipped.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures::{Stream, task::AtomicWaker};

use crate::{
    cursor::{Delivery, DeliveryStream},
    error::ChatError,
};

/// Up to this many streams are polled directly; more use the ready queue.
pub const DIRECT: usize = 4;

/// What [`CursorSet`] yields: the room, and its next delivery.
pub type Item = (Arc<str>, Result<Delivery, ChatError>);

/// The delivery streams of a set of rooms, keyed by room name.
#[derive(Default)]
pub struct CursorSet {
    entries: Vec<Entry>,
    next_id: u64,
    /// Where the next direct pass starts: just after the stream that last yielded.
    start: usize,
    /// Whether the ready queue is in use (and every stream's waker registered with it).
    queued_mode: bool,
    ready: Arc<Ready>,
}

struct Entry {
    room: Arc<str>,
    stream: DeliveryStream,
    wake: Arc<StreamWake>,
    waker: Waker,
}

/// Ids of streams that were woken, and the waker of whoever polls the set.
#[derive(Default)]
struct Ready {
    queue: Mutex<VecDeque<u64>>,
    parent: AtomicWaker,
}

impl Ready {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        // Only pushes and pops happen under the lock; a poisoned queue is still a queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's waker in queued mode.
struct StreamWake {
    id: u64,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl StreamWake {
    /// Puts the stream on the ready queue unless it is there already; true if it was put.
    fn enqueue(&self) -> bool {
        if self.queued.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.ready.queue().push_back(self.id);
        true
    }
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.enqueue() {
            self.ready.parent.wake();
        }
    }
}

impl std::fmt::Debug for CursorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorSet")
            .field(
                "rooms",
                &self.entries.iter().map(|e| &e.room).collect::<Vec<_>>(),
            )
            .field("queued_mode", &self.queued_mode)
            .finish_non_exhaustive()
    }
}

impl CursorSet {
    /// Adds `room`'s stream, replacing (and dropping) the one it had.
    pub fn insert(&mut self, room: &str, stream: DeliveryStream) {
        self.remove(room);
        let wake = Arc::new(StreamWake {
            id: self.next_id,
            queued: AtomicBool::new(false),
            ready: self.ready.clone(),
        });
        self.next_id += 1;
        if self.queued_mode {
            // A new stream may have items already: it must be polled once to register.
            wake.enqueue();
        }
        self.entries.push(Entry {
            room: room.into(),
            stream,
            waker: Waker::from(wake.clone()),
            wake,
        });
    }

    /// Drops `room`'s stream; false if there was none.
    pub fn remove(&mut self, room: &str) -> bool {
        match self.entries.iter().position(|e| *e.room == *room) {
            Some(index) => {
                self.entries.remove(index);
                true
            }
            None => false,
        }
    }

    /// Whether `room` has a stream here.
    pub fn contains(&self, room: &str) -> bool {
        self.entries.iter().any(|e| *e.room == *room)
    }

    /// Whether there are no streams.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many streams there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Polls every stream with the caller's waker, so that a `Pending` leaves each one
    /// registered with it.
    fn poll_direct(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let mut i = 0;
        while i < self.entries.len() {
            let index = (self.start + i) % self.entries.len();
            let entry = &mut self.entries[index];
            match entry.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(delivery)) => {
                    self.start = index + 1;
                    return Poll::Ready(Some((entry.room.clone(), delivery)));
                }
                // An ended stream leaves the set. Removing it shifts the others, so the
                // pass starts again there: none is left unpolled (rare, and bounded by
                // the number of streams).
                Poll::Ready(None) => {
                    self.entries.remove(index);
                    self.start = index;
                    i = 0;
                }
                Poll::Pending => i += 1,
            }
        }
        if self.entries.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn poll_queued(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.ready.parent.register(cx.waker());
        if !self.queued_mode {
            // Every stream's waker so far was the caller's: poll each once with its own.
            self.queued_mode = true;
            let mut queue = self.ready.queue();
            queue.clear();
            for entry in &self.entries {
                entry.wake.queued.store(true, Ordering::Release);
                queue.push_back(entry.wake.id);
            }
        }
        loop {
            let Some(id) = self.ready.queue().pop_front() else {
                return if self.entries.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            // Ids only grow and entries are pushed in id order, so they are sorted.
            let Ok(index) = self.entries.binary_search_by_key(&id, |e| e.wake.id) else {
                continue; // removed since it was woken
            };
            let Entry {
                room,
                stream,
                wake,
                waker,
            } = &mut self.entries[index];
            wake.queued.store(false, Ordering::Release);
            match stream.as_mut().poll_next(&mut Context::from_waker(waker)) {
                Poll::Ready(Some(delivery)) => {
                    // It may have more: back of the queue, so ready rooms take turns.
                    wake.enqueue();
                    return Poll::Ready(Some((room.clone(), delivery)));
                }
                Poll::Ready(None) => {
                    self.entries.remove(index);
                }
                Poll::Pending => {}
            }
        }
    }
}

impl Stream for CursorSet {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        if this.entries.len() <= DIRECT {
            this.queued_mode = false;
            this.poll_direct(cx)
        } else {
            this.poll_queued(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt as _, StreamExt as _, channel::mpsc};

    use super::*;

    /// A stream fed by hand: its sender, and the stream as a session holds it.
    fn fed() -> (mpsc::UnboundedSender<Delivery>, DeliveryStream) {
        let (tx, rx) = mpsc::unbounded();
        (tx, Box::pin(rx.map(Ok)))
    }

    fn gap(n: u64) -> Delivery {
        Delivery::Gap { from: n, to: n }
    }

    fn seq_of(item: Item) -> (String, u64) {
        match item {
            (room, Ok(Delivery::Gap { from, .. })) => (room.to_string(), from),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Everything ready now, without waiting.
    fn drain(cursors: &mut CursorSet) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Some(Some(item)) = cursors.next().now_or_never() {
            out.push(seq_of(item));
        }
        out
    }

    #[test]
    fn every_item_of_every_room_comes_out_once_in_order_in_both_modes() {
        for rooms in [1, DIRECT, DIRECT + 1, 64] {
            let mut cursors = CursorSet::default();
            let feeds: Vec<_> = (0..rooms)
                .map(|r| {
                    let (tx, stream) = fed();
                    cursors.insert(&format!("room-{r}"), stream);
                    tx
                })
                .collect();
            assert!(drain(&mut cursors).is_empty());
            for n in 0..10 {
                for feed in &feeds {
                    feed.unbounded_send(gap(n)).unwrap();
                }
            }
            let out = drain(&mut cursors);
            assert_eq!(out.len(), rooms * 10, "{rooms} rooms");
            for r in 0..rooms {
                let seqs: Vec<u64> = out
                    .iter()
                    .filter(|(room, _)| *room == format!("room-{r}"))
                    .map(|(_, n)| *n)
                    .collect();
                assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "{rooms} rooms, room {r}");
            }
            // Ready rooms take turns: the first `rooms` items are one from each.
            let mut first: Vec<&String> = out[..rooms].iter().map(|(room, _)| room).collect();
            first.sort();
            first.dedup();
            assert_eq!(first.len(), rooms, "{rooms} rooms take turns");
        }
    }

    #[tokio::test]
    async fn a_wake_of_one_room_among_many_wakes_the_reader() {
        let mut cursors = CursorSet::default();
        let mut feeds = Vec::new();
        for r in 0..20 {
            let (tx, stream) = fed();
            cursors.insert(&format!("room-{r}"), stream);
            feeds.push(tx);
        }
        assert!(cursors.next().now_or_never().is_none());
        let reader = tokio::spawn(async move {
            let item = cursors.next().await.unwrap();
            (seq_of(item), cursors)
        });
        tokio::task::yield_now().await;
        feeds[13].unbounded_send(gap(7)).unwrap();
        let ((room, n), mut cursors) = reader.await.unwrap();
        assert_eq!((room.as_str(), n), ("room-13", 7));
        // A room joined while the queue is in use is polled even though nothing woke it.
        let (tx, stream) = fed();
        tx.unbounded_send(gap(5)).unwrap();
        cursors.insert("late", stream);
        assert_eq!(drain(&mut cursors), [("late".to_owned(), 5)]);
        // And again, after the set has gone down to direct polling and back up.
        for r in 0..17 {
            assert!(cursors.remove(&format!("room-{r}")));
        }
        assert!(cursors.next().now_or_never().is_none());
        for (r, feed) in feeds.iter_mut().enumerate().take(17) {
            let (tx, stream) = fed();
            cursors.insert(&format!("room-{r}"), stream);
            *feed = tx;
        }
        let reader = tokio::spawn(async move { seq_of(cursors.next().await.unwrap()) });
        tokio::task::yield_now().await;
        feeds[2].unbounded_send(gap(9)).unwrap();
        assert_eq!(reader.await.unwrap(), ("room-2".to_owned(), 9));
    }

    #[test]
    fn removed_and_ended_streams_leave_the_set() {
        for rooms in [3, 10] {
            let mut cursors = CursorSet::default();
            let mut feeds = Vec::new();
            for r in 0..rooms {
                let (tx, stream) = fed();
                cursors.insert(&format!("room-{r}"), stream);
                feeds.push(tx);
            }
            feeds[0].unbounded_send(gap(1)).unwrap();
            assert!(cursors.remove("room-0"));
            assert!(!cursors.remove("room-0"));
            assert!(!cursors.contains("room-0"));
            feeds[1].close_channel(); // ends room-1's stream
            feeds[2].unbounded_send(gap(2)).unwrap();
            assert_eq!(drain(&mut cursors), [("room-2".to_owned(), 2)]);
            assert_eq!(cursors.len(), rooms - 2, "{rooms} rooms");
            // Replacing a room's stream drops the old one.
            let (tx, stream) = fed();
            cursors.insert("room-2", stream);
            assert!(feeds[2].unbounded_send(gap(3)).is_err());
            tx.unbounded_send(gap(4)).unwrap();
            assert_eq!(drain(&mut cursors), [("room-2".to_owned(), 4)]);
        }
        let mut cursors = CursorSet::default();
        assert!(matches!(cursors.next().now_or_never(), Some(None)));
    }
}
