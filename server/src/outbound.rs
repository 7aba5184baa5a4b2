//! A server stream (`Chat`, `Subscribe`) in two halves: [`Events`], the response body
//! tonic is handed at once, and [`Outbound`], which the stream's task keeps.
//!
//! **Room events go straight from the cursors to the body.** The body holds (shared with
//! the task) the cursors of the rooms the stream reads, and pulls the next event when hyper
//! polls it, which hyper does only while the client's HTTP/2 flow-control window is open.
//! So a delivery wakes hyper's task for the stream and nothing else, and a client that
//! stops reading stops its cursors: it slows nobody, and nothing piles up in memory (a
//! cursor that falls off its room's ring reads on from the store).
//!
//! **The task's own words go through a channel** the body reads first: replies to commands,
//! errors, and the stream's last words. Two of its slots are reserved when it is made, for
//! the reconnect notice and the final status, so those always get through, in order after
//! everything already queued, even to a client that has stopped reading. While the task
//! applies a command it [`hold`](Outbound::hold)s the rooms, as it did when it pulled the
//! events itself: a command's reply goes out before any room event the command caused (a
//! `Joined` before the history after it, an `Ack` before the message it acks).
//!
//! **Stalls.** A body that hyper stops polling cannot time itself out, so the task ends a
//! stalled stream when the server's [`Watchdog`] finds it (the client read nothing for
//! the stall timeout), and every wait of its own for the channel is bounded by the same
//! timeout and watches the server's shutdown. Either way the client gets RESOURCE_EXHAUSTED
//! and resumes from the last seq it got.
//!
//! A channel holds its first block of 32 slots for as long as the stream is open, idle or
//! not, so a slot is kept to two words ([`Slot`]): a room's message waits inline as the
//! `Arc` it already is; any other event is boxed.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Wake as _, Waker},
};

use confab::{ChatMessage, pb};
use futures::Stream;
use tokio::sync::{
    Notify,
    mpsc::{self, OwnedPermit, error::TrySendError},
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    cursor::{Delivery, DeliveryStream},
    cursor_set::CursorSet,
    engine::Removal,
    error::ChatError,
    hub::RoomEvent,
    metrics::Metrics,
    stall::{Watch, Watchdog, Watched},
};

/// Replies a stream holds before its task waits for the client to read.
pub const OUTBOUND_BUFFER: usize = 32;

/// How long a client should wait before reconnecting after a shutdown.
pub const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a stream's task stopped.
#[derive(Debug)]
pub enum End {
    /// The client closed its side (or its request stream ended): finish cleanly.
    ClientDone,
    /// The client is gone (connection dropped, response stream released).
    ClientGone,
    /// The server is shutting down: tell the client to reconnect, end with UNAVAILABLE.
    Shutdown,
    /// The stream failed: end with this status.
    Failed(Status),
}

/// A server stream's response type: a room's message is one of its events.
pub trait Event: Send + Sized + 'static {
    /// The event if it is just a room's message; otherwise the event itself, back.
    fn into_message(self) -> Result<ChatMessage, Self>;
    /// A room's message as an event.
    fn from_message(message: ChatMessage) -> Self;
    /// A room's delivery as an event of this stream, if it carries that kind.
    fn from_delivery(room: &str, delivery: Delivery) -> Option<Self>;
}

impl Event for pb::ChatResponse {
    fn into_message(self) -> Result<ChatMessage, Self> {
        match self {
            Self {
                request_id: 0,
                event: Some(pb::chat_response::Event::Message(message)),
            } => Ok(message),
            other => Err(other),
        }
    }

    fn from_message(message: ChatMessage) -> Self {
        Self {
            request_id: 0,
            event: Some(pb::chat_response::Event::Message(message)),
        }
    }

    fn from_delivery(room: &str, delivery: Delivery) -> Option<Self> {
        use pb::chat_response::Event;
        let event = match delivery {
            Delivery::Event(RoomEvent::Message(message)) => Event::Message(message),
            Delivery::Event(RoomEvent::Presence(presence)) => Event::Presence((*presence).clone()),
            Delivery::Event(RoomEvent::Typing(typing)) => Event::Typing((*typing).clone()),
            Delivery::Event(RoomEvent::Updated(update)) => Event::RoomUpdated((*update).clone()),
            // A cursor turns the ring's reset into `Delivery::Reset`, with the reader's place.
            Delivery::Event(RoomEvent::Reset(epoch)) => Event::Gap(pb::HistoryGap {
                room: room.to_owned(),
                reset: true,
                epoch,
                ..Default::default()
            }),
            Delivery::Gap { .. } | Delivery::Reset { .. } => {
                Event::Gap(delivery.history_gap(room)?)
            }
            Delivery::Removed(removal) => Event::Left(pb::Left {
                room: room.to_owned(),
                reason: removal.reason as i32,
                by: removal.by.clone(),
                message: removal.message.clone(),
            }),
        };
        Some(Self {
            request_id: 0,
            event: Some(event),
        })
    }
}

impl Event for pb::SubscribeResponse {
    fn into_message(self) -> Result<ChatMessage, Self> {
        match self {
            Self {
                event: Some(pb::subscribe_response::Event::Message(message)),
            } => Ok(message),
            other => Err(other),
        }
    }

    fn from_message(message: ChatMessage) -> Self {
        Self {
            event: Some(pb::subscribe_response::Event::Message(message)),
        }
    }

    fn from_delivery(room: &str, delivery: Delivery) -> Option<Self> {
        use pb::subscribe_response::Event;
        let event = match delivery {
            Delivery::Event(RoomEvent::Message(message)) => Event::Message(message),
            Delivery::Gap { .. } | Delivery::Reset { .. } => {
                Event::Gap(delivery.history_gap(room)?)
            }
            // A subscription is a read-only tail of messages (and has no presence to be put
            // out of); a cursor turns the ring's reset into `Delivery::Reset`.
            Delivery::Event(
                RoomEvent::Presence(_)
                | RoomEvent::Typing(_)
                | RoomEvent::Updated(_)
                | RoomEvent::Reset(_),
            )
            | Delivery::Removed(_) => return None,
        };
        Some(Self { event: Some(event) })
    }
}

/// An event as it waits in the channel: two words whatever the event.
enum Slot<T> {
    Message(ChatMessage),
    Other(Box<T>),
}

impl<T: Event> Slot<T> {
    fn pack(event: T) -> Self {
        match event.into_message() {
            Ok(message) => Self::Message(message),
            Err(other) => Self::Other(Box::new(other)),
        }
    }

    fn unpack(self) -> T {
        match self {
            Self::Message(message) => T::from_message(message),
            Self::Other(event) => *event,
        }
    }
}

/// What a stream's body and its task share.
struct Shared {
    rooms: Mutex<Rooms>,
    /// Told when the body has put the client out of a room.
    put_out: Notify,
    /// The body's polls and waiting output, for the watchdog; as a waker, the body's.
    watch: Arc<Watch>,
}

/// The rooms a stream reads, as its body pulls from them.
#[derive(Default)]
struct Rooms {
    cursors: CursorSet,
    /// While the task applies a command, the body takes no room event.
    held: bool,
    /// Rooms whose owner put the client out, for the task to leave.
    put_out: Vec<(Arc<str>, Arc<Removal>)>,
}

impl Shared {
    fn rooms(&self) -> MutexGuard<'_, Rooms> {
        // Every update under the lock is one insert, removal or flag: a poisoned set is
        // still a consistent one.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the body to look at its rooms again.
    fn wake_body(&self) {
        self.watch.wake_by_ref();
    }
}

/// The response body: the task's words first, then the rooms' events.
pub struct Events<T> {
    rx: mpsc::Receiver<Result<Slot<T>, Status>>,
    shared: Arc<Shared>,
    /// The waker the body's sources get: it marks output waiting, then wakes hyper's task.
    waker: Waker,
}

impl<T: Event> Stream for Events<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let shared = &*this.shared;
        shared.watch.polled(cx.waker());
        let mut cx = Context::from_waker(&this.waker);
        match this.rx.poll_recv(&mut cx) {
            Poll::Ready(Some(slot)) => {
                shared.watch.handed_over();
                return Poll::Ready(Some(slot.map(Slot::unpack)));
            }
            // The task has ended and said all it had to say.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let mut rooms = shared.rooms();
        if rooms.held {
            return Poll::Pending; // the task wakes the body when it lets go
        }
        loop {
            match Pin::new(&mut rooms.cursors).poll_next(&mut cx) {
                Poll::Ready(Some((room, Ok(delivery)))) => {
                    if let Delivery::Removed(removal) = &delivery {
                        rooms.cursors.remove(&room);
                        rooms.put_out.push((room.clone(), removal.clone()));
                        shared.put_out.notify_one();
                    }
                    if let Some(event) = T::from_delivery(&room, delivery) {
                        shared.watch.handed_over();
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
                // A store failure: the stream ends with it (and the task, seeing the body
                // gone, ends too).
                Poll::Ready(Some((_, Err(error)))) => return Poll::Ready(Some(Err(error.into()))),
                // No rooms yet: the task wakes the body when it adds one.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The task's half of a server stream of `T`.
pub struct Outbound<T> {
    /// Replies to the client; the last item may be an error status that ends the call.
    tx: mpsc::Sender<Result<Slot<T>, Status>>,
    /// Two reserved slots for the last words.
    farewell: [OwnedPermit<Result<Slot<T>, Status>>; 2],
    /// The rooms, the watch, and the put-out notices, shared with the body.
    shared: Arc<Shared>,
    /// The stream's place in the watchdog's rounds (and the stall timeout).
    watched: Watched,
    /// The server's drain signal.
    shutdown: CancellationToken,
    /// Where a stalled client is counted.
    metrics: Arc<Metrics>,
}

impl<T: Event> Outbound<T> {
    /// A new stream reading `cursors`: the `Outbound` for the task, the [`Events`] for
    /// tonic.
    pub fn channel(
        shutdown: CancellationToken,
        watchdog: &Arc<Watchdog>,
        metrics: Arc<Metrics>,
        cursors: CursorSet,
    ) -> (Self, Events<T>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER + 2);
        let reserve = || {
            tx.clone()
                .try_reserve_owned()
                .expect("a new channel has room for its reserved slots")
        };
        let farewell = [reserve(), reserve()];
        let watched = watchdog.watch();
        let shared = Arc::new(Shared {
            rooms: Mutex::new(Rooms {
                cursors,
                ..Rooms::default()
            }),
            put_out: Notify::new(),
            watch: watched.watch().clone(),
        });
        let events = Events {
            rx,
            waker: Waker::from(shared.watch.clone()),
            shared: shared.clone(),
        };
        let out = Self {
            tx,
            farewell,
            shared,
            watched,
            shutdown,
            metrics,
        };
        (out, events)
    }

    /// Sends one event, waiting while the client is not reading (up to the stall timeout).
    pub async fn send(&self, event: T) -> Result<(), End> {
        // The usual case, a client keeping up: the event fits at once, with no timer to
        // arm and nothing to select over.
        let event = match self.tx.try_send(Ok(Slot::pack(event))) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(End::ClientGone),
            Err(TrySendError::Full(event)) => event,
        };
        let timeout = self.watched.stall_timeout();
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
            sent = tokio::time::timeout(timeout, self.tx.send(event)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::ClientGone),
                Err(_) => Err(self.stall()),
            },
        }
    }

    /// Resolves, with how the stream ends, when the watchdog finds the client stalled.
    pub async fn stalled(&self) -> End {
        self.shared.watch.stalled().await;
        self.stall()
    }

    /// Counts a client that read nothing for the stall timeout, and ends its stream.
    fn stall(&self) -> End {
        let timeout = self.watched.stall_timeout();
        self.metrics.slow_reader_disconnects.inc();
        tracing::info!(?timeout, "ending a stream whose client stopped reading");
        End::Failed(
            ChatError::ResourceExhausted {
                description: format!(
                    "the client read nothing for {timeout:?}; resume after the last seq received"
                ),
                retry_after: None,
            }
            .into(),
        )
    }

    /// Starts delivering `room`'s events (after every reply sent so far).
    pub fn follow(&self, room: &str, stream: DeliveryStream) {
        self.shared.rooms().cursors.insert(room, stream);
        self.shared.wake_body();
    }

    /// Stops delivering `room`'s events; false if they were not being delivered.
    pub fn unfollow(&self, room: &str) -> bool {
        self.shared.rooms().cursors.remove(room)
    }

    /// Holds the rooms' events back until the guard is dropped: while a command is
    /// applied, so that its reply goes out before what it caused.
    pub fn hold(&self) -> Hold<'_> {
        self.shared.rooms().held = true;
        Hold(&self.shared)
    }

    /// Resolves when the body has put the client out of a room (see [`Self::put_out`]).
    pub async fn put_out_notice(&self) {
        self.shared.put_out.notified().await;
    }

    /// The rooms the client was put out of since the last call, and by whom: their events
    /// have stopped, and the client has been told.
    pub fn put_out(&self) -> Vec<(Arc<str>, Arc<Removal>)> {
        std::mem::take(&mut self.shared.rooms().put_out)
    }

    /// Resolves when the server starts draining.
    pub async fn shutdown(&self) {
        self.shutdown.cancelled().await;
    }

    /// Resolves when the client is gone (tonic dropped the response stream).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Ends the stream as `end` says: no more room events, then (for a shutdown) the
    /// `reconnect` notice, and the final status.
    pub fn finish(self, end: End, reconnect: impl FnOnce() -> T) {
        drop(std::mem::take(&mut self.shared.rooms().cursors));
        let [first, second] = self.farewell;
        match end {
            End::ClientDone | End::ClientGone => {}
            End::Shutdown => {
                first.send(Ok(Slot::pack(reconnect())));
                second.send(Err(ChatError::ShuttingDown.into()));
            }
            End::Failed(status) => {
                first.send(Err(status));
            }
        }
    }
}

/// Rooms held back while a command is applied; dropping it lets them go.
pub struct Hold<'a>(&'a Arc<Shared>);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.rooms().held = false;
        self.0.wake_body();
    }
}

/// The reconnect notice sent before a stream ends for a shutdown.
pub fn reconnect_notice() -> confab::pb::Reconnect {
    confab::pb::Reconnect {
        reason: "the server is shutting down".into(),
        retry_after: prost_types::Duration::try_from(RECONNECT_AFTER).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_two_words_and_gives_back_the_event_it_took() {
        assert_eq!(
            std::mem::size_of::<Result<Slot<pb::ChatResponse>, Status>>(),
            2 * std::mem::size_of::<usize>()
        );
        let message = ChatMessage::from(pb::ChatMessageRecord {
            room: "lobby".into(),
            seq: 7,
            text: "hi".into(),
            ..Default::default()
        });
        let pushed = pb::ChatResponse::from_message(message.clone());
        assert!(matches!(Slot::pack(pushed.clone()), Slot::Message(_)));
        assert_eq!(Slot::pack(pushed.clone()).unpack(), pushed);
        // A reply that carries a message keeps its request id.
        let reply = pb::ChatResponse {
            request_id: 3,
            ..pushed
        };
        assert!(matches!(Slot::pack(reply.clone()), Slot::Other(_)));
        assert_eq!(Slot::pack(reply.clone()).unpack(), reply);
        let pong = pb::ChatResponse {
            request_id: 4,
            event: Some(pb::chat_response::Event::Pong(pb::Pong::default())),
        };
        assert_eq!(Slot::pack(pong.clone()).unpack(), pong);
        let tailed = pb::SubscribeResponse::from_message(message);
        assert_eq!(Slot::pack(tailed.clone()).unpack(), tailed);
    }
}
