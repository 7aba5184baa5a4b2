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

use std::time::Duration;

use tokio::sync::mpsc::{self, OwnedPermit, error::TrySendError};
use tokio_stream::wrappers::ReceiverStream;
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

/// The sending half of a server stream of `T`.
pub struct Outbound<T> {
    /// Events to the client; the last item may be an error status that ends the call.
    tx: mpsc::Sender<Result<T, Status>>,
    /// Two reserved slots for the last words.
    farewell: [OwnedPermit<Result<T, Status>>; 2],
    /// The server's drain signal.
    shutdown: CancellationToken,
    /// How long one send may wait for a client that is not reading.
    stall_timeout: Duration,
    /// Where a stalled client is counted.
    metrics: std::sync::Arc<Metrics>,
}

impl<T: Send + 'static> Outbound<T> {
    /// A new stream: the `Outbound` for the task, the `ReceiverStream` for tonic.
    pub fn channel(
        shutdown: CancellationToken,
        stall_timeout: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> (Self, ReceiverStream<Result<T, Status>>) {
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
        (out, ReceiverStream::new(rx))
    }

    /// Sends one event, waiting while the client is not reading (up to the stall timeout).
    pub async fn send(&self, event: T) -> Result<(), End> {
        // The usual case, a client keeping up: the event fits at once, with no timer to
        // arm and nothing to select over (the hot path of every delivery).
        let event = match self.tx.try_send(Ok(event)) {
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
                first.send(Ok(reconnect()));
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
