//! A connection whose TLS records are encrypted and decrypted by the kernel.
//!
//! Application data is plain socket I/O. What the kernel cannot do itself comes up as a record of
//! another type (`recvmsg` with `TLS_GET_RECORD_TYPE`), handled here instead of in the `ktls`
//! crate's stream, which panics on some record types a peer can send (change_cipher_spec,
//! malformed alerts):
//!
//! - alert: close_notify ends the read side cleanly, any other alert ends it with an error naming
//!   the alert;
//! - handshake: NewSessionTicket from a backend is skipped (tickets are not stored for kernel
//!   connections); KeyUpdate cannot be followed, because rustls' buffered connections do not hand
//!   out the traffic secrets it needs, so the connection ends with a specific error (and a
//!   close_notify to the peer) rather than failing to decrypt the next record;
//! - anything else ends the connection with an error naming the record type.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use ktls::{CorkStream, CryptoInfo};
use rustls::SupportedCipherSuite;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::prefix::Prefix;

const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// Which end of the TLS session this gateway is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A client connection accepted by the gateway.
    Server,
    /// A connection the gateway opened to a TLS backend.
    Client,
}

/// Why a connection could not move into the kernel. Its rustls state is consumed by then, so the
/// connection ends.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("reading the plaintext rustls had already decrypted: {0}")]
    Drain(io::Error),
    #[error("rustls did not hand out the traffic secrets: {0}")]
    Secrets(rustls::Error),
    #[error("no negotiated cipher suite")]
    NoSuite,
    #[error("the kernel cannot take this cipher suite: {0}")]
    Suite(String),
    #[error("setsockopt TCP_ULP \"tls\": {0}")]
    Ulp(io::Error),
    #[error("setsockopt SOL_TLS {0}: {1}")]
    Keys(&'static str, io::Error),
}

/// An established TLS connection in kernel TLS. See the module documentation.
pub struct KernelStream {
    tcp: TcpStream,
    side: Side,
    /// Plaintext rustls had decrypted before the switch, served first.
    drained: Prefix,
    /// Handshake-record bytes not yet making a whole message.
    handshake: Vec<u8>,
    read_done: bool,
    close_notify_sent: bool,
}

/// Moves an established connection into the kernel: an accepted client connection
/// (`tokio_rustls::server::TlsStream`) or one to a TLS backend (`client::TlsStream`).
pub async fn handoff(
    stream: impl Into<tokio_rustls::TlsStream<CorkStream<TcpStream>>>,
) -> Result<KernelStream, HandoffError> {
    let mut stream = stream.into();
    stream.get_mut().0.corked = true;
    let drained = drain(&mut stream).await.map_err(HandoffError::Drain)?;
    let (cork, conn, side): (_, rustls::Connection, _) = match stream {
        tokio_rustls::TlsStream::Server(s) => {
            let (cork, conn) = s.into_inner();
            (cork, conn.into(), Side::Server)
        }
        tokio_rustls::TlsStream::Client(s) => {
            let (cork, conn) = s.into_inner();
            (cork, conn.into(), Side::Client)
        }
    };
    let suite = conn.negotiated_cipher_suite();
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(HandoffError::Secrets)?;
    KernelStream::new(cork.io, side, suite, secrets, drained)
}

/// Reads what rustls has buffered; the corked stream reads nothing past the record boundary, so
/// this ends without waiting on the peer.
async fn drain(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // What a corked stream reports at the boundary when rustls wanted more.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

impl KernelStream {
    fn new(
        tcp: TcpStream,
        side: Side,
        suite: Option<SupportedCipherSuite>,
        secrets: rustls::ExtractedSecrets,
        drained: Vec<u8>,
    ) -> Result<Self, HandoffError> {
        let suite = suite.ok_or(HandoffError::NoSuite)?;
        let fd = tcp.as_raw_fd();
        let name = b"tls";
        // SAFETY: setsockopt on a socket we own, with a valid buffer and length.
        if unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_ULP,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        } != 0
        {
            return Err(HandoffError::Ulp(io::Error::last_os_error()));
        }
        for (dir, name, secrets) in [
            (TLS_TX, "TLS_TX", secrets.tx),
            (TLS_RX, "TLS_RX", secrets.rx),
        ] {
            let info = CryptoInfo::from_rustls(suite, secrets)
                .map_err(|e| HandoffError::Suite(format!("{e:?}")))?;
            // SAFETY: the pointer and size describe the crypto_info struct `info` owns.
            if unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_TLS,
                    dir,
                    info.as_ptr(),
                    info.size() as libc::socklen_t,
                )
            } != 0
            {
                return Err(HandoffError::Keys(name, io::Error::last_os_error()));
            }
        }
        Ok(Self {
            tcp,
            side,
            drained: Prefix::new(drained),
            handshake: Vec::new(),
            read_done: false,
            close_notify_sent: false,
        })
    }

    /// Sends `payload` as one record of type `record` (encrypted by the kernel), without waiting
    /// for room in the send buffer. The gateway sends alerts this way; tests play a misbehaving
    /// peer with it.
    pub fn send_record(&self, record: u8, payload: &[u8]) -> io::Result<()> {
        send_record(self.tcp.as_raw_fd(), record, payload)
    }

    /// Sends a close_notify alert once (best effort when the send buffer is full).
    fn send_close_notify(&mut self) -> io::Result<()> {
        if self.close_notify_sent {
            return Ok(());
        }
        self.close_notify_sent = true;
        send_record(self.tcp.as_raw_fd(), ALERT, &CLOSE_NOTIFY)
    }

    /// Handles a non-data record; `Some` ends the read side (`Ok(())` = clean end of stream).
    fn control_record(&mut self, record: u8, payload: &[u8]) -> Option<io::Result<()>> {
        match record {
            ALERT => {
                self.handshake.clear();
                Some(match payload {
                    [_, 0] => Ok(()),
                    [level, description] => Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("peer sent TLS alert {description} (level {level})"),
                    )),
                    _ => Err(invalid(format!(
                        "malformed TLS alert record ({} bytes)",
                        payload.len()
                    ))),
                })
            }
            HANDSHAKE => {
                self.handshake.extend_from_slice(payload);
                self.handshake_messages()
            }
            CHANGE_CIPHER_SPEC => Some(Err(invalid(
                "peer sent change_cipher_spec after the handshake".into(),
            ))),
            other => Some(Err(invalid(format!(
                "peer sent a TLS record of unknown type {other}"
            )))),
        }
    }

    /// Consumes the whole handshake messages buffered so far.
    fn handshake_messages(&mut self) -> Option<io::Result<()>> {
        let mut at = 0;
        let result = loop {
            let rest = &self.handshake[at..];
            let [typ, a, b, c, body @ ..] = rest else {
                break None;
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if len > 1 << 16 {
                break Some(Err(invalid(format!(
                    "post-handshake message of {len} bytes"
                ))));
            }
            if body.len() < len {
                break None;
            }
            match (*typ, self.side) {
                // Tickets from a backend; kernel connections do not keep them.
                (NEW_SESSION_TICKET, Side::Client) => at += 4 + len,
                (KEY_UPDATE, _) => {
                    key_update_warning();
                    break Some(Err(invalid(
                        "peer sent a TLS 1.3 KeyUpdate, which a kernel TLS connection cannot \
                         follow here (rustls does not hand out the traffic secrets); \
                         connection closed"
                            .into(),
                    )));
                }
                (t, _) => {
                    break Some(Err(invalid(format!(
                        "unexpected post-handshake message type {t}"
                    ))))
                }
            }
        };
        self.handshake.drain(..at);
        if result.as_ref().is_some_and(|r| r.is_err()) {
            // Tell the peer the session is over rather than leave it to a reset.
            let _ = self.send_close_notify();
        }
        result
    }
}

/// Says once per process why client KeyUpdates end kernel TLS connections.
fn key_update_warning() {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a peer sent a TLS 1.3 KeyUpdate on a kernel TLS connection; such connections end \
             (set tls.ktls: off if your clients update keys)"
        );
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One `recvmsg`: bytes read and the record type they belong to.
fn recv_record(fd: RawFd, dst: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<(usize, u8)> {
    // Room for one cmsghdr carrying one byte, aligned for cmsghdr.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields set point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg writes at most iov_len bytes into dst and the control buffer.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record = APPLICATION_DATA;
    // SAFETY: the CMSG macros walk the control buffer the kernel just filled.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if !c.is_null() && (*c).cmsg_level == libc::SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE
        {
            record = *libc::CMSG_DATA(c);
        }
    }
    Ok((n as usize, record))
}

/// Sends `payload` as one record of type `record` (the kernel encrypts it).
fn send_record(fd: RawFd, record: u8, payload: &[u8]) -> io::Result<()> {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields set point at live buffers, and the cmsg
    // written fits the control buffer (CMSG_SPACE(1) is 24 bytes on 64-bit Linux).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = record;
        if libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for KernelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.drained.serve(buf) {
            return Poll::Ready(Ok(()));
        }
        if this.read_done || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            // SAFETY: recv_record only writes into the unfilled part; assume_init covers what
            // the kernel wrote.
            let dst = unsafe { buf.unfilled_mut() };
            let (n, record) = match this.tcp.try_io(Interest::READABLE, || recv_record(fd, dst)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if record == APPLICATION_DATA || n == 0 {
                // SAFETY: the kernel initialised these n bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                if n == 0 {
                    this.read_done = true;
                }
                return Poll::Ready(Ok(()));
            }
            // SAFETY: the kernel initialised these n bytes; they are copied out and not
            // handed to the caller.
            let payload: Vec<u8> = unsafe {
                std::slice::from_raw_parts(buf.unfilled_mut().as_ptr().cast::<u8>(), n).to_vec()
            };
            if let Some(end) = this.control_record(record, &payload) {
                this.read_done = true;
                return Poll::Ready(end);
            }
        }
    }
}

impl AsyncWrite for KernelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_notify_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_notify_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_notify_sent {
            ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            match this
                .tcp
                .try_io(Interest::WRITABLE, || send_record(fd, ALERT, &CLOSE_NOTIFY))
            {
                Ok(()) => this.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // The peer is gone; shutting down the socket is all that is left.
                Err(_) => this.close_notify_sent = true,
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
