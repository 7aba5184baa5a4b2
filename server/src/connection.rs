//! Accepted connections: [`Incoming`] counts them per address (closing those over the
//! limit before any TLS or HTTP/2 work is done for them), and each [`Counted`] connection
//! gives its count back when it closes; its writes go through [`Coalescing`].

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

use crate::{
    coalesce::Coalescing,
    metrics::{Held, Limit, Metrics},
};

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
                stream: Coalescing::new(stream),
                ip,
                per_ip: self.per_ip.clone(),
                _open: Held::new(&self.metrics.connections),
            })));
        }
    }
}

/// An accepted connection: counted until it closes, its writes coalesced when that pays.
pub struct Counted {
    stream: Coalescing<TcpStream>,
    ip: IpAddr,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    _open: Held,
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
        self.stream.get_ref().connect_info()
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use tokio::{io::AsyncReadExt as _, net::TcpListener};
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

    #[tokio::test]
    async fn connections_over_the_per_address_limit_are_closed_and_slots_come_back() {
        let (mut incoming, _first_peer) = pair(2).await;
        let addr = {
            let first = incoming.next().await.unwrap().unwrap();
            first.stream.get_ref().local_addr().unwrap()
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
