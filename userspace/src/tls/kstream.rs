//! A connection whose TLS records are encrypted and decrypted by the kernel.
//!
//! Application data is plain socket I/O. What the kernel cannot do itself comes up as a record of
//! another type (`recvmsg` with `TLS_GET_RECORD_TYPE`), handled here instead of in the `ktls`
//! crate's stream, which panics on some record types a peer can send (change_cipher_spec,
//! malformed alerts):
//!
//! - alert: close_notify ends the read side cleanly, any other alert ends it with an error naming
//!   the alert;
//! - handshake: a backend's NewSessionTicket is stored (rustls' [`KernelConnection`] keeps the
//!   session, so later connections resume); a TLS 1.3 KeyUpdate is followed: the next receive
//!   keys go to the kernel at once, and when the peer asks for it, our own KeyUpdate is sent and
//!   the send keys replaced after it. Kernels before 6.14 cannot replace the keys of a live kTLS
//!   socket; there the connection ends with a specific error and a close_notify;
//! - anything else ends the connection with an error naming the record type.
//!
//! What rustls does for the connections it encrypts itself, and leaves to the user of a
//! [`KernelConnection`], is done here too: the records sent under one key are counted, and before
//! they reach the cipher suite's confidentiality limit (2^24 records for AES-GCM) a TLS 1.3
//! connection sends a KeyUpdate and moves to the next keys. Where that is impossible (TLS 1.2, or
//! a kernel before 6.14) the connection ends with a close_notify instead, as rustls ends a TLS 1.2
//! connection.
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use ktls::CryptoInfo;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::prefix::Prefix;

const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
/// Linux ≥ 6.0: the peer is expected not to pad TLS 1.3 records, so the kernel decrypts them
/// straight into the reader's buffer instead of into its own and then copying (a padded record
/// is decrypted again the slow way, never misread).
const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// A KeyUpdate handshake message with `request_update = update_not_requested`.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// Bytes of application data counted as one more record when estimating how many records a
/// write makes. The kernel fills records to 2^14 bytes and closes one early only when it runs out
/// of room for fragments; a quarter of that keeps the estimate above the records actually made,
/// and the kernel's own count is read when the estimate reaches the limit.
const BYTES_PER_RECORD_ESTIMATE: u64 = 1 << 12;

/// The TLS session's key schedule, kept by rustls after the hand-over.
pub enum Keys {
    /// A client connection accepted by the gateway.
    Server(KernelConnection<ServerConnectionData>),
    /// A connection the gateway opened to a TLS backend.
    Client(KernelConnection<ClientConnectionData>),
}

impl From<KernelConnection<ServerConnectionData>> for Keys {
    fn from(k: KernelConnection<ServerConnectionData>) -> Self {
        Keys::Server(k)
    }
}

impl From<KernelConnection<ClientConnectionData>> for Keys {
    fn from(k: KernelConnection<ClientConnectionData>) -> Self {
        Keys::Client(k)
    }
}

impl Keys {
    /// The next traffic keys for one direction (RFC 8446 §7.2), with their first sequence number.
    fn next(&mut self, dir: libc::c_int) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, dir) {
            (Keys::Server(k), TLS_TX) => k.update_tx_secret(),
            (Keys::Server(k), _) => k.update_rx_secret(),
            (Keys::Client(k), TLS_TX) => k.update_tx_secret(),
            (Keys::Client(k), _) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Keys::Server(k) => k.negotiated_cipher_suite(),
            Keys::Client(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// Why a connection could not move into the kernel. Its rustls state is consumed by then, so the
/// connection ends.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("rustls did not hand out the traffic secrets: {0}")]
    Secrets(rustls::Error),
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
    keys: Keys,
    /// Application data that arrived with the handshake, served first.
    early: Prefix,
    /// Handshake-record bytes not yet making a whole message.
    handshake: Vec<u8>,
    /// The peer asked for our KeyUpdate and it is not sent yet (the send buffer was full).
    key_update_due: bool,
    read_done: bool,
    close_notify_sent: bool,
    /// Records sent under the current send keys, at least (see [`BYTES_PER_RECORD_ESTIMATE`]).
    records_sent: u64,
    /// Records the send keys may encrypt, the KeyUpdate or close_notify that ends them included.
    record_limit: u64,
    /// Whether the send keys can be replaced when they reach `record_limit` (TLS 1.3 on a kernel
    /// that rekeys); if not, the connection ends there.
    updates_send_keys: bool,
}

impl KernelStream {
    /// Moves a connection whose handshake rustls finished into the kernel: `secrets` are the
    /// current traffic keys, `keys` derives the next ones.
    pub(super) fn new(
        tcp: TcpStream,
        keys: Keys,
        secrets: rustls::ExtractedSecrets,
        early: Vec<u8>,
        ktls: &super::KernelTls,
    ) -> Result<Self, HandoffError> {
        let suite = keys.suite();
        let records_sent = secrets.tx.0;
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
        set_keys(fd, TLS_TX, suite, secrets.tx)?;
        set_keys(fd, TLS_RX, suite, secrets.rx)?;
        if matches!(suite, SupportedCipherSuite::Tls13(_)) {
            expect_no_padding(fd);
        }
        Ok(Self {
            tcp,
            keys,
            early: Prefix::new(early),
            handshake: Vec::new(),
            key_update_due: false,
            read_done: false,
            close_notify_sent: false,
            records_sent,
            record_limit: ktls.record_limit(suite),
            updates_send_keys: ktls.updates_send_keys(suite),
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

    /// Follows the peer's KeyUpdate: the kernel decrypts with the next keys from the next
    /// record on; if the peer asked, our KeyUpdate follows and then our next send keys.
    fn key_update(&mut self, requested: bool) -> io::Result<()> {
        let next = self.keys.next(TLS_RX).map_err(|e| invalid(e.to_string()))?;
        if let Err(e) = set_keys(self.tcp.as_raw_fd(), TLS_RX, self.keys.suite(), next) {
            key_update_warning(&e);
            return Err(invalid(format!(
                "peer sent a TLS 1.3 KeyUpdate, which this kernel cannot follow ({e}); \
                 connection closed"
            )));
        }
        if requested {
            self.key_update_due = true;
            match self.send_key_update() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Sends our KeyUpdate (under the current keys) and moves the kernel to the next send keys.
    fn send_key_update(&mut self) -> io::Result<()> {
        send_record(self.tcp.as_raw_fd(), HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)?;
        self.key_update_sent()
    }

    /// After our KeyUpdate went out: everything we send from now on uses the next keys.
    fn key_update_sent(&mut self) -> io::Result<()> {
        self.key_update_due = false;
        let (seq, next) = self.keys.next(TLS_TX).map_err(|e| invalid(e.to_string()))?;
        set_keys(self.tcp.as_raw_fd(), TLS_TX, self.keys.suite(), (seq, next))
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.records_sent = seq;
        Ok(())
    }

    /// Before a write: how many bytes it may take so that the send keys stay below their record
    /// limit with one record to spare (for the KeyUpdate or close_notify that ends them). At the
    /// limit, per the kernel's own record count, the keys are updated, or the connection ends.
    fn poll_send_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_key_update(cx))?;
            let left = self
                .record_limit
                .saturating_sub(self.records_sent)
                .saturating_sub(1);
            if left > 0 {
                let bytes = left.saturating_mul(BYTES_PER_RECORD_ESTIMATE) - 1;
                return Poll::Ready(Ok(usize::try_from(bytes).unwrap_or(usize::MAX)));
            }
            let counted = self.kernel_records_sent()?;
            if counted < self.records_sent {
                self.records_sent = counted;
                continue;
            }
            if self.updates_send_keys {
                self.key_update_due = true;
                continue;
            }
            record_limit_warning(self.record_limit);
            ready!(self.poll_close_notify(cx))?;
            return Poll::Ready(Err(io::Error::other(format!(
                "the send keys encrypted the cipher suite's limit of {} records and this \
                 connection cannot update them (TLS 1.2, or a kernel before Linux 6.14); \
                 connection closed",
                self.record_limit
            ))));
        }
    }

    /// After a write of `bytes`: counts the records it made, at most.
    fn sent(&mut self, bytes: usize) {
        if bytes > 0 {
            self.records_sent = self
                .records_sent
                .saturating_add(bytes as u64 / BYTES_PER_RECORD_ESTIMATE + 1);
        }
    }

    /// The sequence number of the next record the kernel encrypts: the records sent under the
    /// current send keys. The kernel hands out the crypto_info of the send keys only to a buffer
    /// of exactly its size, which depends on the cipher; the sequence number is its last 8 bytes,
    /// big-endian.
    fn kernel_records_sent(&self) -> io::Result<u64> {
        let fd = self.tcp.as_raw_fd();
        let get = |buf: &mut [u8]| {
            let mut len = buf.len() as libc::socklen_t;
            // SAFETY: the kernel writes at most `len` bytes into `buf`.
            if unsafe {
                libc::getsockopt(fd, libc::SOL_TLS, TLS_TX, buf.as_mut_ptr().cast(), &mut len)
            } != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // struct tls_crypto_info: version, cipher_type (u16 each, host order).
        let mut head = [0u8; 4];
        get(&mut head)?;
        let size = match u16::from_ne_bytes([head[2], head[3]]) {
            // AES-GCM-128 (and AES-CCM-128): iv 8, key 16, salt 4, rec_seq 8.
            51 | 53 => 40,
            // AES-GCM-256: iv 8, key 32, salt 4, rec_seq 8; ChaCha20-Poly1305: iv 12, key 32,
            // rec_seq 8.
            52 | 54 => 56,
            other => {
                return Err(io::Error::other(format!(
                    "TLS_TX crypto_info of unknown cipher type {other}"
                )))
            }
        };
        let mut info = [0u8; 56];
        let info = &mut info[..size];
        get(info)?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&info[size - 8..]);
        Ok(u64::from_be_bytes(seq))
    }

    /// Sends a close_notify once, waiting for room in the send buffer.
    fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.close_notify_sent {
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            match self
                .tcp
                .try_io(Interest::WRITABLE, || send_record(fd, ALERT, &CLOSE_NOTIFY))
            {
                Ok(()) => self.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // The peer is gone; shutting down the socket is all that is left.
                Err(_) => self.close_notify_sent = true,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends a KeyUpdate the peer asked for before anything else is written.
    fn poll_key_update(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.key_update_due {
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            match self.tcp.try_io(Interest::WRITABLE, || {
                send_record(fd, HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)
            }) {
                Ok(()) => self.key_update_sent()?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
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
            let whole = 4 + len;
            let message = &rest[4..whole];
            match (*typ, &mut self.keys) {
                (NEW_SESSION_TICKET, Keys::Client(k)) => {
                    if let Err(e) = k.handle_new_session_ticket(message) {
                        break Some(Err(invalid(format!("bad NewSessionTicket: {e}"))));
                    }
                    at += whole;
                }
                (KEY_UPDATE, _) => {
                    // RFC 8446 §5.1: a KeyUpdate ends its record, since the keys change after it.
                    if at + whole != self.handshake.len() {
                        break Some(Err(invalid(
                            "KeyUpdate is not the last message of its record".into(),
                        )));
                    }
                    let requested = match message {
                        [0] => false,
                        [1] => true,
                        _ => break Some(Err(invalid(format!("malformed KeyUpdate {message:?}")))),
                    };
                    at += whole;
                    if let Err(e) = self.key_update(requested) {
                        break Some(Err(e));
                    }
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

/// Says once per process why connections end at their record limit here.
fn record_limit_warning(limit: u64) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            records = limit,
            "a kernel TLS connection sent as many records as its send keys may encrypt and cannot \
             update them (TLS 1.2, or a kernel before Linux 6.14 for TLS 1.3); such connections \
             end with a close_notify, and their clients reconnect"
        );
    }
}

/// Says once per process why KeyUpdates end kernel TLS connections here.
fn key_update_warning(e: &HandoffError) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %e,
            "a peer sent a TLS 1.3 KeyUpdate on a kernel TLS connection and this kernel cannot \
             replace the keys of a live kTLS socket (Linux 6.14 can); such connections end \
             (set tls.ktls: off if your clients update keys)"
        );
    }
}

/// Whether the kernel replaces the keys of a live kTLS socket, as following a TLS 1.3 KeyUpdate
/// needs (Linux 6.14): sets send keys twice on `fd`, a connected socket with the `tls` ULP that
/// carries no traffic; older kernels refuse the second time (EBUSY).
pub(super) fn kernel_rekeys(fd: RawFd) -> bool {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384;
    let keys = || {
        let key = rustls::crypto::cipher::AeadKey::from([0u8; 32]);
        let iv = rustls::crypto::cipher::Iv::from([0u8; 12]);
        (0, ConnectionTrafficSecrets::Aes256Gcm { key, iv })
    };
    set_keys(fd, TLS_TX, suite, keys()).is_ok() && set_keys(fd, TLS_TX, suite, keys()).is_ok()
}

/// Sets [`TLS_RX_EXPECT_NO_PAD`] where the kernel has it (older kernels refuse the option; the
/// connection works the same without it). rustls, Go, OpenSSL and BoringSSL do not pad.
fn expect_no_padding(fd: RawFd) {
    let on: u32 = 1;
    // SAFETY: setsockopt on a socket we own, with a valid u32 and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            TLS_RX_EXPECT_NO_PAD,
            (&on as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        );
    }
}

/// Gives the kernel the keys for one direction.
fn set_keys(
    fd: RawFd,
    dir: libc::c_int,
    suite: SupportedCipherSuite,
    secrets: (u64, ConnectionTrafficSecrets),
) -> Result<(), HandoffError> {
    let info = CryptoInfo::from_rustls(suite, secrets)
        .map_err(|e| HandoffError::Suite(format!("{e:?}")))?;
    let name = if dir == TLS_TX { "TLS_TX" } else { "TLS_RX" };
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
    Ok(())
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
        if this.early.serve(buf) {
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
        let room = ready!(this.poll_send_room(cx))?;
        let buf = &buf[..buf.len().min(room)];
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.sent(n);
        Poll::Ready(Ok(n))
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
        let room = ready!(this.poll_send_room(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = if total <= room {
            ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?
        } else {
            // Near the limit only: as much of the buffers as the keys have room for.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            ready!(Pin::new(&mut this.tcp).poll_write(cx, &first[..first.len().min(room)]))?
        };
        this.sent(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Best effort: a peer that asked for new keys reads the close_notify under them.
        let _ = ready!(this.poll_key_update(cx));
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
