//! Connections to backends: HTTP/1.1 (pooled, one request at a time) or HTTP/2 (shared, up to
//! `backends.h2_streams_per_connection` requests at a time each), over TCP or TLS with the
//! endpoint's `server_cert_domain_san` as the name the certificate must carry.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::{ProxyBody, Taken};
use super::early::EarlyAnswer;
use crate::registry::Protocol;
use crate::routing::Endpoint;

/// Why a backend could not be reached. All are the backend's (or network's) fault, and all are
/// safe to retry on another endpoint because no request byte was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Tcp(std::io::Error),
    #[error("TLS to backend failed: {0}")]
    Tls(std::io::Error),
    #[error("endpoint requires TLS but backends.ca_certs is not configured")]
    NoTlsConfig,
    #[error("invalid server_cert_domain_san '{0}'")]
    BadSan(String),
    #[error("HTTP handshake with backend failed: {0}")]
    Handshake(hyper::Error),
    /// The h2 connection this request waited for could not be made.
    #[error("{message} (a connection another request was opening)")]
    Shared { kind: &'static str, message: String },
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Tcp(_) => "connect",
            ConnectError::Tls(_) | ConnectError::BadSan(_) => "tls",
            ConnectError::NoTlsConfig => "no_tls_config",
            ConnectError::Handshake(_) => "handshake",
            ConnectError::Shared { kind, .. } => kind,
        }
    }
}

/// Which pooled connections a request may use: those to the endpoint's address, with its TLS
/// name, speaking the same protocol. It holds the endpoint, so that making one per request
/// copies no strings; equality and hashing look only at those three.
#[derive(Clone)]
struct Key {
    ep: Arc<Endpoint>,
    h2: bool,
}

impl Key {
    fn new(ep: &Arc<Endpoint>, h2: bool) -> Key {
        Key { ep: ep.clone(), h2 }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.h2 == other.h2 && self.ep.addr == other.ep.addr && self.ep.tls_san == other.ep.tls_san
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ep.addr.hash(state);
        self.ep.tls_san.hash(state);
        self.h2.hash(state);
    }
}

/// A backend connection's sending half, with the connection's local address (`None` where the
/// socket did not say).
enum Sender {
    H1(H1Conn),
    H2(H2Conn),
}

/// An HTTP/1.1 backend connection.
struct H1Conn {
    send: http1::SendRequest<ProxyBody>,
    local: Option<SocketAddr>,
    /// Set when the app reset it while a request was being written ([`super::early`]).
    reset: Arc<AtomicBool>,
    /// The task that drives the connection; aborting it closes the connection.
    task: tokio::task::AbortHandle,
}

impl H1Conn {
    fn is_closed(&self) -> bool {
        self.send.is_closed() || self.reset.load(Ordering::Relaxed)
    }
}

/// An h2 backend connection and how many requests it carries.
#[derive(Clone)]
struct H2Conn {
    send: http2::SendRequest<ProxyBody>,
    /// Leases on it not yet dropped: requests whose response has not ended.
    streams: Arc<AtomicUsize>,
    /// The backend's `SETTINGS_MAX_CONCURRENT_STREAMS`, as its frames pass
    /// ([`super::h2_settings`]); unlimited until they say.
    max_streams: Arc<AtomicU32>,
    local: Option<SocketAddr>,
}

impl H2Conn {
    /// Whether it may take another request: fewer than `limit`
    /// (`backends.h2_streams_per_connection`) and than the backend allows.
    fn has_room(&self, limit: usize) -> bool {
        let allowed = limit.min(self.max_streams.load(Ordering::Relaxed) as usize);
        self.streams.load(Ordering::Relaxed) < allowed
    }

    /// One more request on this connection, until the returned slot is dropped.
    fn slot(&self) -> StreamSlot {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamSlot(self.streams.clone())
    }
}

/// A request's place on an h2 connection; given back when the lease is dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(c) => c.is_closed() || !c.send.is_ready(),
            Sender::H2(c) => c.send.is_closed() || !c.send.is_ready(),
        }
    }
}

/// What it took to open a new backend connection (GoRouter's `dns_time`, `dial_time` and
/// `tls_time` access-log fields); a pooled connection's request has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// Looking the endpoint's host name up; `None` for an address.
    pub dns: Option<Duration>,
    /// The TCP connect.
    pub dial: Duration,
    /// The TLS handshake; `None` for a plain endpoint.
    pub tls: Option<Duration>,
}

/// A connection checked out for one request.
pub struct Lease {
    sender: Sender,
    key: Key,
    /// How long it had been idle in the pool; `None` for a connection opened for this request.
    /// A failure to send on a pooled one is retried on a new one (and, after a while idle, a
    /// replayable request it took is sent again: `proxy::send_retrying_stale`).
    pub idle: Option<Duration>,
    /// For an h2 connection: this request's place among its streams.
    slot: Option<StreamSlot>,
    /// How the connection was opened, when it was opened for this request (boxed: most requests
    /// go out on a pooled one).
    pub setup: Option<Box<Setup>>,
}

impl Lease {
    fn new(sender: Sender, key: Key, idle: Option<Duration>) -> Lease {
        let slot = match &sender {
            Sender::H2(c) => Some(c.slot()),
            Sender::H1(..) => None,
        };
        Lease {
            sender,
            key,
            idle,
            slot,
            setup: None,
        }
    }

    fn opened(mut self, setup: Setup) -> Lease {
        self.setup = Some(Box::new(setup));
        self
    }

    /// Whether this is an h2 connection.
    pub fn is_h2(&self) -> bool {
        self.key.h2
    }

    /// The connection's local address (GoRouter's `local_address` access-log field).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.sender {
            Sender::H1(c) => c.local,
            Sender::H2(c) => c.local,
        }
    }
}

/// A send that failed; `request` is given back when nothing of it was sent.
pub struct SendFailure {
    pub error: hyper::Error,
    pub request: Option<Request<ProxyBody>>,
}

impl Lease {
    /// Sends one request on this connection.
    pub async fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Box<SendFailure>> {
        let res = match &mut self.sender {
            Sender::H1(c) => {
                let s = &mut c.send;
                if let Err(error) = s.ready().await {
                    return Err(Box::new(SendFailure {
                        error,
                        request: Some(req),
                    }));
                }
                s.try_send_request(req).await
            }
            Sender::H2(c) => c.send.try_send_request(req).await,
        };
        res.map_err(|mut e| {
            Box::new(SendFailure {
                request: e.take_message(),
                error: e.into_error(),
            })
        })
    }
}

/// The pool's maps hash their keys (an address and a TLS name from route registrations, never
/// from a client) with foldhash, randomly seeded per process. A request's check-out and check-in
/// each hash one key; with std's SipHash that was about 400 instructions of every request.
type Map<V> = HashMap<Key, V, foldhash::fast::RandomState>;

/// Idle backend connections, keyed by endpoint address and TLS name.
#[derive(Default)]
pub struct BackendPool {
    /// Idle connections per backend, oldest first (each list is in check-in order). An h2
    /// backend's list holds the connections its requests share, in the order they were opened,
    /// each with when it was last used.
    idle: Mutex<Map<VecDeque<(Sender, Instant)>>>,
    /// One connect at a time per h2 backend: requests arriving meanwhile wait for it and share
    /// the connection, rather than each opening its own (which a burst would otherwise do, only
    /// for all but one to be closed again). Holds when and how the last attempt failed.
    h2_connects: Mutex<Map<Arc<tokio::sync::Mutex<Option<Failed>>>>>,
    /// Check-ins since the maps were last swept of backends that have nothing pooled.
    checkins: AtomicUsize,
}

/// Check-ins between sweeps: endpoints come and go (app instances move), and the entries of
/// those that are gone would otherwise stay in the maps for the life of the process.
const SWEEP_EVERY: usize = 4096;
/// Unanswered keepalive probes that end a backend connection: Go's default, so the time a dead
/// backend takes to be found is GoRouter's for the same `keep_alive_probe_interval`.
pub(crate) const KEEPALIVE_PROBES: u32 = 9;

/// A failed h2 connect, for the requests that waited for it.
struct Failed {
    at: Instant,
    kind: &'static str,
    message: String,
}

/// Settings for connecting, from `backends` in the config.
pub struct ConnectSettings<'a> {
    pub tls: Option<&'a Arc<ClientConfig>>,
    /// Kernel TLS for TLS backends, when the start-up probe found it.
    pub ktls: Option<&'a crate::tls::KernelTls>,
    pub connect_timeout: Duration,
    /// TCP keepalive probes (`backends.keep_alive_probe_interval`; zero: none).
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// Requests one h2 backend connection carries at a time before another is opened.
    pub h2_streams: usize,
}

impl BackendPool {
    /// A connection to `ep`: an idle one when available, else a new one.
    pub async fn checkout(
        &self,
        ep: &Arc<Endpoint>,
        s: &ConnectSettings<'_>,
    ) -> Result<Lease, ConnectError> {
        let key = Key::new(ep, ep.protocol == Protocol::Http2);
        if let Some(lease) = self.take_idle(&key, s) {
            return Ok(lease);
        }
        if !key.h2 {
            return Box::pin(self.connect(ep, key, s, false)).await;
        }
        let gate = self
            .h2_connects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let waited_from = Instant::now();
        let mut last = gate.lock().await;
        // A connect that finished while this request waited is shared (if it has room left), or
        // its failure is.
        if let Some(lease) = self.take_idle(&key, s) {
            return Ok(lease);
        }
        if let Some(f) = last.as_ref().filter(|f| f.at >= waited_from) {
            return Err(ConnectError::Shared {
                kind: f.kind,
                message: f.message.clone(),
            });
        }
        match Box::pin(self.connect(ep, key, s, false)).await {
            Ok(lease) => {
                *last = None;
                // Listed at once, so that requests arriving from now on share it.
                if let Sender::H2(conn) = &lease.sender {
                    let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                    list_h2(idle.entry(lease.key.clone()).or_default(), conn);
                }
                Ok(lease)
            }
            Err(e) => {
                *last = Some(Failed {
                    at: Instant::now(),
                    kind: e.kind(),
                    message: e.to_string(),
                });
                Err(e)
            }
        }
    }

    /// A new connection that is never pooled: for protocol upgrades such as WebSocket (always
    /// HTTP/1.1, `upgrade`), and for a request that found its pooled connection closed.
    pub async fn connect_fresh(
        &self,
        ep: &Arc<Endpoint>,
        s: &ConnectSettings<'_>,
        upgrade: bool,
    ) -> Result<Lease, ConnectError> {
        let key = Key::new(ep, !upgrade && ep.protocol == Protocol::Http2);
        Box::pin(self.connect(ep, key, s, upgrade)).await
    }

    fn take_idle(&self, key: &Key, s: &ConnectSettings<'_>) -> Option<Lease> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let (sender, since) = if key.h2 {
            // Shared connections stay listed. Take the first one with room: the ones listed
            // later then fall idle first when the load drops, and expire.
            list.retain(|(c, since)| !c.is_closed() && now.duration_since(*since) < s.idle_timeout);
            list.iter_mut().find_map(|(c, since)| match c {
                Sender::H2(c) if c.has_room(s.h2_streams) => {
                    // In use, so not idle.
                    let last = std::mem::replace(since, now);
                    Some((Sender::H2(c.clone()), last))
                }
                _ => None,
            })
        } else {
            // Expired connections are the oldest: drop them from the front. Then take the most
            // recently used one that is still open. Amortised O(1) however many are idle.
            while list
                .front()
                .is_some_and(|(_, since)| now.duration_since(*since) >= s.idle_timeout)
            {
                list.pop_front();
            }
            loop {
                match list.pop_back() {
                    Some((c, _)) if c.is_closed() => continue,
                    other => break other,
                }
            }
        }?;
        Some(Lease::new(
            sender,
            key.clone(),
            Some(now.saturating_duration_since(since)),
        ))
    }

    /// Gives a connection back once its request's answer has ended, `body` being the request's.
    /// An HTTP/1.1 connection whose request body was not all sent is closed at once, whatever it
    /// is doing: it is mid-request, and an app that reads no more would hold its write. On an h2
    /// one the stream may stay open until hyper lets the body go (an app that gives no window
    /// keeps hyper waiting to send more), so its place stays taken until then. Otherwise a
    /// connection whose answer ended cleanly is checked in; one cut short is dropped (an HTTP/1.1
    /// one closes, an h2 one goes on carrying its other streams).
    pub fn give_back<B>(&self, mut lease: Lease, max_idle: usize, clean: bool, body: &Taken<B>) {
        let sent = body.all();
        if let (false, Some(slot)) = (sent, lease.slot.take()) {
            body.hold(Box::new(slot));
        }
        match &lease.sender {
            Sender::H1(c) if !sent => c.task.abort(),
            _ if clean => self.checkin(lease, max_idle),
            _ => {}
        }
    }

    /// Returns a connection after its response body was fully read: an HTTP/1.1 one to the idle
    /// list, an h2 one (which stays listed while it is shared) marked as used now.
    fn checkin(&self, lease: Lease, max_idle: usize) {
        let closed = match &lease.sender {
            Sender::H1(c) => c.is_closed(),
            Sender::H2(c) => c.send.is_closed(),
        };
        if closed {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if self.checkins.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            idle.retain(|_, list| {
                list.retain(|(s, _)| !s.is_closed());
                !list.is_empty()
            });
            // A gate nobody waits at or holds.
            self.h2_connects
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, gate| Arc::strong_count(gate) > 1);
        }
        let list = idle.entry(lease.key).or_default();
        match &lease.sender {
            Sender::H2(conn) => list_h2(list, conn),
            Sender::H1(..) if list.len() < max_idle => {
                list.push_back((lease.sender, Instant::now()))
            }
            Sender::H1(..) => {}
        }
    }

    /// Boxed by its callers: its future (TCP, TLS and HTTP handshakes, about 8 KiB) would
    /// otherwise be part of every request's future, which is moved into a box per request.
    async fn connect(
        &self,
        ep: &Endpoint,
        key: Key,
        s: &ConnectSettings<'_>,
        upgrades: bool,
    ) -> Result<Lease, ConnectError> {
        let (tcp, dns, dial) = tokio::time::timeout(s.connect_timeout, dial(&ep.host, ep.port))
            .await
            .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
            .map_err(ConnectError::Tcp)?;
        let local = tcp.local_addr().ok();
        let _ = tcp.set_nodelay(true);
        if !s.keep_alive.is_zero() {
            // As GoRouter's dialer: a backend that vanished without a word (its VM gone, a
            // partition) is found within about ten probes, rather than by the next request
            // that waits on it for `response_header_timeout`.
            let probes = socket2::TcpKeepalive::new()
                .with_time(s.keep_alive)
                .with_interval(s.keep_alive)
                .with_retries(KEEPALIVE_PROBES);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&probes) {
                tracing::debug!(endpoint = %ep.addr, error = %e, "TCP keepalive not set");
            }
        }
        let mut setup = Setup {
            dns,
            dial,
            tls: None,
        };
        let sender = match &ep.tls_san {
            None => handshake(TokioIo::new(tcp), local, key.h2, upgrades).await?,
            Some(san) => {
                let cfg = s.tls.ok_or(ConnectError::NoTlsConfig)?;
                let name = ServerName::try_from(san.clone())
                    .map_err(|_| ConnectError::BadSan(san.clone()))?;
                let tls_started = Instant::now();
                let Some(ktls) = s.ktls else {
                    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                    let tls = tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
                        .map_err(ConnectError::Tls)?;
                    setup.tls = Some(tls_started.elapsed());
                    let sender = handshake(TokioIo::new(tls), local, key.h2, upgrades).await?;
                    return Ok(Lease::new(sender, key, None).opened(setup));
                };
                // As for client connections: an unbuffered handshake, then the record crypto
                // goes to the kernel.
                let stream = tokio::time::timeout(
                    s.connect_timeout,
                    crate::tls::connect_kernel(tcp, cfg.clone(), name, ktls),
                )
                .await
                .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
                .map_err(ConnectError::Tls)?;
                setup.tls = Some(tls_started.elapsed());
                handshake(TokioIo::new(stream), local, key.h2, upgrades).await?
            }
        };
        Ok(Lease::new(sender, key, None).opened(setup))
    }
}

/// Connects to `host` (an address, or a name looked up first) on `port`: the stream, how long
/// the lookup took (`None` for an address) and how long the connect. A name's addresses are
/// tried in turn, as `TcpStream::connect` does.
async fn dial(host: &str, port: u16) -> std::io::Result<(TcpStream, Option<Duration>, Duration)> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        let started = Instant::now();
        let tcp = TcpStream::connect((ip, port)).await?;
        return Ok((tcp, None, started.elapsed()));
    }
    let started = Instant::now();
    let addrs = tokio::net::lookup_host((host, port)).await?;
    let dns = started.elapsed();
    let mut last = None;
    for addr in addrs {
        let started = Instant::now();
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok((tcp, Some(dns), started.elapsed())),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("'{host}' has no address"),
        )
    }))
}

/// Lists `conn` among the h2 connections a backend's requests share (again, if it expired from
/// the list while a long request held it), and marks it used now.
fn list_h2(list: &mut VecDeque<(Sender, Instant)>, conn: &H2Conn) {
    list.retain(|(c, _)| !c.is_closed());
    let listed = list.iter_mut().find_map(|(c, since)| match c {
        Sender::H2(c) if Arc::ptr_eq(&c.streams, &conn.streams) => Some(since),
        _ => None,
    });
    match listed {
        Some(since) => *since = Instant::now(),
        None => list.push_back((Sender::H2(conn.clone()), Instant::now())),
    }
}

/// The largest response head an h2 backend may send: as large as hyper takes from an HTTP/1.1
/// one (its read buffer's limit, 8 KiB + 400 KiB), where hyper's h2 default is 16 KiB, so an app
/// with large cookies or policy headers does not get a 502 for speaking h2 (Go's transport, so
/// GoRouter, takes 10 MB).
const MAX_H2_RESPONSE_HEAD: u32 = 8192 + 4096 * 100;

async fn handshake<T>(
    io: TokioIo<T>,
    local: Option<SocketAddr>,
    h2: bool,
    upgrades: bool,
) -> Result<Sender, ConnectError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    if h2 {
        let (io, max_streams) = super::h2_settings::SettingsWatch::new(io.into_inner());
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(MAX_H2_RESPONSE_HEAD)
            .handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend h2 connection closed");
            }
        });
        Ok(Sender::H2(H2Conn {
            send: sender,
            streams: Arc::default(),
            max_streams,
            local,
        }))
    } else {
        let io = EarlyAnswer::new(io.into_inner(), !upgrades);
        let reset = io.reset();
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Handshake)?;
        let task = tokio::spawn(async move {
            let res = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "backend connection closed");
            }
        });
        Ok(Sender::H1(H1Conn {
            send: sender,
            local,
            reset,
            task: task.abort_handle(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of a plain endpoint at `addr` (`ip:port`).
    fn key(addr: &str, h2: bool) -> Key {
        let (host, port) = addr.rsplit_once(':').unwrap();
        Key::new(&Arc::new(Endpoint::plain(host, port.parse().unwrap())), h2)
    }

    /// A lease on an in-memory HTTP/1.1 connection; dropping the returned task closes it.
    async fn lease(addr: &str) -> (Lease, tokio::task::JoinHandle<()>) {
        let (io, _peer) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await.unwrap();
        let task = tokio::spawn(async move {
            let _peer = _peer;
            let _ = conn.await;
        });
        let lease = Lease::new(
            Sender::H1(H1Conn {
                send: sender,
                local: None,
                reset: Arc::default(),
                task: task.abort_handle(),
            }),
            key(addr, false),
            None,
        );
        (lease, task)
    }

    /// An h2 backend on loopback that answers each request with its HTTP version: its endpoint.
    async fn h2_backend() -> Arc<Endpoint> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let v = format!("{:?}", req.version());
                    Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(v),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        Arc::new(Endpoint {
            protocol: Protocol::Http2,
            ..Endpoint::plain("127.0.0.1", port)
        })
    }

    fn settings() -> ConnectSettings<'static> {
        ConnectSettings {
            tls: None,
            ktls: None,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            max_idle: 100,
            h2_streams: 100,
        }
    }

    /// A request that found its pooled connection closed is retried on a fresh one, which for
    /// an h2 backend must speak h2 again (an h2-only backend cannot answer HTTP/1.1); only an
    /// upgrade (WebSocket) takes HTTP/1.1.
    #[tokio::test]
    async fn a_fresh_connection_to_an_h2_backend_speaks_h2_unless_upgrading() {
        let ep = h2_backend().await;
        let settings = settings();
        let port = ep.port;
        let pool = BackendPool::default();
        let mut fresh = pool.connect_fresh(&ep, &settings, false).await.unwrap();
        assert!(matches!(fresh.sender, Sender::H2(_)));
        let req = Request::get(format!("http://127.0.0.1:{port}/"))
            .version(http::Version::HTTP_2)
            .body(super::super::body::empty())
            .unwrap();
        let resp = match fresh.send(req).await {
            Ok(r) => r,
            Err(f) => panic!("h2 request on a fresh connection: {}", f.error),
        };
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0");
        let upgrade = pool.connect_fresh(&ep, &settings, true).await.unwrap();
        assert!(matches!(upgrade.sender, Sender::H1(..)));
    }

    /// An h2 stream whose answer ended before its request body was all sent keeps its place on
    /// the connection until the sender lets the body go (hyper keeps the stream open while it
    /// waits for window to send more); one whose body was all sent gives it back at once.
    #[tokio::test]
    async fn an_h2_stream_left_with_its_body_unsent_keeps_its_place() {
        use super::super::body::Counted;
        let ep = h2_backend().await;
        let pool = BackendPool::default();
        let lease = pool.checkout(&ep, &settings()).await.unwrap();
        let Sender::H2(conn) = &lease.sender else {
            panic!("an h2 connection");
        };
        let streams = conn.streams.clone();
        assert_eq!(streams.load(Ordering::Relaxed), 1);
        let unsent = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, super::super::body::BoxError>,
        >());
        let taken = Arc::new(Taken::default());
        let body = Counted::new(unsent, taken.clone());
        pool.give_back(lease, 100, true, &taken);
        drop(taken);
        assert_eq!(streams.load(Ordering::Relaxed), 1, "held with the body");
        drop(body);
        assert_eq!(streams.load(Ordering::Relaxed), 0, "let go with it");

        let lease = pool.checkout(&ep, &settings()).await.unwrap();
        assert_eq!(streams.load(Ordering::Relaxed), 1, "the same connection");
        let taken = Arc::new(Taken::default());
        let _body = Counted::new(super::super::body::empty(), taken.clone());
        pool.give_back(lease, 100, true, &taken);
        assert_eq!(streams.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn sweeps_forget_backends_that_have_nothing_pooled() {
        let pool = BackendPool::default();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (l, t) = lease(&format!("10.0.0.{i}:8080")).await;
            pool.checkin(l, 100);
            tasks.push(t);
        }
        assert_eq!(pool.idle.lock().unwrap().len(), 10);
        // The backends went away: their connections closed.
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        pool.h2_connects
            .lock()
            .unwrap()
            .insert(key("10.0.1.1:8080", true), Arc::default());
        let (l, _live) = lease("10.0.0.99:8080").await;
        pool.checkins.store(SWEEP_EVERY - 1, Ordering::Relaxed);
        pool.checkin(l, 100);
        let idle = pool.idle.lock().unwrap();
        assert_eq!(idle.len(), 1, "only the live backend is left");
        assert!(idle.contains_key(&key("10.0.0.99:8080", false)));
        assert!(pool.h2_connects.lock().unwrap().is_empty());
    }
}
