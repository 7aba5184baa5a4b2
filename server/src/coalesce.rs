//! [`Coalescing`]: a connection's writes, gathered across its streams when that saves
//! system calls, and written straight through when it would not.
//!
//! HTTP/2 writes each time its connection task runs. With one task per stream feeding it,
//! a message fanned out to the 20 streams of one connection could make 20 small writes,
//! each a system call and a TCP segment (with `TCP_NODELAY`, which a chat server needs:
//! Nagle's algorithm would hold a lone message back up to a delayed-ACK timeout). So small
//! writes can be gathered here, and a flush then waits one turn of the scheduler before it
//! writes them: the other streams woken by the same message run in that turn and add
//! theirs, and the connection writes once.
//!
//! That wait pays only where other writes come during it. A user's own connection, with
//! its one `Chat` stream, has none at light load: there the wait is one more run of the
//! connection's task per delivery, and the gathering one more copy of every byte. So the
//! connection learns: after [`GIVE_UP`] waits in a row that gathered nothing more, it
//! writes straight through (vectored, no copy, no wait), and tries waiting again every
//! [`PROBE_EVERY`] flushes; one wait that gathers puts it back to waiting. A busy shared
//! connection gathers on (nearly) every flush; a quiet or single-stream one costs the
//! writes and nothing else.

use std::{
    io::IoSlice,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this big bypass the gathering buffer (when it is empty).
pub const DIRECT_WRITE: usize = 16 * 1024;
/// The most bytes gathered before they are written regardless.
pub const GATHER_LIMIT: usize = 64 * 1024;
/// Waits in a row that gathered nothing, after which flushes go straight through.
pub const GIVE_UP: u8 = 8;
/// Once going straight through, how many flushes go so before the next wait is tried.
pub const PROBE_EVERY: u8 = 16;

/// A writer whose small writes are gathered across a scheduler turn when that pays.
pub struct Coalescing<W> {
    inner: W,
    /// Bytes accepted and not yet written.
    pending: Vec<u8>,
    /// Set while a flush lets the scheduler run once; what was pending when it started.
    waiting_since: Option<usize>,
    /// This flush cycle's choice (from its first write until its flush): gather or not.
    gathering: Option<bool>,
    /// Waits in a row that gathered nothing more (up to [`GIVE_UP`]).
    useless_waits: u8,
    /// Flushes written straight through since the last wait.
    direct_flushes: u8,
}

impl<W> Coalescing<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            waiting_since: None,
            gathering: None,
            useless_waits: 0,
            direct_flushes: 0,
        }
    }

    /// The writer underneath.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Whether this flush cycle gathers: decided at its first write.
    fn gathers(&mut self) -> bool {
        *self.gathering.get_or_insert_with(|| {
            if self.useless_waits < GIVE_UP || self.direct_flushes >= PROBE_EVERY {
                true
            } else {
                self.direct_flushes += 1;
                false
            }
        })
    }
}

impl<W: AsyncWrite + Unpin> Coalescing<W> {
    /// Writes out everything gathered; `Pending` while the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut written = 0;
        while written < self.pending.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending[written..]) {
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

    /// Makes room for `len` more bytes: `false` if they should go straight out instead.
    fn poll_gather(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<std::io::Result<bool>> {
        if self.pending.is_empty() && (len >= DIRECT_WRITE || !self.gathers()) {
            return Poll::Ready(Ok(false));
        }
        if self.pending.len() + len > GATHER_LIMIT {
            std::task::ready!(self.poll_drain(cx))?;
            if len >= DIRECT_WRITE {
                return Poll::Ready(Ok(false));
            }
        }
        Poll::Ready(Ok(true))
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for Coalescing<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalescing<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !std::task::ready!(self.poll_gather(cx, buf.len()))? {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !std::task::ready!(self.poll_gather(cx, len))? {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
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
        if !self.pending.is_empty() {
            match self.waiting_since {
                None => {
                    // Let the other tasks of this turn add their bytes first.
                    self.waiting_since = Some(self.pending.len());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(before) if self.gathering.is_some() => {
                    self.useless_waits = match self.pending.len() > before {
                        true => 0,
                        false => (self.useless_waits + 1).min(GIVE_UP),
                    };
                    self.direct_flushes = 0;
                    // Learned once per cycle, however many polls the drain takes.
                    self.gathering = None;
                }
                Some(_) => {}
            }
        }
        std::task::ready!(self.poll_drain(cx))?;
        self.waiting_since = None;
        self.gathering = None;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// The coalescing server side and the plain client side of one loopback connection.
    async fn pair() -> (Coalescing<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Coalescing::new(server), client)
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

    /// Polls one flush by hand: `true` if it asked to run again (a wait) rather than
    /// finishing.
    fn flush_waits(writer: &mut Coalescing<TcpStream>) -> bool {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        match Pin::new(writer).poll_flush(&mut cx) {
            Poll::Pending => {
                assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "it asked to run again");
                true
            }
            Poll::Ready(result) => {
                result.unwrap();
                false
            }
        }
    }

    #[tokio::test]
    async fn small_writes_are_gathered_until_a_flush_one_turn_later() {
        let (mut server, mut peer) = pair().await;
        for chunk in [&b"one "[..], b"two ", b"three"] {
            server.write_all(chunk).await.unwrap();
        }
        assert!(nothing_received(&mut peer).await, "nothing before a flush");
        // The first poll of a flush lets the scheduler run once (waking itself), the
        // next writes everything in one go.
        assert!(flush_waits(&mut server));
        assert!(nothing_received(&mut peer).await, "still gathered");
        assert!(!flush_waits(&mut server));
        assert_eq!(receive(&mut peer, 13).await, b"one two three");
    }

    #[tokio::test]
    async fn a_connection_whose_waits_gather_nothing_writes_straight_through() {
        let (mut server, mut peer) = pair().await;
        // Waits that nothing joined, GIVE_UP of them in a row.
        for n in 0..GIVE_UP {
            server.write_all(&[n]).await.unwrap();
            assert!(flush_waits(&mut server), "wait {n}");
            assert!(!flush_waits(&mut server));
            assert_eq!(receive(&mut peer, 1).await, [n]);
        }
        // From then on, flushes neither copy nor wait.
        for n in 0..PROBE_EVERY {
            server.write_all(&[n]).await.unwrap();
            assert_eq!(receive(&mut peer, 1).await, [n], "written before any flush");
            assert!(!flush_waits(&mut server), "no wait");
        }
        // Then it tries a wait again; this time more comes during it, so it waits again.
        server.write_all(b"a").await.unwrap();
        assert!(nothing_received(&mut peer).await, "gathered again");
        assert!(flush_waits(&mut server));
        server.write_all(b"b").await.unwrap();
        assert!(!flush_waits(&mut server));
        assert_eq!(receive(&mut peer, 2).await, b"ab");
        server.write_all(b"c").await.unwrap();
        assert!(flush_waits(&mut server), "one wait that gathered is enough");
        assert!(!flush_waits(&mut server));
        assert_eq!(receive(&mut peer, 1).await, b"c");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_out() {
        let (mut server, mut peer) = pair().await;
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
        let (mut server, mut peer) = pair().await;
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
}
