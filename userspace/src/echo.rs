//! A small HTTP/1.1 echo backend: the embedded demo's app, and the backend of the tests.
//!
//! Every request is answered 200 with a JSON description of what arrived (method, path, host,
//! headers, which backend answered). `/slow?ms=N` waits N milliseconds (at most 60 s) first, and
//! each `set-cookie=V` in a query (URL-encoded) becomes a `Set-Cookie: V` response header.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header::CONTENT_TYPE, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::proxy::body::{full, ProxyBody};

/// What the echo backend saw.
#[derive(Debug, Serialize, Deserialize)]
pub struct Echo {
    pub backend: String,
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
}

/// A running echo backend.
pub struct EchoServer {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl EchoServer {
    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

async fn answer(
    name: Arc<str>,
    count: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    count.fetch_add(1, Ordering::Relaxed);
    if req.uri().path() == "/slow" {
        let ms = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1000)
            .min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let echo = Echo {
        backend: name.to_string(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let body = serde_json::to_string_pretty(&echo).unwrap_or_default() + "\n";
    let mut resp = Response::new(full(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let query = req.uri().query().unwrap_or("").as_bytes();
    for (k, v) in form_urlencoded::parse(query) {
        if let (true, Ok(v)) = (k == "set-cookie", HeaderValue::from_str(&v)) {
            resp.headers_mut().append(http::header::SET_COOKIE, v);
        }
    }
    resp
}

/// Starts an echo backend named `name` on `addr` (port 0 for any).
pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<EchoServer> {
    start_with(name, addr, None).await
}

/// Starts an echo backend that serves TLS with `tls` when given.
pub async fn start_with(
    name: &str,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<EchoServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let requests = Arc::new(AtomicU64::new(0));
    let name: Arc<str> = name.into();
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let name = name.clone();
            let count = count.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (name, count) = (name.clone(), count.clone());
                    async move { Ok::<_, std::convert::Infallible>(answer(name, count, req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(cfg) => {
                        if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                }
            });
        }
    });
    Ok(EchoServer { addr, requests })
}
