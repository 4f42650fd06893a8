// tollgate: added to the vendored crate (see vendor/README.md).

//! The read timeout of a pooled upstream connection, kept with the
//! connection.
//!
//! Pingora times each read of an upstream's answer: the read's future is
//! wrapped in a new timer, boxed, registered in tokio's timer wheel under
//! its lock and removed again under it, about 900 instructions a proxied
//! request. A connection from the per-thread pool (idle_pool.rs) is wrapped
//! in a [`TimedStream`] instead, which keeps one timer for the connection's
//! life. A read that finds nothing to read notes when its wait began (a
//! clock read, once a wait); the timer is moved only when it fires before
//! the waiting read's deadline, so on a connection in steady use it is
//! moved about once a timeout, not once a read. A wait as long as the
//! timeout fails the read, and [`relabel`] gives that failure Pingora's own
//! type for it, `ReadTimedout`: what a read timed by Pingora fails with.
//!
//! The timeout is the peer's, set by [`TimedStream::start`] each time the
//! pool hands the connection out (peers of different timeouts may share
//! connections). A read waits for at most one timeout, as with Pingora's
//! timer: the wait starts again with each read that returns data.

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::upstreams::peer::ALPN;
use pingora_error::{Error, ErrorType};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An upstream connection whose reads wait at most its current timeout.
#[derive(Debug)]
pub(crate) struct TimedStream {
    inner: Stream,
    /// The timeout of the request now using the connection; `None`: none.
    timeout: Option<Duration>,
    /// When the read now waiting began to wait; `None` between waits. Set
    /// before the first by [`TimedStream::start`] when the pool read the
    /// clock as it handed the connection out.
    since: Option<Instant>,
    /// Fires no later than the waiting read's deadline. Armed at the
    /// connection's first wait and kept, moved only when it fires.
    timer: Option<Pin<Box<Sleep>>>,
}

/// What a read that waited too long fails with, inside an `io::Error` of
/// kind `TimedOut`.
#[derive(Debug)]
struct WaitedTooLong;

impl std::fmt::Display for WaitedTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream sent nothing within its read timeout")
    }
}

impl std::error::Error for WaitedTooLong {}

impl TimedStream {
    pub(crate) fn new(inner: Stream) -> Box<TimedStream> {
        Box::new(TimedStream {
            inner,
            timeout: None,
            since: None,
            timer: None,
        })
    }

    /// Readies the connection for a request whose reads may wait `timeout`.
    /// `now`, the time the pool handed it out if it read the clock then,
    /// is taken for the start of the first wait (the wait for the answer,
    /// which begins once the request is written, microseconds later; the
    /// timeout is counted from a little earlier rather than read again).
    pub(crate) fn start(&mut self, timeout: Option<Duration>, now: Option<std::time::Instant>) {
        self.timeout = timeout;
        self.since = now.map(Instant::from_std);
    }

    /// The connection itself, read without a timeout (the pool's check of
    /// an idle connection, which must not start a wait).
    pub(crate) fn inner_mut(&mut self) -> &mut Stream {
        &mut self.inner
    }

    /// A read found nothing: waits for the timer if the wait may not last.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(timeout) = self.timeout else {
            return Poll::Pending;
        };
        let since = *self.since.get_or_insert_with(Instant::now);
        // A timeout too long to add to the clock never comes.
        let Some(due) = since.checked_add(timeout) else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if timer.deadline() > due {
                // Set for a longer timeout than this request's.
                timer.as_mut().reset(due);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if timer.deadline() >= due => {
                    self.since = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        WaitedTooLong,
                    )));
                }
                // Set for an earlier wait's deadline, which this one outlives.
                Poll::Ready(()) => timer.as_mut().reset(due),
            }
        }
    }
}

/// Gives an upstream error that a [`TimedStream`]'s read timeout caused
/// the type Pingora's own read timeout gives it, `ReadTimedout` (it comes
/// out of Pingora's HTTP/1 client as a `ReadError` caused by an I/O error).
pub(crate) fn relabel(error: &mut Error) {
    if error.etype != ErrorType::ReadError {
        return;
    }
    let mut cause = error.cause.as_deref();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|e| e.is::<WaitedTooLong>()) {
                error.etype = ErrorType::ReadTimedout;
            }
            return;
        }
        cause = c.downcast_ref::<Error>().and_then(|e| e.cause.as_deref());
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.since = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.wait(cx),
        }
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for TimedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

#[async_trait]
impl Peek for TimedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl UniqueID for TimedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for TimedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for TimedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for TimedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for TimedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}
