//! "Who may reach this route?": the `explain` view shared by the CLI and `/routes/{host}/policy`.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

use crate::authz::{check_scope, decide_sources, ScopeTags};
use crate::config::{Config, EndpointSelection};
use crate::identity::PeerCert;
use crate::names::normalize_authority;
use crate::routing::RouteTable;

#[derive(Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub host: String,
    pub route: String,
    /// The mTLS domain governing the host, if any.
    pub domain: Option<String>,
    pub enforcing: bool,
    pub scope: Option<String>,
    pub sources: Vec<String>,
    pub malformed_sources: Vec<String>,
    pub endpoint_selection: String,
    /// The route service the route is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_service_url: Option<String>,
    /// Whether requests go through that route service (`route_services` is configured and the
    /// route is not in an mTLS domain); otherwise they are answered 502.
    #[serde(default)]
    pub route_service_called: bool,
    pub endpoints: Vec<EndpointView>,
    pub caller: Option<CallerDecision>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: String,
    pub tls: bool,
    pub app_id: String,
    pub space_id: String,
    pub organization_id: String,
    pub instance_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CallerDecision {
    pub certificate: String,
    pub app: Option<String>,
    pub space: Option<String>,
    pub org: Option<String>,
    pub decision: String,
    pub rule: String,
    /// Endpoints this caller's requests may be sent to.
    pub reachable_endpoints: Vec<String>,
}

/// Why nothing can be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no route for host '{0}'")]
    NoRoute(String),
    #[error("caller certificate: {0}")]
    BadCaller(String),
}

/// Explains the route for `host` (and `path`), optionally deciding for a caller's certificate chain
/// (leaf first), which is verified against the host's domain CA as the handshake would.
pub fn explain(
    config: &Config,
    table: &RouteTable,
    host: &str,
    path: &str,
    caller: Option<&[CertificateDer<'static>]>,
) -> Result<Explanation, ExplainError> {
    let host = normalize_authority(host);
    let pool = table
        .lookup(&host, path)
        .ok_or_else(|| ExplainError::NoRoute(host.clone()))?;
    let domain = config.domain_for(&host);
    let policy = &pool.policy;
    let caller = match caller {
        None => None,
        Some(chain) => {
            let leaf = chain
                .first()
                .ok_or_else(|| ExplainError::BadCaller("no certificate in the file".into()))?;
            let certificate = match domain {
                None => "not checked: host is not in an mTLS domain (no client certificate is requested)".to_string(),
                Some(d) => verify(&d.ca_certs, chain).map_or_else(|e| format!("rejected at handshake: {e}"), |()| {
                    format!("valid for {}", d.pattern)
                }),
            };
            let peer = PeerCert::from_der(leaf);
            let (decision, rule, reachable) =
                decide(config, pool, &peer, domain.is_some(), &certificate);
            let id = peer.identity.as_ref().ok();
            Some(CallerDecision {
                certificate,
                app: id.map(|i| i.app.clone()),
                space: id.and_then(|i| i.space.clone()),
                org: id.and_then(|i| i.org.clone()),
                decision: decision.to_string(),
                rule,
                reachable_endpoints: reachable,
            })
        }
    };
    Ok(Explanation {
        host: host.clone(),
        route: pool.key.to_string(),
        domain: domain.map(|d| d.pattern.to_string()),
        enforcing: policy.is_enforcing(),
        scope: policy.scope.as_ref().map(ToString::to_string),
        sources: policy.sources().map(ToString::to_string).collect(),
        malformed_sources: policy.malformed.clone(),
        endpoint_selection: match config.endpoint_selection {
            EndpointSelection::Filter => "filter",
            EndpointSelection::Strict => "strict",
        }
        .to_string(),
        route_service_url: pool.route_service.as_deref().map(str::to_string),
        route_service_called: config.route_services.is_some() && domain.is_none(),
        endpoints: pool
            .endpoints
            .iter()
            .map(|e| EndpointView {
                address: e.addr.clone(),
                tls: e.tls_san.is_some(),
                app_id: e.app_id().to_string(),
                space_id: e.space_id().to_string(),
                organization_id: e.organization_id().to_string(),
                instance_id: e.private_instance_id.clone(),
            })
            .collect(),
        caller,
    })
}

fn verify(
    cas: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    crate::tls::client_verifier(cas)?
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn decide(
    config: &Config,
    pool: &crate::routing::Pool,
    peer: &PeerCert,
    mtls: bool,
    certificate: &str,
) -> (&'static str, String, Vec<String>) {
    let all: Vec<String> = pool.endpoints.iter().map(|e| e.addr.clone()).collect();
    if mtls && certificate.starts_with("rejected") {
        return ("deny", "handshake".into(), Vec::new());
    }
    let Some(scope) = &pool.policy.scope else {
        return ("allow", "-".into(), all);
    };
    let id = match &peer.identity {
        Ok(id) => id,
        Err(_) => return ("deny", "identity_extraction".into(), Vec::new()),
    };
    let mut denial = None;
    let mut reachable = Vec::new();
    for e in &pool.endpoints {
        match check_scope(scope, id, e.as_ref()) {
            Ok(()) => reachable.push(e.addr.clone()),
            Err(d) => denial = Some(d),
        }
    }
    if reachable.is_empty() {
        let rule = denial.map_or_else(String::new, |d| d.0.to_string());
        return ("deny", rule, reachable);
    }
    match decide_sources(&pool.policy, id) {
        Err(d) => ("deny", d.0.to_string(), Vec::new()),
        Ok(rule) => {
            let partial = reachable.len() < all.len();
            let rule = if partial && config.endpoint_selection == EndpointSelection::Strict {
                format!(
                    "{rule} (strict selection: 403 when an endpoint outside the scope is picked)"
                )
            } else {
                rule.to_string()
            };
            ("allow", rule, reachable)
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "route:     {}", self.route)?;
        writeln!(
            f,
            "domain:    {}",
            self.domain.as_deref().map_or(
                "- (server TLS only, no caller identity)".to_string(),
                |d| format!("{d} (mTLS)")
            )
        )?;
        match &self.scope {
            None => writeln!(
                f,
                "policy:    not enforcing: every caller that reaches the route is proxied"
            )?,
            Some(s) => {
                writeln!(
                    f,
                    "policy:    scope={s}, endpoint selection {}",
                    self.endpoint_selection
                )?;
                if self.sources.is_empty() {
                    writeln!(
                        f,
                        "sources:   none: every caller is denied (route:no_route_policies)"
                    )?;
                } else {
                    writeln!(f, "sources:   {}", self.sources.join(", "))?;
                }
            }
        }
        if !self.malformed_sources.is_empty() {
            writeln!(
                f,
                "ignored:   malformed sources {}",
                self.malformed_sources.join(", ")
            )?;
        }
        match (&self.route_service_url, self.route_service_called) {
            (Some(url), true) => writeln!(
                f,
                "route service: {url}: requests the policy allows go to it first, and to the endpoints when it sends them back signed"
            )?,
            (Some(url), false) if self.domain.is_some() => writeln!(
                f,
                "route service: {url}: not supported in an mTLS domain, so every request the policy allows is answered 502 (route_service_unsupported)"
            )?,
            (Some(url), false) => writeln!(
                f,
                "route service: {url}: route_services is not configured, so every request the policy allows is answered 502 (route_service_unsupported)"
            )?,
            (None, _) => {}
        }
        writeln!(f, "endpoints:")?;
        for e in &self.endpoints {
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            writeln!(
                f,
                "  {}{} app={} space={} org={} instance={}",
                e.address,
                if e.tls { " (tls)" } else { "" },
                dash(&e.app_id),
                dash(&e.space_id),
                dash(&e.organization_id),
                dash(&e.instance_id)
            )?;
        }
        if let Some(c) = &self.caller {
            let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "caller:    app={} space={} org={}",
                dash(&c.app),
                dash(&c.space),
                dash(&c.org)
            )?;
            writeln!(f, "certificate: {}", c.certificate)?;
            writeln!(f, "decision:  {} ({})", c.decision, c.rule)?;
            if c.decision == "allow" {
                if self.route_service_url.is_some() && self.route_service_called {
                    writeln!(
                        f,
                        "reaches:   the route service, then {}",
                        c.reachable_endpoints.join(", ")
                    )?;
                } else if self.route_service_url.is_some() {
                    writeln!(f, "reaches:   nothing: 502 (route service)")?;
                } else {
                    writeln!(f, "reaches:   {}", c.reachable_endpoints.join(", "))?;
                }
            }
        }
        Ok(())
    }
}

/// Why a running gateway could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("--admin: expected http://HOST:PORT or https://HOST:PORT, got '{0}'")]
    BadUrl(String),
    #[error("--admin {0}: an https:// admin API needs --admin-ca (the CA of its certificate)")]
    NoCa(String),
    #[error("--admin-ca: {0}")]
    BadCa(String),
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("admin API at {addr}: TLS handshake failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("admin API: {}{}", with_sources(.0), client_cert_hint(.0))]
    Http(#[from] hyper::Error),
    #[error("admin API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the admin API refused the request ({0}); pass its token with --admin-token-file")]
    NoToken(String),
    #[error("the admin API refused the token ({0}): is --admin-token-file the gateway's admin.token_file?")]
    WrongToken(String),
    #[error("admin API answered something that is not an explanation: {0}")]
    Decode(#[from] serde_json::Error),
}

/// An error and its sources, `: `-separated (hyper's own message alone says only "connection
/// error" when the server's TLS alert is the cause).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

fn client_cert_hint(e: &dyn std::error::Error) -> &'static str {
    if with_sources(e).contains("CertificateRequired") {
        " (the admin API requires a client certificate: --admin-cert and --admin-key)"
    } else {
        ""
    }
}

impl FetchError {
    /// Whether the operator's input is at fault (exit 2) rather than the connection (exit 1).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            FetchError::BadUrl(_)
                | FetchError::NoCa(_)
                | FetchError::BadCa(_)
                | FetchError::NoToken(_)
                | FetchError::WrongToken(_)
                | FetchError::Status {
                    status: 400..=499,
                    ..
                }
        )
    }
}

/// How to reach a running gateway's admin API.
pub struct AdminAccess<'a> {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: &'a str,
    /// The bearer token, if the admin API wants one.
    pub token: Option<&'a str>,
    /// Trust anchors for an `https://` admin API's certificate.
    pub ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// A client certificate, for an admin API that requires one (`admin.tls.client_ca`).
    pub client: Option<Arc<rustls::sign::CertifiedKey>>,
}

/// Asks a running gateway's admin API (`GET /routes/{host}/policy`, or `POST` with the caller's
/// PEM) for the explanation, so routes learned from NATS are included.
pub async fn fetch(
    admin: &AdminAccess<'_>,
    host: &str,
    path: &str,
    caller_pem: Option<Vec<u8>>,
) -> Result<Explanation, FetchError> {
    use http_body_util::{BodyExt, Full};

    let url = admin.url;
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(FetchError::BadUrl(url.to_string())),
    };
    let authority = Some(rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| FetchError::BadUrl(url.to_string()))?;
    let connector = if tls {
        Some(admin_connector(admin)?)
    } else {
        None
    };
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| FetchError::Connect {
        addr: authority.to_string(),
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| FetchError::Connect {
        addr: authority.to_string(),
        source,
    })?;
    let io: Box<dyn AdminIo> = match connector {
        None => Box::new(tcp),
        Some(c) => {
            let name = server_name(authority).ok_or_else(|| FetchError::BadUrl(url.to_string()))?;
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), c.connect(name, tcp))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            Box::new(handshake.map_err(|source| FetchError::Tls {
                addr: authority.to_string(),
                source,
            })?)
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let uri = format!("/routes/{}/policy?path={}", normalize_authority(host), path);
    let mut builder = http::Request::builder().uri(uri).header("host", authority);
    if let Some(t) = admin.token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match caller_pem {
        None => builder.method("GET").body(Full::new(bytes::Bytes::new())),
        Some(pem) => builder
            .method("POST")
            .body(Full::new(bytes::Bytes::from(pem))),
    }
    .map_err(|_| FetchError::BadUrl(url.to_string()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 200 {
        let body = String::from_utf8_lossy(&body).trim().to_string();
        return Err(match (status, admin.token) {
            (401, None) => FetchError::NoToken(body),
            (401, Some(_)) => FetchError::WrongToken(body),
            _ => FetchError::Status { status, body },
        });
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The admin connection, over TCP or TLS.
trait AdminIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AdminIo for T {}

/// A TLS connector trusting `--admin-ca`, presenting `--admin-cert` when given.
fn admin_connector(admin: &AdminAccess<'_>) -> Result<tokio_rustls::TlsConnector, FetchError> {
    let cas = admin
        .ca
        .as_ref()
        .ok_or_else(|| FetchError::NoCa(admin.url.to_string()))?;
    let (usable, _) = rustls::RootCertStore::empty().add_parsable_certificates(cas.iter().cloned());
    if usable == 0 {
        return Err(FetchError::BadCa("no usable trust anchor".into()));
    }
    let mut cfg = crate::tls::client_config(cas, admin.client.as_ref())
        .map_err(|e| FetchError::BadCa(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The name an admin API's certificate must carry: the URL's host (a DNS name or an address).
fn server_name(authority: &str) -> Option<rustls_pki_types::ServerName<'static>> {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_string()).ok()
}
