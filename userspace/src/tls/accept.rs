//! Accepting one TLS connection: read the ClientHello, pick the config for its SNI, handshake,
//! all under one deadline.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::{CertificateError, Error as TlsError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::TlsServer;
use crate::identity::PeerCert;
use crate::names::{normalize_host, DomainPattern};
use crate::xdp::Refusal;

/// What a connection's TLS handshake established.
#[derive(Clone, Debug, Default)]
pub struct ConnTls {
    /// The normalised SNI, when the client sent one.
    pub sni: Option<String>,
    /// The mTLS domain pattern a client certificate was required (and verified) for.
    pub mtls: Option<DomainPattern>,
    /// The verified leaf, parsed once.
    pub peer: Option<Arc<PeerCert>>,
    /// The protocol ALPN settled on.
    pub alpn: Alpn,
}

/// The application protocol a TLS client and the gateway agreed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Alpn {
    /// The client offered no protocol the gateway speaks (or none at all).
    #[default]
    None,
    Http1,
    H2,
}

/// A completed handshake: the connection (a rustls stream, or one about to move into the
/// kernel) and what the handshake established.
pub struct Accepted<S> {
    pub stream: S,
    pub info: ConnTls,
}

/// Why a handshake failed. The label is the `result` of `portcullis_tls_handshakes_total`.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("client sent no certificate")]
    NoCertificate,
    #[error("client certificate is not issued by the domain's CA")]
    UnknownCa,
    #[error("client certificate has expired")]
    Expired,
    #[error("client certificate is not valid yet")]
    NotYetValid,
    #[error("client certificate was revoked")]
    Revoked,
    #[error("bad client certificate: {0}")]
    BadCertificate(String),
    /// No protocol version, cipher suite or key exchange in common (`tls.min_version` and
    /// `tls.cipher_suites` keep clients out this way).
    #[error("client offers nothing the gateway accepts: {0}")]
    Incompatible(String),
    #[error("TLS protocol error: {0}")]
    Protocol(String),
    #[error("connection error: {0}")]
    Io(std::io::Error),
    /// The gate's decision, taken by the daemon on the domain the ClientHello named (outside
    /// its `allowed_sources`, or denied on it): the connection is closed before any
    /// cryptography. The XDP gate refuses such ClientHellos before they reach the daemon; this
    /// catches those it passes unread (split across TCP segments, as a post-quantum ClientHello
    /// on a 1,500-byte MTU is) and hosts without it.
    #[error("refused before the handshake: {0:?}")]
    Refused(Refusal),
}

impl HandshakeFailure {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeFailure::Timeout(_) => "timeout",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::BadCertificate(_) => "bad_certificate",
            HandshakeFailure::Incompatible(_) => "incompatible",
            HandshakeFailure::Protocol(_) => "protocol",
            HandshakeFailure::Io(_) => "io",
            HandshakeFailure::Refused(Refusal::Denied) => "denied",
            HandshakeFailure::Refused(Refusal::NotAllowed) => "not_allowed",
        }
    }

    /// Whether the failure is the client's certificate's fault (deny learning counts these).
    pub fn is_certificate_failure(&self) -> bool {
        matches!(
            self,
            HandshakeFailure::NoCertificate
                | HandshakeFailure::UnknownCa
                | HandshakeFailure::Expired
                | HandshakeFailure::NotYetValid
                | HandshakeFailure::Revoked
                | HandshakeFailure::BadCertificate(_)
        )
    }

    fn from_io(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<TlsError>())
        {
            Some(tls) => Self::from_tls(tls),
            None => HandshakeFailure::Io(e),
        }
    }

    pub(super) fn from_tls(tls: &TlsError) -> Self {
        match tls {
            TlsError::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            TlsError::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    HandshakeFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    HandshakeFailure::NotYetValid
                }
                CertificateError::Revoked => HandshakeFailure::Revoked,
                other => HandshakeFailure::BadCertificate(format!("{other:?}")),
            },
            TlsError::PeerIncompatible(why) => HandshakeFailure::Incompatible(format!("{why:?}")),
            other => HandshakeFailure::Protocol(other.to_string()),
        }
    }
}

/// Reads the ClientHello, selects the config for its SNI and completes the handshake within
/// `deadline`. On failure, returns the mTLS pattern the SNI selected (for labels) with the reason.
/// `refuse`: why the caller may not reach the mTLS domain its SNI selected, if it may not; the
/// connection then ends right after the ClientHello ([`HandshakeFailure::Refused`]).
pub async fn accept<IO: AsyncRead + AsyncWrite + AsRawFd + Unpin>(
    tcp: IO,
    server: &TlsServer,
    deadline: Duration,
    refuse: impl Fn(&DomainPattern) -> Option<Refusal> + Sync,
) -> Result<Accepted<TlsStream<IO>>, (Option<DomainPattern>, HandshakeFailure)> {
    let mut pattern = None;
    let mut refused = None;
    let fd = tcp.as_raw_fd();
    let fut = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(HandshakeFailure::from_io)?;
        let sni = start.client_hello().server_name().map(normalize_host);
        let (config, mtls) = server.select(sni.as_deref());
        pattern = mtls.clone();
        if let Some(why) = mtls.as_ref().and_then(&refuse) {
            // `start` owns the socket until it is dropped on return.
            reset_on_close(fd);
            return Err(HandshakeFailure::Refused(why));
        }
        let stream = match start.into_stream(config).into_fallible().await {
            Ok(stream) => stream,
            Err((e, io)) => {
                refused = Some(io);
                return Err(HandshakeFailure::from_io(e));
            }
        };
        let info = conn_tls(stream.get_ref().1, sni, mtls);
        Ok(Accepted { stream, info })
    };
    let res = tokio::time::timeout(deadline, fut).await;
    if let Some(io) = refused {
        linger(io).await;
    }
    match res {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err((pattern, e)),
        Err(_) => Err((pattern, HandshakeFailure::Timeout(deadline))),
    }
}

/// What a finished handshake established.
pub(super) fn conn_tls(
    conn: &rustls::CommonState,
    sni: Option<String>,
    mtls: Option<DomainPattern>,
) -> ConnTls {
    let peer = if mtls.is_some() {
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| Arc::new(PeerCert::from_der(leaf)))
    } else {
        None
    };
    let alpn = match conn.alpn_protocol() {
        Some(b"h2") => Alpn::H2,
        Some(b"http/1.1") => Alpn::Http1,
        _ => Alpn::None,
    };
    ConnTls {
        sni,
        mtls,
        peer,
        alpn,
    }
}

/// Makes closing the socket abort the connection (a RST, `SO_LINGER` 0): for a caller refused
/// after its ClientHello, as the XDP gate answers it, and so that the gateway's side of a flood
/// of refused connections leaves no socket behind in `TIME_WAIT` (an orderly close by the
/// gateway would, for 60 s each).
pub(super) fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller; the option is read from `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// How long a refused handshake's socket is kept open to let the client read the alert.
const LINGER: Duration = Duration::from_secs(1);

/// Closes a connection whose handshake was refused so that the client reads the alert: a TLS 1.3
/// client sends its certificate, Finished and often its first request in one flight, and closing
/// a socket with that unread would make the kernel answer with a reset, which can destroy the
/// alert before the client reads it. So: end our side, then read and discard what the client
/// still sends until it closes, for at most `LINGER` and 64 KiB.
pub(super) async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
