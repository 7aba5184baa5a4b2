//! Accepted connections: [`Incoming`] counts them per address (closing those over the
//! limit before any TLS or HTTP/2 work is done for them), and each [`Counted`] connection
//! gives its count back when it closes and coalesces its small writes.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use dashmap::DashMap;
use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{Held, Limit, Metrics};

/// Accepted connections, counted per IP address: the ones over the limit are closed.
pub struct Incoming<S> {
    listener: S,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    max_per_ip: usize,
    metrics: Arc<Metrics>,
}

impl<S> Incoming<S> {
    /// Counts the connections `listener` accepts.
    pub fn new(listener: S, max_per_ip: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            listener,
            per_ip: Arc::new(DashMap::new()),
            max_per_ip,
            metrics,
        }
    }
}

impl<S> Stream for Incoming<S>
where
    S: Stream<Item = std::io::Result<TcpStream>> + Unpin,
{
    type Item = std::io::Result<Counted>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let stream = match Pin::new(&mut self.listener).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => stream,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            self.metrics.connections_accepted.inc();
            // The builder's `tcp_nodelay` covers only listeners it binds itself. Without
            // this, Nagle holds a small event back until the previous one is acked, and
            // with delayed ACKs that is up to 40 ms.
            let _ = stream.set_nodelay(true);
            // A connection reset before it was accepted has no peer left: nothing to serve.
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let ip = peer.ip();
            {
                let mut count = self.per_ip.entry(ip).or_insert(0);
                if *count >= self.max_per_ip {
                    drop(count);
                    self.metrics.limited(Limit::ConnectionsPerIp);
                    tracing::warn!(%ip, limit = self.max_per_ip, "too many connections; closing one");
                    continue; // dropping the stream closes it
                }
                *count += 1;
            }
            return Poll::Ready(Some(Ok(Counted {
                stream,
                ip,
                per_ip: self.per_ip.clone(),
                _open: Held::new(&self.metrics.connections),
                pending: Vec::new(),
                deferred: false,
            })));
        }
    }
}

/// An accepted connection: counted until it closes, its small writes coalesced.
///
/// HTTP/2 writes each time its connection task runs: with one task per stream feeding it,
/// a message fanned out to the 20 streams of one connection could make 20 small writes,
/// each a system call and a TCP segment (with `TCP_NODELAY`, which a chat server needs:
/// Nagle's algorithm would hold a lone message back up to a delayed-ACK timeout). So small
/// writes are gathered here, and a flush waits one turn of the scheduler before it writes
/// them: the other streams woken by the same message run in that turn and add theirs, and
/// the connection writes once. Under load the batches grow by themselves; an idle
/// connection's lone event goes out after one turn, microseconds later, with no timer.
pub struct Counted {
    stream: TcpStream,
    ip: IpAddr,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    _open: Held,
    /// Bytes accepted and not yet written.
    pending: Vec<u8>,
    /// Whether the current flush has already let the scheduler run once.
    deferred: bool,
}

/// Writes at least this big bypass the gathering buffer (when it is empty).
const DIRECT_WRITE: usize = 16 * 1024;
/// The most bytes gathered before they are written regardless.
const GATHER_LIMIT: usize = 64 * 1024;

impl Counted {
    /// Writes out everything gathered; `Pending` while the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut written = 0;
        while written < self.pending.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.pending[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    self.pending.drain(..written);
                    return Poll::Pending;
                }
            }
        }
        self.pending.clear();
        Poll::Ready(Ok(()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.per_ip.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.pending.is_empty() && buf.len() >= DIRECT_WRITE {
            return Pin::new(&mut self.stream).poll_write(cx, buf);
        }
        if self.pending.len() + buf.len() > GATHER_LIMIT {
            std::task::ready!(self.poll_drain(cx))?;
            if buf.len() >= DIRECT_WRITE {
                return Pin::new(&mut self.stream).poll_write(cx, buf);
            }
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.pending.is_empty() && len >= DIRECT_WRITE {
            return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        }
        if self.pending.len() + len > GATHER_LIMIT {
            std::task::ready!(self.poll_drain(cx))?;
            if len >= DIRECT_WRITE {
                return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
            }
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() && !self.deferred {
            // Let the other tasks of this turn add their bytes first.
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(self.poll_drain(cx))?;
        self.deferred = false;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::Wake,
    };

    use futures::StreamExt as _;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;

    /// A counted server side and the plain client side of one loopback connection.
    async fn pair(max_per_ip: usize) -> (Incoming<TcpListenerStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = Incoming::new(
            TcpListenerStream::new(listener),
            max_per_ip,
            Arc::new(Metrics::new()),
        );
        let client = TcpStream::connect(addr).await.unwrap();
        (incoming, client)
    }

    /// Exactly `n` bytes from the peer, waiting for them (with a deadline).
    async fn receive(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            peer.read_exact(&mut got),
        )
        .await
        .expect("the bytes arrive")
        .expect("read");
        got
    }

    /// Whether nothing has reached the peer. Loopback delivers a write at once, so a
    /// moment's wait shows a write that happened; there is no event to wait for when
    /// nothing was written.
    async fn nothing_received(peer: &mut TcpStream) -> bool {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut buf = [0u8; 1];
        matches!(peer.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn small_writes_are_gathered_until_a_flush_one_turn_later() {
        let (mut incoming, mut peer) = pair(8).await;
        let mut server = incoming.next().await.unwrap().unwrap();
        for chunk in [&b"one "[..], b"two ", b"three"] {
            server.write_all(chunk).await.unwrap();
        }
        assert!(nothing_received(&mut peer).await, "nothing before a flush");

        // The first poll of a flush lets the scheduler run once (waking itself), the
        // next writes everything in one go.
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut server).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "it asked to run again");
        assert!(nothing_received(&mut peer).await, "still gathered");
        assert!(matches!(
            Pin::new(&mut server).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(receive(&mut peer, 13).await, b"one two three");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_out() {
        let (mut incoming, mut peer) = pair(8).await;
        let mut server = incoming.next().await.unwrap().unwrap();
        let large = vec![7u8; DIRECT_WRITE];
        let written = server.write(&large).await.unwrap();
        assert!(written > 0);
        assert_eq!(
            receive(&mut peer, written).await,
            large[..written],
            "no flush needed"
        );
    }

    #[tokio::test]
    async fn gathering_stops_at_its_limit_and_writes_what_it_holds() {
        let (mut incoming, mut peer) = pair(8).await;
        let mut server = incoming.next().await.unwrap().unwrap();
        let chunk = vec![1u8; 1024];
        for _ in 0..GATHER_LIMIT / chunk.len() {
            server.write_all(&chunk).await.unwrap();
        }
        assert!(
            nothing_received(&mut peer).await,
            "exactly at the limit: held"
        );
        server.write_all(b"one more").await.unwrap();
        assert_eq!(
            receive(&mut peer, GATHER_LIMIT).await.len(),
            GATHER_LIMIT,
            "the held bytes went out before more were taken"
        );
        assert!(nothing_received(&mut peer).await, "the new bytes are held");
        server.flush().await.unwrap();
        assert_eq!(receive(&mut peer, 8).await, b"one more");
    }

    #[tokio::test]
    async fn connections_over_the_per_address_limit_are_closed_and_slots_come_back() {
        let (mut incoming, _first_peer) = pair(2).await;
        let addr = {
            let first = incoming.next().await.unwrap().unwrap();
            first.stream.local_addr().unwrap()
            // `first` closes here: its slot comes back.
        };
        let _second_peer = TcpStream::connect(addr).await.unwrap();
        let second = incoming.next().await.unwrap().unwrap();
        let _third_peer = TcpStream::connect(addr).await.unwrap();
        let third = incoming.next().await.unwrap().unwrap();
        // The fourth is over the limit of two: closed unserved.
        let mut fourth_peer = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            tokio::select! {
                read = fourth_peer.read(&mut buf) => read,
                _ = incoming.next() => panic!("a connection over the limit was served"),
            }
        })
        .await
        .expect("the fourth connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "closed: {closed:?}");
        drop((second, third));
        let _fifth_peer = TcpStream::connect(addr).await.unwrap();
        assert!(incoming.next().await.unwrap().is_ok(), "slots came back");
    }
}
