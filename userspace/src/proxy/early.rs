//! An app's answer given before it read the request body, kept from the reset that follows it.
//!
//! An app may answer a request before it has read all of its body (a 413 for an upload too large,
//! a 401 or 403 from its own checks) and close its connection with the rest of the body unread.
//! The kernel then resets the connection, and the gateway, still writing the body, finds its
//! writes failing while the answer waits in its receive buffer. hyper's client fails the request
//! with the first error it meets, so which one wins decided between the app's answer and a 502
//! (about seven times in ten with a 1 MB body and a hyper app, which does exactly this).
//!
//! [`EarlyAnswer`] wraps an HTTP/1.1 backend connection's stream. A write that finds the
//! connection reset or closed is taken as written, and so is every write after it: the request
//! is over on the app's side, and hyper goes on reading. If the app answered, the answer is read
//! and proxied; if it did not, the connection's end (its reset, or end of stream) fails the
//! request as before. The connection is never used again ([`EarlyAnswer::reset`]).

use std::io::{self, ErrorKind, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A backend connection's stream whose writes stop, as if done, once the app reset it.
pub struct EarlyAnswer<T> {
    io: T,
    reset: Arc<AtomicBool>,
    /// Off for a connection opened for an upgrade: its stream becomes a tunnel, which a failed
    /// write must end.
    armed: bool,
}

impl<T> EarlyAnswer<T> {
    pub fn new(io: T, armed: bool) -> Self {
        EarlyAnswer {
            io,
            reset: Arc::default(),
            armed,
        }
    }

    /// Set once a write found the connection reset: the connection must not take another request.
    pub fn reset(&self) -> Arc<AtomicBool> {
        self.reset.clone()
    }

    /// Whether `r` ends the writing: a write that failed because the app closed or reset the
    /// connection is taken as done (`done` bytes), after noting the reset.
    fn written<R>(&self, r: Poll<io::Result<R>>, done: R) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(Err(e)) if self.armed && closed_by_peer(&e) => {
                tracing::debug!(error = %e, "backend connection reset while the request was being written; reading its answer");
                self.reset.store(true, Ordering::Relaxed);
                Poll::Ready(Ok(done))
            }
            r => r,
        }
    }

    fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }
}

/// Whether `e` says the other end closed or reset the connection.
pub(crate) fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for EarlyAnswer<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EarlyAnswer<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_reset() {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.written(r, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.is_reset() {
            return Poll::Ready(Ok(len));
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.written(r, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_reset() {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.written(r, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_reset() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The peer answers, then goes away unread: writes carry on as done, the answer is read, and
    /// the connection is marked as not to be used again.
    #[tokio::test]
    async fn writes_after_a_reset_are_taken_as_done_and_the_answer_is_read() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = EarlyAnswer::new(a, true);
        let reset = io.reset();
        io.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        b.write_all(b"HTTP/1.1 413 Payload Too Large\r\n")
            .await
            .unwrap();
        drop(b);
        assert!(!reset.load(Ordering::Relaxed));
        // The duplex's peer is gone: its writes fail with BrokenPipe.
        io.write_all(&[b'x'; 4096]).await.unwrap();
        io.flush().await.unwrap();
        assert!(reset.load(Ordering::Relaxed));
        let mut answer = String::new();
        io.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "HTTP/1.1 413 Payload Too Large\r\n");
        io.shutdown().await.unwrap();
    }

    /// Unarmed (an upgrade's tunnel), the error is the caller's.
    #[tokio::test]
    async fn unarmed_writes_fail() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let mut io = EarlyAnswer::new(a, false);
        assert!(io.write_all(b"x").await.is_err());
        assert!(!io.reset().load(Ordering::Relaxed));
    }

    /// Other write errors are the caller's.
    #[test]
    fn only_a_peer_closing_counts() {
        assert!(closed_by_peer(&ErrorKind::ConnectionReset.into()));
        assert!(closed_by_peer(&ErrorKind::BrokenPipe.into()));
        assert!(!closed_by_peer(&ErrorKind::TimedOut.into()));
        assert!(!closed_by_peer(&ErrorKind::Other.into()));
    }
}
