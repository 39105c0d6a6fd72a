//! The floor the side-by-side bench (`rivals.rs`) measures portcullis against, beside its rivals:
//! the least reverse proxy portcullis' own crates make, doing none of the gateway's work. rustls
//! terminates TLS (the client certificate verified when one is offered, as HAProxy's `verify
//! optional`), hyper serves HTTP/1.1 and h2 (hyper-util's `auto`), and hyper-util's pooled
//! client sends every request on to one HTTP/1.1 backend as it came. No routing, policy, header
//! rewriting, access log or metrics. One current-thread runtime per core, all accepting on one
//! listening socket, as portcullis' workers do.
//!
//! What portcullis costs above this is its own code; what this costs against HAProxy is the
//! crates'. Not a product: `cargo xtask bench` builds it (an example of the portcullis package).
//!
//! Usage: `floor LISTEN CERT_CHAIN KEY CLIENT_CA BACKEND`, addresses as `ip:port`, PEM files.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

// The allocator portcullis runs with.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("floor: {e}");
        std::process::exit(2);
    }
}

fn run(args: Vec<String>) -> Result<(), BoxError> {
    let [listen, chain, key, client_ca, backend] = &args[..] else {
        return Err("usage: floor LISTEN CERT_CHAIN KEY CLIENT_CA BACKEND".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let backend: SocketAddr = backend.parse()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(chain, key, client_ca)?));
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = (0..cores)
        .map(|_| {
            let listener = listener.try_clone()?;
            let acceptor = acceptor.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(std::thread::spawn(move || {
                rt.block_on(serve(listener, acceptor, backend))
            }))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for w in workers {
        w.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

fn server_config(
    chain: &str,
    key: &str,
    client_ca: &str,
) -> Result<rustls::ServerConfig, BoxError> {
    let chain = CertificateDer::pem_file_iter(chain)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)? {
        roots.add(ca?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

async fn serve(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
) -> std::io::Result<()> {
    let backend = Authority::try_from(backend.to_string()).map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1000)
        .build_http();
    loop {
        // Out of descriptors, say: the load generator sees it. A pause, so that the loop does
        // not spin on the error and charge the floor CPU it did not spend serving.
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, client, backend) = (acceptor.clone(), client.clone(), backend.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = Forward { client, backend };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Sends each request on to the backend as it came, as HTTP/1.1.
struct Forward {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>,
    backend: Authority,
}

impl hyper::service::Service<Request<Incoming>> for Forward {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.backend.clone());
        parts.version = hyper::Version::HTTP_11;
        let client = self.client.clone();
        Box::pin(async move {
            parts.uri = Uri::from_parts(uri)?;
            Ok(client.request(Request::from_parts(parts, body)).await?)
        })
    }
}
