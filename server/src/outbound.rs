//! [`Outbound`]: the sending half of a server stream (`Chat`, `Subscribe`), and how such
//! a stream ends.
//!
//! The handler returns the receiving half to tonic at once and a task feeds it. The
//! channel is small: tonic polls it only when HTTP/2 flow control lets the response
//! stream carry more, so when a client stops reading, `send` waits, the task stops pulling
//! from its cursors, and nothing piles up in memory. Every wait also watches the server's
//! shutdown, so a stalled client cannot hold a drain up, and is bounded by the stall
//! timeout: a client that reads nothing for that long is ended with RESOURCE_EXHAUSTED
//! and can resume from the last seq it got.
//!
//! Two slots of the channel are reserved when it is made, for the stream's last words
//! (the reconnect notice and the final status), so those always get through, in order
//! after everything already queued, even to a client that has stopped reading.
//!
//! A channel holds its first block of 32 slots for as long as the stream is open, idle or
//! not, so a slot is kept to two words ([`Slot`]): a room's message, which is what nearly
//! every event is, waits inline as the `Arc` it already is; any other event is boxed.
//! With the whole response in each slot (152 bytes), the block alone cost 4.8 KiB per
//! open stream.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use confab::{ChatMessage, pb};
use futures::Stream;
use tokio::sync::mpsc::{self, OwnedPermit, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{error::ChatError, metrics::Metrics};

/// Events a stream holds before its task waits for the client to read.
pub const OUTBOUND_BUFFER: usize = 32;

/// How long a client should wait before reconnecting after a shutdown.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);

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

/// The receiving half, handed to tonic as the response stream.
pub struct Events<T> {
    rx: mpsc::Receiver<Result<Slot<T>, Status>>,
}

impl<T: Event> Stream for Events<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx
            .poll_recv(cx)
            .map(|slot| slot.map(|slot| slot.map(Slot::unpack)))
    }
}

/// The sending half of a server stream of `T`.
pub struct Outbound<T> {
    /// Events to the client; the last item may be an error status that ends the call.
    tx: mpsc::Sender<Result<Slot<T>, Status>>,
    /// Two reserved slots for the last words.
    farewell: [OwnedPermit<Result<Slot<T>, Status>>; 2],
    /// The server's drain signal.
    shutdown: CancellationToken,
    /// How long one send may wait for a client that is not reading.
    stall_timeout: Duration,
    /// Where a stalled client is counted.
    metrics: std::sync::Arc<Metrics>,
}

impl<T: Event> Outbound<T> {
    /// A new stream: the `Outbound` for the task, the [`Events`] for tonic.
    pub fn channel(
        shutdown: CancellationToken,
        stall_timeout: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> (Self, Events<T>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER + 2);
        let reserve = || {
            tx.clone()
                .try_reserve_owned()
                .expect("a new channel has room for its reserved slots")
        };
        let farewell = [reserve(), reserve()];
        let out = Self {
            tx,
            farewell,
            shutdown,
            stall_timeout,
            metrics,
        };
        (out, Events { rx })
    }

    /// Sends one event, waiting while the client is not reading (up to the stall timeout).
    pub async fn send(&self, event: T) -> Result<(), End> {
        // The usual case, a client keeping up: the event fits at once, with no timer to
        // arm and nothing to select over (the hot path of every delivery).
        let event = match self.tx.try_send(Ok(Slot::pack(event))) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(End::ClientGone),
            Err(TrySendError::Full(event)) => event,
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
            sent = tokio::time::timeout(self.stall_timeout, self.tx.send(event)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::ClientGone),
                Err(_) => Err(self.stalled()),
            },
        }
    }

    /// Counts a client that read nothing for the stall timeout, and ends its stream.
    fn stalled(&self) -> End {
        self.metrics.slow_reader_disconnects.inc();
        tracing::info!(timeout = ?self.stall_timeout, "ending a stream whose client stopped reading");
        End::Failed(
            ChatError::ResourceExhausted {
                description: format!(
                    "the client read nothing for {:?}; resume after the last seq received",
                    self.stall_timeout
                ),
                retry_after: None,
            }
            .into(),
        )
    }

    /// Whether a [`send`](Self::send) now would not wait.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Resolves when the server starts draining.
    pub async fn shutdown(&self) {
        self.shutdown.cancelled().await;
    }

    /// Resolves when the client is gone (tonic dropped the response stream).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Ends the stream as `end` says; `reconnect` is the event that tells a client to
    /// reconnect on shutdown.
    pub fn finish(self, end: End, reconnect: impl FnOnce() -> T) {
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
