//! Real clients: rustls + hyper, HTTP/1.1 or h2, with or without a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::echo::Echo;
use portcullis::pki::{Ca, Leaf};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// The echo backend's description of the request it received.
    pub fn echo(&self) -> Echo {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an echo body ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A client TLS config trusting `ca`, presenting `cert` when given.
pub fn tls_config(ca: &Ca, cert: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = rustls::crypto::ring::default_provider();
    tls_config_offering(ca, cert, alpn, rustls::DEFAULT_VERSIONS, provider)
}

/// As [`tls_config`], offering only `versions` and `provider`'s cipher suites.
pub fn tls_config_offering(
    ca: &Ca,
    cert: Option<&Leaf>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
    provider: rustls::crypto::CryptoProvider,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Opens TLS to `addr`. `sni: None` connects by IP, so no SNI is sent.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    sni: Option<&str>,
    cert: Option<&Leaf>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls_on(tcp, ca, sni, cert, alpn).await
}

/// Opens TLS on a connected socket (after whatever was written on it first).
pub async fn tls_on(
    tcp: TcpStream,
    ca: &Ca,
    sni: Option<&str>,
    cert: Option<&Leaf>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_string()).unwrap(),
        None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
    };
    tokio_rustls::TlsConnector::from(tls_config(ca, cert, alpn))
        .connect(name, tcp)
        .await
}

/// One client connection speaking HTTP/1.1 or h2.
pub enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

#[derive(Debug)]
pub enum CallError {
    Tls(std::io::Error),
    Http(hyper::Error),
}

impl Conn {
    /// Opens a TLS connection and an HTTP connection on it (h2 when `h2`).
    pub async fn tls(
        addr: SocketAddr,
        ca: &Ca,
        sni: Option<&str>,
        cert: Option<&Leaf>,
        h2: bool,
    ) -> Result<Conn, CallError> {
        let tcp = TcpStream::connect(addr).await.map_err(CallError::Tls)?;
        Self::tls_on(tcp, ca, sni, cert, h2).await
    }

    /// [`Conn::tls`] on a connected socket.
    pub async fn tls_on(
        tcp: TcpStream,
        ca: &Ca,
        sni: Option<&str>,
        cert: Option<&Leaf>,
        h2: bool,
    ) -> Result<Conn, CallError> {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let stream = tls_on(tcp, ca, sni, cert, alpn)
            .await
            .map_err(CallError::Tls)?;
        Self::over(stream, h2).await
    }

    /// Plain HTTP/1.1 over TCP.
    pub async fn plain(addr: SocketAddr) -> Result<Conn, CallError> {
        let tcp = TcpStream::connect(addr).await.map_err(CallError::Tls)?;
        Self::over(tcp, false).await
    }

    pub async fn over<S>(io: S, h2: bool) -> Result<Conn, CallError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        if h2 {
            let (s, c) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(CallError::Http)?;
            tokio::spawn(c);
            Ok(Conn::H2(s))
        } else {
            let (s, c) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(CallError::Http)?;
            tokio::spawn(c.with_upgrades());
            Ok(Conn::H1(s))
        }
    }

    /// Sends a request built for this protocol by [`Conn::build`].
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Resp, CallError> {
        // Wait until the connection can take it: an HTTP/1.1 connection whose last response
        // was just read may not have gone back to idle yet ("connection was not ready").
        let resp = match self {
            Conn::H1(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            Conn::H2(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
        }
        .map_err(CallError::Http)?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(CallError::Http)?.to_bytes();
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A GET for `host` and `path` with extra headers, in this connection's protocol.
    pub fn build(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = match self {
            Conn::H1(_) => Request::get(path).header("host", host),
            Conn::H2(_) => Request::get(format!("https://{host}{path}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Resp, CallError> {
        let req = self.build(host, path, &[]);
        self.send(req).await
    }
}

/// Opens a connection with SNI = host and does one GET.
pub async fn get(
    addr: SocketAddr,
    ca: &Ca,
    cert: Option<&Leaf>,
    host: &str,
    path: &str,
    h2: bool,
) -> Result<Resp, CallError> {
    let mut c = Conn::tls(addr, ca, Some(host), cert, h2).await?;
    c.get(host, path).await
}

/// The sender of a request body sent piece by piece ([`streaming`]).
pub type BodySender = http_body_util::channel::Sender<Bytes, std::convert::Infallible>;
/// A streamed request's answer ([`streaming`]).
pub type Answer = Result<http::Response<hyper::body::Incoming>, hyper::Error>;

/// Sends `req` (built for the protocol: HTTP/1.1 with its `host`, h2 with the authority in its
/// URI) on a new TLS connection to `addr` with SNI `host`, with a body the caller sends piece by
/// piece through the returned sender and ends by dropping it; the response comes on the returned
/// task.
pub async fn streaming(
    addr: SocketAddr,
    ca: &Ca,
    host: &str,
    req: http::request::Builder,
    h2: bool,
) -> (BodySender, tokio::task::JoinHandle<Answer>) {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_connect(addr, ca, Some(host), None, alpn).await.unwrap();
    let (tx, body) = http_body_util::channel::Channel::new(1);
    let req = req.body(body).unwrap();
    let answer = match h2 {
        false => {
            let (mut s, c) = http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(c);
            tokio::spawn(async move { s.send_request(req).await })
        }
        true => {
            let (mut s, c) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(c);
            tokio::spawn(async move { s.send_request(req).await })
        }
    };
    (tx, answer)
}
