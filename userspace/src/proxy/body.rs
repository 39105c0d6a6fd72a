//! Body wrappers: count bytes, and run a completion hook exactly once when a body is finished or
//! dropped (which is when the access-log record is written and pooled connections are returned).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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

/// Called once with the number of bytes sent and whether the body ended cleanly.
pub type OnDone = Box<dyn FnOnce(u64, bool) + Send>;

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
                done(*this.bytes, false);
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

impl<B: Body<Data = Bytes>> Body for Finish<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
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
                        done(*this.bytes, true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.on_done.take() {
                    done(*this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.on_done.take() {
                    done(*this.bytes, false);
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
