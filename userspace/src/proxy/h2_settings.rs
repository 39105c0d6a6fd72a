//! What an h2 backend allows: its `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 §6.5.2), read
//! from the frames it sends, because hyper does not tell. Requests beyond it would queue on the
//! connection (hyper's client takes no further request while one waits for a stream), behind
//! the backend's long-running ones (a gRPC stream, an event stream) until those end; with the
//! limit known, the pool opens another connection instead, as Go's transport does.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const HEADER_LEN: usize = 9;
const ENTRY_LEN: usize = 6;

/// Follows the frame boundaries in the bytes an h2 peer sends, however they are split across
/// reads, and reports each `SETTINGS_MAX_CONCURRENT_STREAMS` the peer's SETTINGS frames carry.
/// It reads frame headers and SETTINGS payloads only; other payloads are stepped over. A
/// malformed frame is the h2 connection's to refuse: at worst this reads a wrong value, which
/// only decides when the pool opens another connection.
#[derive(Debug, Default)]
pub struct FrameWalk {
    head: [u8; HEADER_LEN],
    head_len: usize,
    /// Payload bytes of the current frame still to step over.
    skip: usize,
    /// Payload bytes of the current SETTINGS frame still to read.
    settings: usize,
    entry: [u8; ENTRY_LEN],
    entry_len: usize,
}

impl FrameWalk {
    /// Takes the next bytes the peer sent; `on_max` gets each value of
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_max: impl FnMut(u32)) {
        while !bytes.is_empty() {
            if self.settings > 0 {
                let n = bytes
                    .len()
                    .min(self.settings)
                    .min(ENTRY_LEN - self.entry_len);
                self.entry[self.entry_len..self.entry_len + n].copy_from_slice(&bytes[..n]);
                self.entry_len += n;
                self.settings -= n;
                bytes = &bytes[n..];
                if self.entry_len == ENTRY_LEN {
                    self.entry_len = 0;
                    let [i0, i1, v0, v1, v2, v3] = self.entry;
                    if u16::from_be_bytes([i0, i1]) == MAX_CONCURRENT_STREAMS {
                        on_max(u32::from_be_bytes([v0, v1, v2, v3]));
                    }
                }
                continue;
            }
            if self.skip > 0 {
                let n = bytes.len().min(self.skip);
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(HEADER_LEN - self.head_len);
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len < HEADER_LEN {
                continue;
            }
            self.head_len = 0;
            let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.head;
            let len = u32::from_be_bytes([0, l0, l1, l2]) as usize;
            let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
            // A SETTINGS frame whose length is not a multiple of 6 is a FRAME_SIZE_ERROR (RFC
            // 9113 §6.5), which the connection answers; it is stepped over here.
            let settings = kind == SETTINGS && flags & ACK == 0 && stream == 0;
            if settings && len.is_multiple_of(ENTRY_LEN) {
                self.settings = len;
                self.entry_len = 0;
            } else {
                self.skip = len;
            }
        }
    }
}

/// An h2 backend connection's transport, reading the backend's stream limit as its frames pass.
pub struct SettingsWatch<T> {
    inner: T,
    walk: FrameWalk,
    max_streams: Arc<AtomicU32>,
}

impl<T> SettingsWatch<T> {
    /// `max_streams` starts unlimited, as RFC 9113 has it until the peer's SETTINGS arrive.
    pub fn new(inner: T) -> (Self, Arc<AtomicU32>) {
        let max_streams = Arc::new(AtomicU32::new(u32::MAX));
        let watch = SettingsWatch {
            inner,
            walk: FrameWalk::default(),
            max_streams: max_streams.clone(),
        };
        (watch, max_streams)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SettingsWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let max = &this.max_streams;
            this.walk.feed(&buf.filled()[before..], |v| {
                max.store(v, Ordering::Relaxed);
            });
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SettingsWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn setting(id: u16, value: u32) -> Vec<u8> {
        let mut e = id.to_be_bytes().to_vec();
        e.extend(value.to_be_bytes());
        e
    }

    /// What a walk reports for `bytes` fed in pieces of `step` bytes.
    fn walk(bytes: &[u8], step: usize) -> Vec<u32> {
        let mut w = FrameWalk::default();
        let mut seen = Vec::new();
        for piece in bytes.chunks(step) {
            w.feed(piece, |v| seen.push(v));
        }
        seen
    }

    #[test]
    fn reads_the_stream_limit_from_settings_however_the_bytes_are_split() {
        let mut bytes = Vec::new();
        // The server's preface: initial window, then the limit, then frame size.
        let mut first = setting(0x4, 1 << 20);
        first.extend(setting(MAX_CONCURRENT_STREAMS, 10));
        first.extend(setting(0x5, 1 << 16));
        bytes.extend(frame(SETTINGS, 0, 0, &first));
        // Frames to step over, one of them holding what would read as a SETTINGS frame.
        let decoy = frame(SETTINGS, 0, 0, &setting(MAX_CONCURRENT_STREAMS, 99));
        bytes.extend(frame(0x0, 0x1, 1, &decoy));
        bytes.extend(frame(SETTINGS, ACK, 0, &[]));
        bytes.extend(frame(0x1, 0x4, 1, &[0x88; 300]));
        // A later change, and one on a stream (malformed: not a setting).
        bytes.extend(frame(SETTINGS, 0, 0, &setting(MAX_CONCURRENT_STREAMS, 0)));
        bytes.extend(frame(SETTINGS, 0, 3, &setting(MAX_CONCURRENT_STREAMS, 7)));
        // A SETTINGS frame of the wrong size is stepped over whole.
        let mut odd = setting(MAX_CONCURRENT_STREAMS, 5);
        odd.push(0);
        bytes.extend(frame(SETTINGS, 0, 0, &odd));
        bytes.extend(frame(SETTINGS, 0, 0, &setting(MAX_CONCURRENT_STREAMS, 250)));
        for step in [1, 2, 5, 6, 9, 10, 64, bytes.len()] {
            assert_eq!(
                walk(&bytes, step),
                [10, 0, 250],
                "fed {step} bytes at a time"
            );
        }
    }

    #[tokio::test]
    async fn the_watch_passes_bytes_through_and_keeps_the_latest_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::io::duplex(64);
        let (mut watch, max) = SettingsWatch::new(ours);
        assert_eq!(
            max.load(Ordering::Relaxed),
            u32::MAX,
            "unlimited until told"
        );
        let sent = frame(SETTINGS, 0, 0, &setting(MAX_CONCURRENT_STREAMS, 3));
        theirs.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        watch.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(max.load(Ordering::Relaxed), 3);
        watch.write_all(b"preface").await.unwrap();
        let mut echoed = [0u8; 7];
        theirs.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"preface");
    }
}
