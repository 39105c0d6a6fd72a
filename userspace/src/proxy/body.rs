//! Body wrappers: count bytes, and run a completion hook exactly once when a body is finished or
//! dropped (which is when the access-log record is written and pooled connections are returned).

use std::any::Any;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
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

/// How much of a request body has gone on to the endpoint (its data bytes, and whether all of
/// it), and the body itself while it is being sent, so that the rest of it can be let go when
/// the answer ends first ([`Taken::stop`]).
pub struct Taken<B> {
    bytes: AtomicU64,
    all: AtomicBool,
    rest: Mutex<Rest<B>>,
}

/// The body a [`Counted`] sends on, and who waits on it. The sender (hyper's connection or its
/// h2 body pipe) polls it; [`Taken::stop`] takes it from there.
struct Rest<B> {
    /// `None` once stopped.
    body: Option<B>,
    /// The sender's, while the body has nothing ready: woken by a stop, so it sees the end.
    waker: Option<Waker>,
    /// What must last as long as the sender holds the body ([`Taken::hold`]).
    held: Option<Box<dyn Any + Send>>,
}

impl<B> Default for Taken<B> {
    fn default() -> Self {
        Taken {
            bytes: AtomicU64::new(0),
            all: AtomicBool::new(false),
            rest: Mutex::new(Rest {
                body: None,
                waker: None,
                held: None,
            }),
        }
    }
}

impl<B> Taken<B> {
    /// The data bytes taken so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the body was taken to its end.
    pub fn all(&self) -> bool {
        self.all.load(Ordering::Relaxed)
    }

    /// Lets go of the rest of the body: the answer ended before the endpoint had all of it.
    /// The client's side of it is dropped at once, which frees the client: HTTP/1.1 discards
    /// the rest and closes, an h2 stream is reset with `NO_ERROR`. The sender, the next time it
    /// polls, gets [`Stopped`]: hyper's h2 client resets the backend's stream with it.
    pub fn stop(&self) {
        let (body, waker) = {
            let mut rest = self.rest();
            (rest.body.take(), rest.waker.take())
        };
        drop(body);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Keeps `x` until the sender lets go of the body as well as the request: an h2 stream's
    /// place on its connection, which hyper keeps open while it waits to send more of a body.
    pub fn hold(&self, x: Box<dyn Any + Send>) {
        self.rest().held = Some(x);
    }

    fn rest(&self) -> std::sync::MutexGuard<'_, Rest<B>> {
        self.rest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B> std::fmt::Debug for Taken<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("bytes", &self.bytes())
            .field("all", &self.all())
            .finish_non_exhaustive()
    }
}

/// What a [`Counted`] body ends with once [`Taken::stop`] let the rest go. Its source is h2's
/// `CANCEL`, the reason hyper's h2 client resets the stream with (as Go's transport does when
/// an answer ends before the request body was all sent).
#[derive(Debug, thiserror::Error)]
#[error("the answer ended before the request body was all sent; the rest is not sent on")]
pub struct Stopped(#[source] h2::Error);

/// Counts the data bytes that pass through, and notes the body's end, in a shared [`Taken`],
/// which holds the body. The end is the end of the stream, or the last of a declared length:
/// hyper's HTTP/1.1 client stops taking a body once it has written its `Content-Length`, and an
/// h2 client's end of stream may come after its last data, in a frame of its own.
pub struct Counted<B> {
    taken: Arc<Taken<B>>,
    length: Option<u64>,
    /// A body all taken from the start (a GET's, or one declared empty) is never stopped: it
    /// stays here, where using it takes no lock.
    whole: Option<B>,
    /// For a body sent from `taken`: whether its last poll said nothing follows. hyper asks
    /// after every frame; this answers without taking the lock again.
    ended: bool,
}

impl<B: Body> Counted<B> {
    pub fn new(inner: B, taken: Arc<Taken<B>>) -> Self {
        let length = inner.size_hint().exact();
        // A declared length of 0 is all taken at once: hyper writes no body for it, though the
        // end of stream may still be to come (an h2 client's, in a frame of its own).
        let whole = if inner.is_end_stream() || length == Some(0) {
            taken.all.store(true, Ordering::Relaxed);
            Some(inner)
        } else {
            taken.rest().body = Some(inner);
            None
        };
        Counted {
            taken,
            length,
            whole,
            ended: false,
        }
    }

    /// Counts a frame taken, `end` if the body said it was its last.
    fn took(&self, frame: &Frame<Bytes>, end: bool) {
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        let bytes = self.taken.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if end || self.length.is_some_and(|l| bytes >= l) {
            self.taken.all.store(true, Ordering::Relaxed);
        }
    }
}

/// The sender let go of the body (it was sent, or the request failed): so is the client's.
impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if self.whole.is_none() {
            let body = self.taken.rest().body.take();
            drop(body);
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(body) = &mut this.whole {
            let res = Pin::new(&mut *body).poll_frame(cx);
            if let Poll::Ready(Some(Ok(f))) = &res {
                this.took(f, true);
            }
            return res.map(|f| f.map(|r| r.map_err(Into::into)));
        }
        let mut rest = this.taken.rest();
        let Rest { body, waker, .. } = &mut *rest;
        let Some(body) = body else {
            let stopped = Stopped(h2::Error::from(h2::Reason::CANCEL));
            return Poll::Ready(Some(Err(stopped.into())));
        };
        let res = Pin::new(&mut *body).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                this.ended = body.is_end_stream();
                this.took(f, this.ended);
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.taken.all.store(true, Ordering::Relaxed);
            }
            Poll::Pending if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) => {
                *waker = Some(cx.waker().clone());
            }
            _ => {}
        }
        res.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    /// A body sent from `taken` answers from its last poll: it was not at its end when it was
    /// put there, and an end that comes without a poll (an h2 client's empty last frame) is
    /// then found by the next poll, which returns `None`.
    fn is_end_stream(&self) -> bool {
        match &self.whole {
            Some(body) => body.is_end_stream(),
            None => self.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.whole {
            Some(body) => body.size_hint(),
            None => self
                .taken
                .rest()
                .body
                .as_ref()
                .map_or_else(SizeHint::default, B::size_hint),
        }
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

/// How much of a request body is kept while it is sent, so that a request the backend did not
/// process can be sent again whole (`proxy::send_retrying_stale`). A body that grows past it is
/// not kept (nor the request sent again); a gRPC call or a form fits.
pub const KEPT_BODY_LIMIT: usize = 64 * 1024;

/// A piece of a body already sent, kept to be sent again.
enum Piece {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

impl Piece {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Piece::Data(d) => Frame::data(d.clone()),
            Piece::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

/// What the handles of one [`Kept`] body share.
struct Tee {
    inner: ProxyBody,
    /// What `inner` has yielded so far, while `whole`.
    pieces: Vec<Piece>,
    bytes: usize,
    /// Whether `pieces` holds all `inner` has yielded: false once it passed
    /// [`KEPT_BODY_LIMIT`], failed, or the request was answered ([`Keeper::release`]).
    whole: bool,
    ended: bool,
    /// The handle that may read on: earlier ones were sent with a request the backend did not
    /// process, and are done.
    turn: u32,
}

impl Tee {
    /// Stops keeping (the limit passed, the body failed, or the request was answered) and frees
    /// what was kept.
    fn forget(&mut self) {
        self.whole = false;
        self.pieces = Vec::new();
    }
}

/// A request body that keeps what it yields (up to [`KEPT_BODY_LIMIT`] bytes), so that the
/// request can be sent again with the same body ([`Keeper::again`]): its pieces already sent, then
/// the rest as it comes. Each handle reads in its turn; a handle given to a request the backend
/// did not process fails from then on.
pub struct Kept {
    tee: Arc<std::sync::Mutex<Tee>>,
    turn: u32,
    /// How many of the pieces this handle has yielded.
    at: usize,
}

/// A [`Kept`] handle read after its turn: the body was taken back to be sent again.
#[derive(Debug, thiserror::Error)]
#[error("the request body was taken back to be sent again")]
pub struct TakenBack;

/// What sends a [`Kept`] body again, or frees what it keeps.
pub struct Keeper {
    tee: Arc<std::sync::Mutex<Tee>>,
}

fn lock(tee: &std::sync::Mutex<Tee>) -> std::sync::MutexGuard<'_, Tee> {
    tee.lock().unwrap_or_else(|p| p.into_inner())
}

impl Kept {
    /// `inner` as a body that keeps what it yields, and what sends it again.
    pub fn new(inner: ProxyBody) -> (Kept, Keeper) {
        let tee = Arc::new(std::sync::Mutex::new(Tee {
            inner,
            pieces: Vec::new(),
            bytes: 0,
            whole: true,
            ended: false,
            turn: 0,
        }));
        let keeper = Keeper { tee: tee.clone() };
        (
            Kept {
                tee,
                turn: 0,
                at: 0,
            },
            keeper,
        )
    }
}

impl Keeper {
    /// The body once more from its start, when all of it sent so far was kept; every earlier
    /// handle is done.
    pub fn again(&self) -> Option<Kept> {
        let mut tee = lock(&self.tee);
        if !tee.whole {
            return None;
        }
        tee.turn += 1;
        Some(Kept {
            tee: self.tee.clone(),
            turn: tee.turn,
            at: 0,
        })
    }

    /// The request was answered: nothing more needs keeping (the pieces are freed).
    pub fn release(&self) {
        lock(&self.tee).forget();
    }
}

impl Body for Kept {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut guard = lock(&this.tee);
        let tee = &mut *guard;
        if tee.turn != this.turn {
            return Poll::Ready(Some(Err(TakenBack.into())));
        }
        if let Some(p) = tee.pieces.get(this.at) {
            this.at += 1;
            return Poll::Ready(Some(Ok(p.frame())));
        }
        if tee.ended {
            return Poll::Ready(None);
        }
        let res = Pin::new(&mut tee.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) if tee.whole => {
                tee.bytes += f.data_ref().map_or(0, Bytes::len);
                if tee.bytes > KEPT_BODY_LIMIT {
                    tee.forget();
                } else if let Some(d) = f.data_ref() {
                    tee.pieces.push(Piece::Data(d.clone()));
                } else if let Some(t) = f.trailers_ref() {
                    tee.pieces.push(Piece::Trailers(t.clone()));
                }
                this.at = tee.pieces.len();
            }
            Poll::Ready(Some(Err(_))) => tee.forget(),
            Poll::Ready(None) => tee.ended = true,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        let tee = lock(&self.tee);
        tee.turn == self.turn
            && self.at >= tee.pieces.len()
            && (tee.ended || tee.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let tee = lock(&self.tee);
        let kept: usize = tee.pieces[self.at.min(tee.pieces.len())..]
            .iter()
            .map(|p| match p {
                Piece::Data(d) => d.len(),
                Piece::Trailers(_) => 0,
            })
            .sum();
        let rest = match tee.ended {
            true => SizeHint::with_exact(0),
            false => tee.inner.size_hint(),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept as u64);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept as u64);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_counted_body_says_when_all_of_it_was_taken() {
        // A length-delimited body knows its end with its last data frame; a stream learns it
        // when it ends.
        let taken = Arc::new(Taken::default());
        let mut b = Counted::new(Full::new(Bytes::from_static(b"abc")), taken.clone());
        assert!(!taken.all() && !b.is_end_stream());
        b.frame().await.unwrap().unwrap();
        assert_eq!((taken.bytes(), taken.all()), (3, true));
        // Said with the last frame, so that an h2 sender ends the stream on it (no empty DATA
        // frame after).
        assert!(b.is_end_stream());

        let taken = Arc::new(Taken::default());
        let mut b = Counted::new(body(&[b"ab", b"c"], true), taken.clone());
        for _ in 0..3 {
            b.frame().await.unwrap().unwrap();
            assert!(!taken.all(), "trailers are not the end");
            assert!(!b.is_end_stream());
        }
        assert!(b.frame().await.is_none());
        assert_eq!((taken.bytes(), taken.all()), (3, true));
        assert!(b.is_end_stream());

        // One of a declared length is all taken with its last byte, though its end of stream
        // is still to come (an h2 client's, in a frame of its own).
        struct Declared(ProxyBody, u64);
        impl Body for Declared {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Pin::new(&mut self.0).poll_frame(cx)
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(self.1)
            }
        }
        let taken = Arc::new(Taken::default());
        let mut b = Counted::new(Declared(body(&[b"ab", b"c"], false), 3), taken.clone());
        b.frame().await.unwrap().unwrap();
        assert!(!taken.all());
        b.frame().await.unwrap().unwrap();
        assert_eq!((taken.bytes(), taken.all()), (3, true));

        // One that came whole with its head (a GET's) was all taken from the start, and so was
        // one declared empty whose end of stream is still to come.
        let taken = Arc::new(Taken::default());
        let _ = Counted::new(Empty::<Bytes>::new(), taken.clone());
        assert!(taken.all());
        let taken = Arc::new(Taken::default());
        let _ = Counted::new(Declared(body(&[], false), 0), taken.clone());
        assert!(taken.all());
    }

    #[test]
    fn a_stopped_body_lets_the_client_go_and_ends_in_cancel() {
        /// A client's body with nothing to give yet, that says when it is dropped.
        struct Waiting(Arc<AtomicBool>);
        impl Body for Waiting {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Poll::Pending
            }
        }
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        struct Woken(AtomicBool);
        impl std::task::Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let woken = Arc::new(Woken(AtomicBool::new(false)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);

        let dropped = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(Taken::default());
        let mut b = Counted::new(Waiting(dropped.clone()), taken.clone());
        assert!(Pin::new(&mut b).poll_frame(&mut cx).is_pending());
        taken.stop();
        assert!(
            dropped.load(Ordering::Relaxed),
            "the client's body is let go at once"
        );
        assert!(
            woken.0.load(Ordering::Relaxed),
            "the sender is woken to see the end"
        );
        let Poll::Ready(Some(Err(e))) = Pin::new(&mut b).poll_frame(&mut cx) else {
            panic!("a stopped body ends in an error");
        };
        let h2 = e.source().and_then(|s| s.downcast_ref::<h2::Error>());
        assert_eq!(h2.and_then(h2::Error::reason), Some(h2::Reason::CANCEL));
        assert!(!taken.all());

        // A sender that lets go of the body lets go of the client's with it.
        let dropped = Arc::new(AtomicBool::new(false));
        let b = Counted::new(Waiting(dropped.clone()), Arc::new(Taken::default()));
        drop(b);
        assert!(dropped.load(Ordering::Relaxed));
    }

    /// A body of these data frames, then `trailers` if given.
    fn body(data: &[&'static [u8]], trailers: bool) -> ProxyBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = data
            .iter()
            .map(|d| Ok(Frame::data(Bytes::from_static(d))))
            .collect();
        if trailers {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    /// The next frame, as text (`trailers` for trailers), or `None` at the end.
    async fn next(b: &mut Kept) -> Option<Result<String, String>> {
        let f = b.frame().await?;
        Some(match f {
            Ok(f) => match f.into_data() {
                Ok(d) => Ok(String::from_utf8_lossy(&d).into_owned()),
                Err(_) => Ok("trailers".into()),
            },
            Err(e) => Err(e.to_string()),
        })
    }

    async fn rest(b: &mut Kept) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(f) = next(b).await {
            all.push(f.unwrap());
        }
        all
    }

    #[tokio::test]
    async fn a_kept_body_goes_again_from_its_start_then_on_from_where_it_was() {
        let (mut first, keeper) = Kept::new(body(&[b"a", b"b", b"c"], true));
        assert_eq!(next(&mut first).await, Some(Ok("a".into())));
        assert_eq!(next(&mut first).await, Some(Ok("b".into())));
        let mut second = keeper.again().expect("all of it sent so far was kept");
        let taken = next(&mut first).await.unwrap().unwrap_err();
        assert_eq!(taken, TakenBack.to_string(), "the first handle is done");
        assert_eq!(next(&mut second).await, Some(Ok("a".into())));
        assert_eq!(rest(&mut second).await, ["b", "c", "trailers"]);
        // Sent whole and kept whole (trailers too): once more, all of it from the copy.
        let mut third = keeper.again().unwrap();
        assert_eq!(rest(&mut third).await, ["a", "b", "c", "trailers"]);
        assert!(next(&mut second).await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_body_past_the_limit_or_failed_or_answered_is_not_kept() {
        static BIG: [u8; KEPT_BODY_LIMIT / 2 + 1] = [b'x'; KEPT_BODY_LIMIT / 2 + 1];
        let (mut big, keeper) = Kept::new(body(&[&BIG, &BIG, b"z"], false));
        let _ = next(&mut big).await;
        assert!(keeper.again().is_some(), "half the limit is kept");
        // `again` made a new turn: read on with the handle it gave.
        let mut big = keeper.again().unwrap();
        let _ = next(&mut big).await;
        let _ = next(&mut big).await;
        assert!(keeper.again().is_none(), "past the limit");
        assert_eq!(rest(&mut big).await, ["z"], "the body itself goes on");

        let failing = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err::<Frame<Bytes>, BoxError>("client went away".into()),
        ]));
        let (mut failed, keeper) = Kept::new(failing.boxed_unsync());
        let _ = next(&mut failed).await;
        assert!(next(&mut failed).await.unwrap().is_err());
        assert!(keeper.again().is_none(), "a body that failed");

        let (mut answered, keeper) = Kept::new(body(&[b"a", b"b"], false));
        let _ = next(&mut answered).await;
        keeper.release();
        assert!(keeper.again().is_none(), "released once answered");
        assert_eq!(rest(&mut answered).await, ["b"]);
    }

    #[tokio::test]
    async fn a_kept_body_says_its_size_and_end_from_where_each_handle_is() {
        let (mut first, keeper) = Kept::new(full("0123456789"));
        assert_eq!(first.size_hint().exact(), Some(10));
        assert!(!first.is_end_stream());
        assert_eq!(next(&mut first).await, Some(Ok("0123456789".into())));
        assert!(
            first.is_end_stream(),
            "a body of known length ends with its data"
        );
        let mut second = keeper.again().unwrap();
        assert!(!first.is_end_stream(), "a handle whose turn is over");
        assert_eq!(second.size_hint().exact(), Some(10));
        assert!(!second.is_end_stream());
        assert_eq!(next(&mut second).await, Some(Ok("0123456789".into())));
        assert_eq!(second.size_hint().exact(), Some(0));
        assert!(second.is_end_stream());
        assert_eq!(next(&mut second).await, None);
        assert!(Kept::new(empty()).0.is_end_stream());
    }
}
