//! Write combining for HTTP/2 connections.
//!
//! The `h2` crate writes a DATA frame of 256 bytes or more straight from the body's buffer, and
//! must flush it before it can queue the next frame. On a multiplexed connection every response
//! would then cost its own TLS record and its own `writev`, even when many streams' responses
//! are ready at the same moment (a proxy's usual case: several backend answers arrive in one
//! event-loop turn).
//!
//! [`Cork`] sits between hyper and the stream. It copies what hyper writes into one buffer and
//! treats hyper's flushes as a request to send *soon*: the bytes go out when the connection's
//! future returns from its poll ([`Corked`]), so everything written during one poll leaves in one
//! write. Nothing waits for a timer: a poll ends as soon as hyper has nothing more to do. Large
//! writes on an empty buffer skip the copy, and a full buffer applies back-pressure, so a
//! download is not held in memory.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write waits for the stream (back-pressure).
const LIMIT: usize = 64 * 1024;

/// A write at least this large, arriving while nothing is held, goes to the stream directly.
const DIRECT: usize = 16 * 1024;

/// Room a batch starts with: several small responses (HEADERS and a DATA frame of 1 KiB are
/// about 1.1 KB) fit without the buffer growing (and copying itself) once per doubling.
const FIRST: usize = 8 * 1024;

struct Shared<S> {
    io: S,
    /// Written by hyper, not yet by the stream; `buf[sent..]` is what is left.
    buf: Vec<u8>,
    sent: usize,
    /// Bytes went to the stream since its last flush.
    unflushed: bool,
    /// A failure of a write made after the poll, reported at hyper's next read or write.
    failed: Option<io::Error>,
}

impl<S> Shared<S> {
    fn new(io: S) -> Handle<S> {
        Arc::new(Mutex::new(Shared {
            io,
            buf: Vec::new(),
            sent: 0,
            unflushed: false,
            failed: None,
        }))
    }
}

impl<S: AsyncWrite + Unpin> Shared<S> {
    /// Writes out what is held and flushes the stream.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.sent += n;
                    self.unflushed = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.buf.is_empty() {
            // Not kept: an idle connection should not hold a batch's worth of memory.
            self.buf = Vec::new();
            self.sent = 0;
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn held(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Makes room for `len` more bytes; a batch's first write takes at least [`FIRST`].
    fn hold(&mut self, len: usize) {
        match self.buf.capacity() {
            0 => self.buf.reserve(len.max(FIRST)),
            _ => self.buf.reserve(len),
        }
    }

    fn failure(&mut self) -> io::Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

type Handle<S> = Arc<Mutex<Shared<S>>>;

fn lock<S>(shared: &Handle<S>) -> MutexGuard<'_, Shared<S>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The stream as hyper sees it. Only meaningful inside [`Corked`], which sends what it holds.
pub struct Cork<S> {
    shared: Handle<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Cork<S> {
    /// Wraps `io`; `serve` makes the future that uses the returned stream.
    pub fn serve<F: Future>(io: S, serve: impl FnOnce(Cork<S>) -> F) -> Corked<F, S> {
        let shared = Shared::new(io);
        let fut = serve(Cork {
            shared: shared.clone(),
        });
        Corked { fut, shared }
    }

    /// Makes room for `len` more bytes: `Ready(true)` when they should bypass the buffer.
    fn poll_room(s: &mut Shared<S>, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        s.failure()?;
        if s.held() >= LIMIT {
            ready!(s.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(s.held() == 0 && len >= DIRECT))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Cork<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        s.failure()?;
        Pin::new(&mut s.io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Cork<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.shared);
        if ready!(Self::poll_room(&mut s, cx, data.len()))? {
            s.unflushed = true;
            return Pin::new(&mut s.io).poll_write(cx, data);
        }
        s.hold(data.len());
        s.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut s = lock(&self.shared);
        if ready!(Self::poll_room(&mut s, cx, len))? {
            s.unflushed = true;
            return Pin::new(&mut s.io).poll_write_vectored(cx, bufs);
        }
        s.hold(len);
        for b in bufs {
            s.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Deferred to the end of the poll ([`Corked`]).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(lock(&self.shared).failure())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        s.failure()?;
        ready!(s.poll_write_out(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// The future serving a [`Cork`]ed stream: after each of its polls, what the stream holds is
    /// written out. A write that cannot finish leaves this task waiting for the stream to become
    /// writable; a failed one is reported to hyper at its next read or write.
    pub struct Corked<F, S> {
        #[pin]
        fut: F,
        shared: Handle<S>,
    }
}

impl<F, S> Corked<F, S> {
    /// The serving future, e.g. to start its graceful shutdown.
    pub fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().fut
    }
}

impl<F: Future, S: AsyncWrite + Unpin> Future for Corked<F, S> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = this.fut.poll(cx);
        let mut s = lock(this.shared);
        if s.failed.is_none() {
            if let Poll::Ready(Err(e)) = s.poll_write_out(cx) {
                s.failed = Some(e);
                // hyper may be waiting on a read that will not come: poll it again to see this.
                cx.waker().wake_by_ref();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A stream that records each write as one entry and can refuse to take more.
    #[derive(Default)]
    struct Sink {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        blocked: Arc<AtomicBool>,
        fail: Arc<AtomicBool>,
        shut: Arc<AtomicBool>,
    }

    impl AsyncRead for Sink {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.fail.load(Ordering::SeqCst) {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if self.blocked.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            // Takes at most 40 KiB per call, as a socket with a full buffer would.
            let n = data.len().min(40 * 1024);
            self.writes.lock().unwrap().push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut.store(true, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
    }

    fn noop_cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// A future that performs the given writes (each followed by a flush, as h2 does) on every
    /// poll, and records what each write and flush returned.
    struct Writer {
        io: Cork<Sink>,
        per_poll: Vec<Vec<u8>>,
        results: Vec<Poll<io::Result<usize>>>,
    }

    impl Future for Writer {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let this = &mut *self;
            for w in this.per_poll.clone() {
                let r = Pin::new(&mut this.io).poll_write(cx, &w);
                let ok = matches!(r, Poll::Ready(Ok(_)));
                this.results.push(r);
                if ok {
                    let f = Pin::new(&mut this.io).poll_flush(cx);
                    assert!(matches!(f, Poll::Ready(Ok(()))), "{f:?}");
                }
            }
            Poll::Pending
        }
    }

    fn writer(sink: Sink, per_poll: Vec<Vec<u8>>) -> Pin<Box<Corked<Writer, Sink>>> {
        Box::pin(Cork::serve(sink, |io| Writer {
            io,
            per_poll,
            results: Vec::new(),
        }))
    }

    #[test]
    fn writes_of_one_poll_leave_in_one_write_in_order() {
        let sink = Sink::default();
        let writes = sink.writes.clone();
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1033]).collect();
        let mut fut = writer(sink, frames.clone());
        let mut cx = noop_cx();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        let w = writes.lock().unwrap().clone();
        assert_eq!(w.len(), 1, "ten flushed frames, one write");
        assert_eq!(w[0], frames.concat());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            writes.lock().unwrap().len(),
            2,
            "the next poll's frames, one more write"
        );
        // Nothing is kept between batches.
        assert_eq!(lock(&fut.shared).buf.capacity(), 0);
    }

    #[test]
    fn a_large_write_on_an_empty_buffer_is_not_copied_and_partial_writes_resume() {
        let sink = Sink::default();
        let writes = sink.writes.clone();
        // 100 KiB: the sink takes 40 KiB per write, so the direct write is partial and the
        // writer (as h2 does) only learns how much was taken.
        let mut fut = writer(sink, vec![vec![7; 100 * 1024]]);
        let mut cx = noop_cx();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        let w = writes.lock().unwrap().clone();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len(), 40 * 1024);
        assert!(matches!(fut.fut.results[0], Poll::Ready(Ok(n)) if n == 40 * 1024));
        assert_eq!(lock(&fut.shared).held(), 0, "nothing was copied");
    }

    #[test]
    fn a_blocked_stream_holds_at_most_the_limit_then_pushes_back() {
        let sink = Sink::default();
        let (writes, blocked) = (sink.writes.clone(), sink.blocked.clone());
        blocked.store(true, Ordering::SeqCst);
        let frames: Vec<Vec<u8>> = (0..100).map(|_| vec![1; 1024]).collect();
        let mut fut = writer(sink, frames);
        let mut cx = noop_cx();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        let accepted = fut
            .fut
            .results
            .iter()
            .filter(|r| matches!(r, Poll::Ready(Ok(_))))
            .count();
        assert_eq!(accepted, LIMIT / 1024, "accepted up to the limit");
        assert!(fut.fut.results[accepted..].iter().all(|r| r.is_pending()));
        assert!(writes.lock().unwrap().is_empty());
        // Writable again: the next poll sends what was held first.
        blocked.store(false, Ordering::SeqCst);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        let w = writes.lock().unwrap().clone();
        assert_eq!(w[0].len(), 40 * 1024);
        assert!(w.concat().len() >= LIMIT);
    }

    #[test]
    fn a_failed_write_after_the_poll_is_reported_at_the_next_read_or_write() {
        let sink = Sink::default();
        let fail = sink.fail.clone();
        fail.store(true, Ordering::SeqCst);
        let mut fut = writer(sink, vec![vec![1; 10]]);
        let mut cx = noop_cx();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(
            matches!(fut.fut.results[0], Poll::Ready(Ok(10))),
            "held, not yet written"
        );
        // The write made after the poll failed; hyper sees it next time.
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        match &fut.fut.results[1] {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shutdown_sends_what_is_held_first() {
        let sink = Sink::default();
        let (writes, shut) = (sink.writes.clone(), sink.shut.clone());
        let mut io = Cork {
            shared: Shared::new(sink),
        };
        let mut cx = noop_cx();
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"goaway"),
            Poll::Ready(Ok(6))
        ));
        assert!(writes.lock().unwrap().is_empty());
        assert!(matches!(
            Pin::new(&mut io).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(writes.lock().unwrap().concat(), b"goaway");
        assert!(shut.load(Ordering::SeqCst));
    }
}
