//! Connections to backends: HTTP/1.1 (pooled, one request at a time) or HTTP/2 (shared), over TCP
//! or TLS with the endpoint's `server_cert_domain_san` as the name the certificate must carry.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::ProxyBody;
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
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Tcp(_) => "connect",
            ConnectError::Tls(_) | ConnectError::BadSan(_) => "tls",
            ConnectError::NoTlsConfig => "no_tls_config",
            ConnectError::Handshake(_) => "handshake",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    addr: String,
    san: Option<String>,
    h2: bool,
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed() || !s.is_ready(),
            Sender::H2(s) => s.is_closed() || !s.is_ready(),
        }
    }
}

/// A connection checked out for one request.
pub struct Lease {
    sender: Sender,
    key: Key,
    /// Whether it came from the idle pool (a failure to send on it is then retried on a new one).
    pub reused: bool,
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
            Sender::H1(s) => {
                if let Err(error) = s.ready().await {
                    return Err(Box::new(SendFailure {
                        error,
                        request: Some(req),
                    }));
                }
                s.try_send_request(req).await
            }
            Sender::H2(s) => s.try_send_request(req).await,
        };
        res.map_err(|mut e| {
            Box::new(SendFailure {
                request: e.take_message(),
                error: e.into_error(),
            })
        })
    }
}

/// Idle backend connections, keyed by endpoint address and TLS name.
#[derive(Default)]
pub struct BackendPool {
    /// Idle connections per backend, oldest first (each list is in check-in order).
    idle: Mutex<HashMap<Key, VecDeque<(Sender, Instant)>>>,
}

/// Settings for connecting, from `backends` in the config.
pub struct ConnectSettings<'a> {
    pub tls: Option<&'a Arc<ClientConfig>>,
    /// Kernel TLS for TLS backends, when the start-up probe found it.
    pub ktls: Option<&'a crate::tls::KernelTls>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl BackendPool {
    /// A connection to `ep`: an idle one when available, else a new one.
    pub async fn checkout(
        &self,
        ep: &Endpoint,
        s: &ConnectSettings<'_>,
    ) -> Result<Lease, ConnectError> {
        let key = Key {
            addr: ep.addr.clone(),
            san: ep.tls_san.clone(),
            h2: ep.protocol == Protocol::Http2,
        };
        if let Some(lease) = self.take_idle(&key, s.idle_timeout) {
            return Ok(lease);
        }
        self.connect(ep, key, s, false).await
    }

    /// A new connection that is never pooled (for protocol upgrades such as WebSocket).
    pub async fn connect_fresh(
        &self,
        ep: &Endpoint,
        s: &ConnectSettings<'_>,
    ) -> Result<Lease, ConnectError> {
        let key = Key {
            addr: ep.addr.clone(),
            san: ep.tls_san.clone(),
            h2: false,
        };
        self.connect(ep, key, s, true).await
    }

    fn take_idle(&self, key: &Key, idle_timeout: Duration) -> Option<Lease> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        // Expired connections are the oldest: drop them from the front. Then take the most
        // recently used one that is still open. Amortised O(1) however many are idle.
        while list
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= idle_timeout)
        {
            list.pop_front();
        }
        let sender = if key.h2 {
            list.retain(|(s, _)| !s.is_closed());
            match list.front() {
                Some((Sender::H2(s), _)) => Some(Sender::H2(s.clone())),
                _ => None,
            }
        } else {
            loop {
                match list.pop_back() {
                    Some((s, _)) if s.is_closed() => continue,
                    other => break other.map(|(s, _)| s),
                }
            }
        }?;
        Some(Lease {
            sender,
            key: key.clone(),
            reused: true,
        })
    }

    /// Returns an HTTP/1.1 connection after its response body was fully read.
    pub fn checkin(&self, lease: Lease, max_idle: usize) {
        let closed = match &lease.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        };
        if closed {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let list = idle.entry(lease.key).or_default();
        if matches!(lease.sender, Sender::H2(_)) {
            if list.is_empty() {
                list.push_back((lease.sender, Instant::now()));
            }
        } else if list.len() < max_idle {
            list.push_back((lease.sender, Instant::now()));
        }
    }

    async fn connect(
        &self,
        ep: &Endpoint,
        key: Key,
        s: &ConnectSettings<'_>,
        upgrades: bool,
    ) -> Result<Lease, ConnectError> {
        let tcp = tokio::time::timeout(
            s.connect_timeout,
            TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
        .map_err(ConnectError::Tcp)?;
        let _ = tcp.set_nodelay(true);
        let sender = match &ep.tls_san {
            None => handshake(TokioIo::new(tcp), key.h2, upgrades).await?,
            Some(san) => {
                let cfg = s.tls.ok_or(ConnectError::NoTlsConfig)?;
                let name = ServerName::try_from(san.clone())
                    .map_err(|_| ConnectError::BadSan(san.clone()))?;
                if s.ktls.is_none() {
                    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                    let tls = tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
                        .map_err(ConnectError::Tls)?;
                    return Ok(Lease {
                        sender: handshake(TokioIo::new(tls), key.h2, upgrades).await?,
                        key,
                        reused: false,
                    });
                }
                // As for client connections: an unbuffered handshake, then the record crypto
                // goes to the kernel.
                let stream = tokio::time::timeout(
                    s.connect_timeout,
                    crate::tls::connect_kernel(tcp, cfg.clone(), name),
                )
                .await
                .map_err(|_| ConnectError::Timeout(s.connect_timeout))?
                .map_err(ConnectError::Tls)?;
                handshake(TokioIo::new(stream), key.h2, upgrades).await?
            }
        };
        Ok(Lease {
            sender,
            key,
            reused: false,
        })
    }
}

async fn handshake<T>(io: TokioIo<T>, h2: bool, upgrades: bool) -> Result<Sender, ConnectError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend h2 connection closed");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let res = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "backend connection closed");
            }
        });
        Ok(Sender::H1(sender))
    }
}
