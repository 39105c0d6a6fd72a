//! Handshakes for connections that move into kernel TLS, on rustls' unbuffered API.
//!
//! Only an unbuffered connection can become a [`rustls::kernel::KernelConnection`], which keeps
//! the TLS 1.3 key schedule after the hand-over: the kernel connection needs it to follow a
//! peer's KeyUpdate and to store a backend's session tickets (see [`super::kstream`]).
//!
//! Records are read from the socket one whole record at a time, so nothing past the handshake's
//! last record is taken off the socket: what the peer sends next stays for the kernel to decrypt.
//! Application data that arrives inside the handshake (a client's first request may follow its
//! Finished before the server's tickets are out) is decrypted here and served first.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
use rustls::{ClientConfig, Error as TlsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::accept::{conn_tls, linger, reset_on_close, Accepted, ConnTls, HandshakeFailure};
use super::kernel::KernelTls;
use super::kstream::{HandoffError, KernelStream};
use super::TlsServer;
use crate::names::{normalize_host, DomainPattern};
use crate::xdp::Refusal;

/// The largest record a peer may send: 2^14 bytes of plaintext plus the AEAD expansion RFC 8446
/// allows (§5.2).
const MAX_RECORD: usize = (1 << 14) + 256;

/// Why an unbuffered handshake stopped.
enum Stop {
    /// rustls refused the peer (its alert, if any, has been sent).
    Tls(TlsError),
    Io(io::Error),
    /// The caller may not reach the domain its ClientHello named.
    Refused(Refusal),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

impl From<Stop> for HandshakeFailure {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Tls(e) => HandshakeFailure::from_tls(&e),
            // Bytes that are not TLS records.
            Stop::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                HandshakeFailure::Protocol(e.to_string())
            }
            Stop::Io(e) => HandshakeFailure::Io(e),
            Stop::Refused(why) => HandshakeFailure::Refused(why),
        }
    }
}

/// A client connection whose handshake finished, before its keys go to the kernel.
pub struct KernelPending {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    early: Vec<u8>,
}

impl KernelPending {
    /// Moves the connection's record crypto into the kernel.
    pub fn into_kernel(self, ktls: &KernelTls) -> Result<KernelStream, HandoffError> {
        let (secrets, kernel) = self
            .conn
            .dangerous_into_kernel_connection()
            .map_err(HandoffError::Secrets)?;
        KernelStream::new(self.tcp, kernel.into(), secrets, self.early, ktls)
    }
}

/// Like [`super::accept`] for a connection that will move into the kernel: reads the
/// ClientHello, selects the config for its SNI and completes the handshake within `deadline`.
pub async fn accept_kernel(
    mut tcp: TcpStream,
    server: &TlsServer,
    deadline: Duration,
    refuse: impl Fn(&DomainPattern) -> Option<Refusal> + Sync,
) -> Result<Accepted<KernelPending>, (Option<DomainPattern>, HandshakeFailure)> {
    let mut pattern = None;
    let handshake = server_handshake(&mut tcp, server, &mut pattern, &refuse);
    let res = tokio::time::timeout(deadline, handshake).await;
    match res {
        Ok(Ok((conn, early, info))) => Ok(Accepted {
            stream: KernelPending { tcp, conn, early },
            info,
        }),
        Ok(Err(stop)) => {
            // As for userspace handshakes: let the client read the alert.
            match stop {
                Stop::Tls(_) => linger(tcp).await,
                Stop::Refused(_) => reset_on_close(std::os::fd::AsRawFd::as_raw_fd(&tcp)),
                Stop::Io(_) => {}
            }
            Err((pattern, stop.into()))
        }
        Err(_) => Err((pattern, HandshakeFailure::Timeout(deadline))),
    }
}

async fn server_handshake(
    tcp: &mut TcpStream,
    server: &TlsServer,
    pattern: &mut Option<DomainPattern>,
    refuse: &(dyn Fn(&DomainPattern) -> Option<Refusal> + Sync),
) -> Result<(UnbufferedServerConnection, Vec<u8>, ConnTls), Stop> {
    let mut incoming = Vec::new();
    let mut acceptor = Acceptor::default();
    let accepted = loop {
        let at = incoming.len();
        read_record(tcp, &mut incoming).await?;
        let mut record = &incoming[at..];
        while !record.is_empty() {
            if acceptor.read_tls(&mut record)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                alert.write_all(&mut out)?;
                tcp.write_all(&out).await?;
                return Err(Stop::Tls(e));
            }
        }
    };
    let sni = accepted.client_hello().server_name().map(normalize_host);
    let (config, mtls) = server.select(sni.as_deref());
    *pattern = mtls.clone();
    if let Some(why) = mtls.as_ref().and_then(refuse) {
        return Err(Stop::Refused(why));
    }
    // The connection that answers reads the same ClientHello records again.
    let mut conn = UnbufferedServerConnection::new(config).map_err(Stop::Tls)?;
    let early = complete(&mut conn, tcp, incoming).await?;
    let info = conn_tls(&conn, sni, mtls);
    Ok((conn, early, info))
}

/// Connects to a TLS backend and moves the connection into the kernel. The backend's session
/// tickets (which arrive after the handshake) are stored in `config`'s session store by the
/// kernel connection, so later connections resume.
pub async fn connect_kernel(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    ktls: &KernelTls,
) -> io::Result<KernelStream> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(io::Error::other)?;
    let early = match complete(&mut conn, &mut tcp, Vec::new()).await {
        Ok(early) => early,
        Err(Stop::Io(e)) => return Err(e),
        Err(Stop::Tls(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        // Only a server refuses a caller this way.
        Err(Stop::Refused(why)) => return Err(io::Error::other(format!("refused: {why:?}"))),
    };
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| io::Error::other(HandoffError::Secrets(e)))?;
    KernelStream::new(tcp, kernel.into(), secrets, early, ktls).map_err(io::Error::other)
}

/// One side of an unbuffered connection.
trait Unbuffered {
    type Data;
    fn handshaking(&self) -> bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

macro_rules! unbuffered {
    ($conn:ty, $data:ty) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
        }
    };
}
unbuffered!(
    UnbufferedServerConnection,
    rustls::server::ServerConnectionData
);
unbuffered!(
    UnbufferedClientConnection,
    rustls::client::ClientConnectionData
);

/// Drives `conn` until its handshake is complete and nothing is left to send; `incoming` holds
/// records already read. Returns the application data that arrived with the handshake.
async fn complete<C: Unbuffered>(
    conn: &mut C,
    tcp: &mut TcpStream,
    mut incoming: Vec<u8>,
) -> Result<Vec<u8>, Stop> {
    let mut outgoing = Vec::new();
    let mut early = Vec::new();
    // Bounded: every round either sends, reads a record, or finishes.
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming);
        let (mut read, mut done) = (false, false);
        match state {
            Err(e) => {
                incoming.drain(..discard);
                send_alert(conn, tcp, incoming).await;
                return Err(Stop::Tls(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(&mut enc, &mut outgoing),
            Ok(ConnectionState::TransmitTlsData(t)) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                t.done();
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(record) = r.next_record() {
                    early.extend_from_slice(record.map_err(Stop::Tls)?.payload);
                }
            }
            Ok(ConnectionState::BlockedHandshake) => read = true,
            Ok(ConnectionState::WriteTraffic(_)) => {
                // A TLS 1.3 server may send data before the client's Finished arrives; the
                // handshake (and the client's certificate check) is not over until it has.
                if conn.handshaking() {
                    read = true;
                } else {
                    done = true;
                }
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(Stop::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the handshake",
                )))
            }
            Ok(other) => {
                return Err(Stop::Io(io::Error::other(format!(
                    "unexpected TLS state during the handshake: {other:?}"
                ))))
            }
        }
        incoming.drain(..discard);
        if done {
            // Records are read whole and one at a time, so the handshake used up all of them.
            if !incoming.is_empty() || !outgoing.is_empty() {
                return Err(Stop::Io(io::Error::other(format!(
                    "handshake ended with {} bytes unread and {} unsent",
                    incoming.len(),
                    outgoing.len()
                ))));
            }
            return Ok(early);
        }
        if read {
            read_record(tcp, &mut incoming).await?;
        }
    }
}

/// Sends the alert rustls queued when it refused the peer (best effort). `incoming` is what is
/// left of the buffer rustls last saw: its deframer still refers to it.
async fn send_alert<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, mut incoming: Vec<u8>) {
    let mut out = Vec::new();
    for _ in 0..4 {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming);
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                encode(&mut enc, &mut out);
                true
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                true
            }
            _ => false,
        };
        incoming.drain(..discard);
        if !more {
            break;
        }
    }
    if !out.is_empty() {
        let _ = tcp.write_all(&out).await;
    }
}

/// Appends the record rustls has ready to `out`.
fn encode<D>(enc: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) {
    let need = match enc.encode(&mut []) {
        Err(EncodeError::InsufficientSize(s)) => s.required_size,
        _ => return,
    };
    let at = out.len();
    out.resize(at + need, 0);
    // Cannot fail: the buffer has the size rustls asked for.
    let _ = enc.encode(&mut out[at..]);
}

/// Appends one whole TLS record read from `tcp` to `into`.
async fn read_record(tcp: &mut TcpStream, into: &mut Vec<u8>) -> io::Result<()> {
    let at = into.len();
    into.resize(at + 5, 0);
    tcp.read_exact(&mut into[at..]).await?;
    let header = &into[at..at + 5];
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    // Content types change_cipher_spec..application_data, protocol major version 3.
    if !(20..=23).contains(&header[0]) || header[1] != 3 || len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a TLS record (header {header:02x?})"),
        ));
    }
    into.resize(at + 5 + len, 0);
    tcp.read_exact(&mut into[at + 5..]).await?;
    Ok(())
}
