//! [`Presence`]: a user's presence in a room through one stream; dropping it leaves, so
//! however a session ends (leave, stream end, dropped connection, shutdown, panic) the
//! user leaves the room at once.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use futures::{FutureExt as _, Stream, future::BoxFuture};
use tokio::sync::watch;

use super::Room;
use crate::{engine::Removal, error::ChatError};

/// A user's presence in a room through one stream. Dropping it leaves.
#[derive(Debug)]
pub struct Presence {
    room: Arc<Room>,
    user: String,
    /// Becomes `Some` when the owner puts the user out.
    removed: watch::Receiver<Option<Arc<Removal>>>,
}

impl Presence {
    pub(super) fn new(
        room: Arc<Room>,
        user: String,
        removed: watch::Receiver<Option<Arc<Removal>>>,
    ) -> Self {
        Self {
            room,
            user,
            removed,
        }
    }

    /// Whether `new` may be in this presence's room (checked for every room before a
    /// rename changes any).
    pub fn admits(&self, new: &str) -> Result<(), ChatError> {
        self.room.admit(new)
    }

    /// This stream's user is `new` from now on (see `Room::rename`).
    pub fn rename(&mut self, new: &str) {
        self.removed = self.room.rename(&self.user, new);
        new.clone_into(&mut self.user);
    }

    /// The owner's kick or ban of the user, as a stream of at most one item (nothing,
    /// otherwise), to merge into the room's delivery stream. That stream is polled on every
    /// delivery, so this looks at the channel's version (an atomic load) and polls the wait
    /// only when that changed or the waker did.
    pub fn removals(&self) -> Removals {
        Removals::new(self.removed.clone())
    }
}

/// Resolves when `removed` says the user was put out (never, otherwise).
async fn removed(mut removed: watch::Receiver<Option<Arc<Removal>>>) -> Arc<Removal> {
    loop {
        if let Some(removal) = removed.borrow_and_update().clone() {
            return removal;
        }
        if removed.changed().await.is_err() {
            // The member left and its channel is gone: nothing more will come.
            return std::future::pending().await;
        }
    }
}

/// See [`Presence::removals`].
pub struct Removals {
    /// Only for its version: has the removal channel changed since the stream began?
    changes: watch::Receiver<Option<Arc<Removal>>>,
    /// The wait, until it has yielded.
    removed: Option<BoxFuture<'static, Arc<Removal>>>,
    /// The waker the wait was last polled with.
    waker: Option<Waker>,
}

impl Removals {
    fn new(channel: watch::Receiver<Option<Arc<Removal>>>) -> Self {
        Self {
            removed: Some(removed(channel.clone()).boxed()),
            changes: channel,
            waker: None,
        }
    }
}

impl Stream for Removals {
    type Item = Arc<Removal>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(removed) = this.removed.as_mut() else {
            return Poll::Ready(None);
        };
        // `has_changed` is an error once the channel is gone (a rename replaces it):
        // then the wait decides, as it does when anything changed.
        let unchanged = matches!(this.changes.has_changed(), Ok(false));
        let same_waker = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if unchanged && same_waker {
            return Poll::Pending; // the wait is registered with this very waker
        }
        match removed.poll_unpin(cx) {
            Poll::Ready(removal) => {
                this.removed = None;
                Poll::Ready(Some(removal))
            }
            Poll::Pending => {
                this.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.room.exit(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::Wake,
    };

    use confab::pb;

    use super::*;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn removal() -> Option<Arc<Removal>> {
        Some(Arc::new(Removal {
            reason: pb::LeaveReason::Kicked,
            by: "owner".into(),
            message: String::new(),
        }))
    }

    fn poll(removals: &mut Removals, waker: &Waker) -> Poll<Option<Arc<Removal>>> {
        Pin::new(removals).poll_next(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_removal_wakes_the_latest_waker_and_is_yielded_once() {
        let (tx, rx) = watch::channel(None);
        let mut removals = Removals::new(rx);
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(poll(&mut removals, &first_waker).is_pending());
        assert!(poll(&mut removals, &first_waker).is_pending());
        // Another waker (a cursor set switching to its ready queue) is registered anew.
        assert!(poll(&mut removals, &second_waker).is_pending());
        tx.send(removal()).unwrap();
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the latest waker is woken"
        );
        assert!(
            matches!(poll(&mut removals, &second_waker), Poll::Ready(Some(r)) if r.by == "owner")
        );
        assert!(matches!(
            poll(&mut removals, &second_waker),
            Poll::Ready(None)
        ));
    }

    #[test]
    fn a_removal_made_before_the_stream_is_yielded_at_once() {
        let (tx, rx) = watch::channel(None);
        tx.send(removal()).unwrap();
        let mut removals = Removals::new(rx);
        assert!(matches!(
            poll(&mut removals, Waker::noop()),
            Poll::Ready(Some(_))
        ));
    }
}
