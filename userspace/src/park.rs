//! Idle HTTP/1.1 connections without their HTTP buffers.
//!
//! hyper keeps an HTTP/1.1 connection's read and write buffers (8 KiB each) for as long as the
//! connection lives, so a keep-alive connection waiting for its next request would cost as much
//! memory as a busy one. The gateway therefore serves HTTP/1.1 in cycles: it waits for the first
//! bytes of a request on the bare stream, hands them and the stream to a new hyper connection, and
//! once that connection has been idle for a moment asks it to *park*. [`ParkIo`] then reports end
//! of stream to hyper at its next read, which ends hyper's connection cleanly at idle, and leaves
//! the stream in [`Parking`] for the gateway to wait on again.
//!
//! Ending hyper's connection is only safe at a point where it holds nothing: no request in flight,
//! no response bytes it has not flushed, and no bytes it has read but not parsed (a pipelined
//! request that arrived in part). The last is judged from what this wrapper handed over: the last
//! bytes ended a request head (`\r\n\r\n`; chunked bodies end the same way) and a request started
//! after them. A request body with a `Content-Length` ends anywhere, so a connection whose last
//! request had such a body parks only after a later request without one.
//!
//! A cycle that hyper ends by closing the connection (the client's end of stream, `Connection:
//! close`, or a request whose body was left unread) hands the stream, shut for writing, to
//! [`Parking`] too, as closed: the loop reads what the client still sends for a while before it
//! closes the socket (see `gateway::linger`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::prefix::Prefix;
use crate::proxy::ConnCtx;

/// Shared by a cycle's [`ParkIo`] and the loop driving the cycle.
pub struct Parking<S> {
    requested: AtomicBool,
    parked: Mutex<Option<S>>,
    closed: Mutex<Option<S>>,
}

impl<S> Parking<S> {
    pub fn new() -> Arc<Self> {
        Arc::new(Parking {
            requested: AtomicBool::new(false),
            parked: Mutex::new(None),
            closed: Mutex::new(None),
        })
    }

    /// Asks the cycle to park at hyper's next read where that is safe.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    /// The stream, when the cycle ended by parking.
    pub fn take(&self) -> Option<S> {
        self.requested.store(false, Ordering::Relaxed);
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The stream, shut for writing, when hyper ended the cycle by closing the connection.
    pub fn take_closed(&self) -> Option<S> {
        self.closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The stream as hyper sees it during one cycle: bytes read while parked come first.
pub struct ParkIo<S> {
    /// `None` once parked: reads then report end of stream and writes fail.
    io: Option<S>,
    prefix: Prefix,
    parking: Arc<Parking<S>>,
    conn: Arc<ConnCtx>,
    /// The last four bytes handed to hyper.
    tail: [u8; 4],
    /// `conn.requests` when bytes were last handed to hyper.
    read_at: u64,
    /// Written to since the last completed flush.
    dirty: bool,
    vectored: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ParkIo<S> {
    pub fn new(io: S, prefix: Vec<u8>, parking: Arc<Parking<S>>, conn: Arc<ConnCtx>) -> Self {
        let vectored = io.is_write_vectored();
        let mut p = ParkIo {
            io: Some(io),
            prefix: Prefix::default(),
            parking,
            conn,
            tail: [0; 4],
            read_at: 0,
            dirty: false,
            vectored,
        };
        p.handed_over(&prefix);
        p.prefix = Prefix::new(prefix);
        p
    }

    /// Notes bytes handed to hyper. New bytes are activity: a pending request to park waits for
    /// the next idle tick.
    fn handed_over(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len().min(4);
        self.tail.copy_within(n.., 0);
        self.tail[4 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
        self.read_at = self.conn.requests.load(Ordering::Relaxed);
        self.parking.requested.store(false, Ordering::Relaxed);
    }

    fn may_park(&self) -> bool {
        self.parking.requested.load(Ordering::Relaxed)
            && !self.dirty
            && self.conn.inflight.load(Ordering::Relaxed) == 0
            && self.tail == *b"\r\n\r\n"
            && self.conn.requests.load(Ordering::Relaxed) > self.read_at
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ParkIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Already noted as handed over when the cycle started.
        if this.prefix.serve(buf) {
            return Poll::Ready(Ok(()));
        }
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        match Pin::new(io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.handed_over(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.may_park() => {
                *this
                    .parking
                    .parked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = this.io.take();
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

fn parked() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection parked")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ParkIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(parked()));
        };
        this.dirty = true;
        Pin::new(io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(parked()));
        };
        this.dirty = true;
        Pin::new(io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let r = Pin::new(io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            this.dirty = false;
        }
        r
    }

    /// After parking, hyper's closing of its connection must not close the stream. Otherwise the
    /// stream is shut for writing (TLS close_notify, then FIN) and left in [`Parking`] as closed,
    /// for the loop to close once the client has stopped sending.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(Pin::new(io).poll_shutdown(cx))?;
        *this
            .parking
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = this.io.take();
        Poll::Ready(Ok(()))
    }
}
