//! Body wrappers: count bytes, and run a completion hook exactly once when a body is finished or
//! dropped (which is when the access-log record is written and pooled connections are returned).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pin_project! {
    /// Counts the data bytes that pass through into a shared counter.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &res {
            if let Some(d) = f.data_ref() {
                this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// All of it was sent.
    Clean,
    /// Cut short: the client went away, or the endpoint's body failed.
    Cut,
    /// Cut short because the endpoint sent nothing for `backends.response_body_timeout`.
    Stalled,
}

/// Called once with the number of bytes sent and how the body ended.
pub type OnDone = Box<dyn FnOnce(u64, End) + Send>;

/// The error a [`Stall`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the endpoint sent nothing of its response body for {0:?}")]
pub struct BodyStalled(pub Duration);

/// A body's silence while the proxy waits on it: [`Silence::elapsed`] is ready once `limit` has
/// passed since the body last had nothing to give. The timer is armed only when the body has
/// nothing ready, so a body that arrives with its head costs no timer.
struct Silence {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl Silence {
    fn new(limit: Duration) -> Self {
        Silence {
            limit,
            timer: None,
            waiting: false,
        }
    }

    /// The body had nothing (and registered its waker): ready once it has been silent for
    /// `limit`.
    fn elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.waiting {
                    t.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.waiting = true;
        std::future::Future::poll(timer.as_mut(), cx)
    }

    /// The body gave something (a frame, its end or an error).
    fn heard(&mut self) {
        self.waiting = false;
    }
}

pin_project! {
    /// An endpoint's response body that fails with [`BodyStalled`] once `limit` passes without a
    /// frame while one is awaited: a hung app does not hold the client's connection, and the
    /// backend connection, forever.
    pub struct Stall<B> {
        #[pin]
        inner: B,
        silence: Silence,
    }
}

impl<B> Stall<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        Stall {
            inner,
            silence: Silence::new(limit),
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for Stall<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Pending => match this.silence.elapsed(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(Box::new(BodyStalled(this.silence.limit)))))
                }
                Poll::Pending => Poll::Pending,
            },
            ready => {
                this.silence.heard();
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a [`RequestStall`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
pub struct RequestBodyStalled(pub Duration);

/// Where a request whose body is watched by a [`RequestStall`] stands, shared between the body
/// (inside the backend connection's task) and the request's handler.
#[derive(Debug, Default)]
pub struct RequestWatch(AtomicU8);

/// The endpoint has not answered yet: the client's silence is timed.
const AWAITING_ANSWER: u8 = 0;
/// The endpoint's response head arrived: from here the exchange is the app's (a gRPC stream's
/// client may say nothing for minutes), and the client's silence is not timed.
const ANSWERED: u8 = 1;
/// The client went silent for the limit before the endpoint answered: the body failed.
const STALLED: u8 = 2;

impl RequestWatch {
    /// Moves from `AWAITING_ANSWER` to `to`; false when another move came first.
    fn leave_awaiting(&self, to: u8) -> bool {
        self.0
            .compare_exchange(AWAITING_ANSWER, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The endpoint's response head arrived (unless the body had already stalled).
    pub fn answered(&self) {
        self.leave_awaiting(ANSWERED);
    }

    /// Whether the client's request body went silent for the limit before an answer.
    pub fn stalled(&self) -> bool {
        self.0.load(Ordering::Acquire) == STALLED
    }

    fn awaiting(&self) -> bool {
        self.0.load(Ordering::Acquire) == AWAITING_ANSWER
    }
}

pin_project! {
    /// A client's request body on its way to an endpoint that fails with [`RequestBodyStalled`]
    /// once `limit` passes without a frame while the endpoint waits for it and has not answered
    /// (`limits.request_body_timeout`, nginx's `client_body_timeout`): a client that stops half
    /// way through an upload does not hold an endpoint, and a backend connection, until the
    /// endpoint's own timeout, nor is its silence blamed on the endpoint (504).
    pub struct RequestStall<B> {
        #[pin]
        inner: B,
        silence: Silence,
        watch: Arc<RequestWatch>,
    }
}

impl<B> RequestStall<B> {
    pub fn new(inner: B, limit: Duration, watch: Arc<RequestWatch>) -> Self {
        RequestStall {
            inner,
            silence: Silence::new(limit),
            watch,
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for RequestStall<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            // Once answered (or stalled) nothing is timed; the inner body's waker is registered.
            Poll::Pending if !this.watch.awaiting() => {
                this.silence.timer = None;
                Poll::Pending
            }
            Poll::Pending => match this.silence.elapsed(cx) {
                Poll::Ready(()) if this.watch.leave_awaiting(STALLED) => {
                    Poll::Ready(Some(Err(Box::new(RequestBodyStalled(this.silence.limit)))))
                }
                // Answered between the check and the timer.
                Poll::Ready(()) => {
                    this.silence.timer = None;
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            },
            ready => {
                this.silence.heard();
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Runs `on_done` once: at end of stream, on error, or when dropped unfinished.
    pub struct Finish<B> {
        #[pin]
        inner: B,
        bytes: u64,
        on_done: Option<OnDone>,
    }

    impl<B> PinnedDrop for Finish<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.on_done.take() {
                done(*this.bytes, End::Cut);
            }
        }
    }
}

impl<B> Finish<B> {
    pub fn new(inner: B, on_done: OnDone) -> Self {
        Finish {
            inner,
            bytes: 0,
            on_done: Some(on_done),
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for Finish<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = this.inner.as_mut().poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                // A body of known length ends with its last frame: hyper sees `is_end_stream`
                // and drops it without polling for the end. That is a clean end too (and it lets
                // the backend connection go back to the pool).
                if this.inner.is_end_stream() {
                    if let Some(done) = this.on_done.take() {
                        done(*this.bytes, End::Clean);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.on_done.take() {
                    done(*this.bytes, End::Clean);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let end = match e.is::<BodyStalled>() {
                    true => End::Stalled,
                    false => End::Cut,
                };
                if let Some(done) = this.on_done.take() {
                    done(*this.bytes, end);
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
