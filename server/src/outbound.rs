//! [`Outbound`]: the sending half of a server stream (`Chat`, `Subscribe`), and how such
//! a stream ends.
//!
//! The handler returns the receiving half to tonic at once and a task feeds it. The
//! channel is small: tonic polls it only when HTTP/2 flow control lets the response
//! stream carry more, so when a client stops reading, `send` waits, the task stops pulling
//! from its cursors, and nothing piles up in memory. Every wait also watches the server's
//! shutdown, so a stalled client cannot hold a drain up.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Events a stream holds before its task waits for the client to read.
pub const OUTBOUND_BUFFER: usize = 32;

/// How long the last words of a stream (reconnect notice, final status) may wait for a
/// client that is not reading; after that the stream is dropped.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// The server's drain signal.
    shutdown: CancellationToken,
}

impl<T: Send + 'static> Outbound<T> {
    /// A new stream: the `Outbound` for the task, the `ReceiverStream` for tonic.
    pub fn channel(shutdown: CancellationToken) -> (Self, ReceiverStream<Result<T, Status>>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        (Self { tx, shutdown }, ReceiverStream::new(rx))
    }

    /// Sends one event, waiting while the client is not reading.
    pub async fn send(&self, event: T) -> Result<(), End> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
            sent = self.tx.send(Ok(event)) => sent.map_err(|_| End::ClientGone),
        }
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
    pub async fn finish(self, end: End, reconnect: impl FnOnce() -> T) {
        let last_words = match end {
            End::ClientDone | End::ClientGone => return,
            End::Shutdown => vec![
                Ok(reconnect()),
                Err(Status::unavailable(
                    "the server is shutting down; reconnect",
                )),
            ],
            End::Failed(status) => vec![Err(status)],
        };
        for item in last_words {
            let sent = tokio::time::timeout(FAREWELL_TIMEOUT, self.tx.send(item)).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
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
