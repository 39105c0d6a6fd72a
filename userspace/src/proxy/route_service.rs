//! Route services (GoRouter's): a request for a route bound to a route service goes to that
//! service first, carrying where it was going (`X-CF-Forwarded-Url`) and a signature
//! (`X-CF-Proxy-Signature`, `X-CF-Proxy-Metadata`). The service does its work (authentication,
//! rate limiting …) and sends the request back to the forwarded URL with the two signature
//! headers; the gateway takes it back, to the route's app, only with a signature it made for
//! that route within `route_services.timeout`.
//!
//! The signature is GoRouter's, so GoRouters and portcullis gateways sharing a secret take back
//! each other's requests: the JSON `{"forwarded_url", "requested_time"}` sealed with AES-128-GCM
//! under a key derived from the secret by PBKDF2-HMAC-SHA256 (no salt, 100,001 rounds, 16
//! bytes), base64url with padding; the metadata header is base64url of `{"nonce": <base64>}`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};

use super::body::ProxyBody;
use super::pool::ConnectSettings;
use super::{Completion, Reject};
use crate::config::{Backends, Config, RouteServices};
use crate::metrics::OutcomeLabels;
use crate::registry::RouteKey;
use crate::routing::Pool;
use crate::routing::RouteTable;
use crate::state::Runtime;
use crate::state::State;

pub const X_CF_FORWARDED_URL: HeaderName = HeaderName::from_static("x-cf-forwarded-url");
pub const X_CF_PROXY_SIGNATURE: HeaderName = HeaderName::from_static("x-cf-proxy-signature");
pub const X_CF_PROXY_METADATA: HeaderName = HeaderName::from_static("x-cf-proxy-metadata");

/// PBKDF2 rounds GoRouter derives its key with.
const PBKDF2_ROUNDS: u32 = 100_001;

/// Why a request that came back from a route service is not taken back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-CF-Proxy-Metadata")]
    NoMetadata,
    #[error(
        "X-CF-Proxy-Metadata or X-CF-Proxy-Signature is not base64url JSON of the right shape"
    )]
    Malformed,
    #[error("the signature was not made with route_services.secret (nor secret_decrypt_only)")]
    WrongKey,
    #[error("the signature is {age:?} old; route_services.timeout is {timeout:?}")]
    Expired { age: Duration, timeout: Duration },
    #[error("the signature was made for {signed}, another route")]
    OtherRoute { signed: String },
}

impl SignatureError {
    /// The `outcome` label of `portcullis_route_service_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            SignatureError::Expired { .. } => "expired",
            SignatureError::OtherRoute { .. } => "other_route",
            _ => "invalid_signature",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Signed {
    forwarded_url: String,
    requested_time: String,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    nonce: String,
}

fn derive(secret: &str) -> LessSafeKey {
    let mut key = [0u8; 16];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(PBKDF2_ROUNDS).expect("non-zero"),
        b"",
        secret.as_bytes(),
        &mut key,
    );
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).expect("16-byte AES-128 key"))
}

/// The running `route_services` settings: keys, timeout, and the HTTPS client that calls the
/// services (DNS, connection pooling, the system's trust anchors and `ca_certs`).
pub struct RouteServiceRuntime {
    signer: Signer,
    pub recommend_https: bool,
    pub hairpinning: bool,
    hairpinning_allowlist: Vec<String>,
    strict_signature_validation: bool,
    pub client: Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>,
}

impl std::fmt::Debug for RouteServiceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteServiceRuntime")
            .field("timeout", &self.signer.timeout)
            .finish_non_exhaustive()
    }
}

/// Signs requests for route services and checks those that come back.
pub struct Signer {
    key: LessSafeKey,
    previous: Option<LessSafeKey>,
    timeout: Duration,
}

/// The trust anchors route services are verified with: the system's (`/etc/ssl/certs`, as
/// GoRouter uses them) and `route_services.ca_certs`.
fn roots(
    extra: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    let (_, ignored) = roots.add_parsable_certificates(extra.iter().cloned());
    if ignored > 0 {
        return Err(format!(
            "route_services.ca_certs: {ignored} certificate(s) are not usable trust anchors"
        ));
    }
    if roots.is_empty() {
        return Err(
            "route_services: no trust anchors for the route services' certificates: \
                    the system has none (install ca-certificates) and route_services.ca_certs \
                    is not set"
                .into(),
        );
    }
    Ok(roots)
}

impl RouteServiceRuntime {
    pub fn build(rs: &RouteServices, backends: &Backends) -> Result<Self, String> {
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&rs.ca_certs)?)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(backends.connect_timeout));
        let probes = backends.keep_alive_probe_interval;
        if !probes.is_zero() {
            // As the backends' own connections (see `BackendPool::connect`).
            http.set_keepalive(Some(probes));
            http.set_keepalive_interval(Some(probes));
            http.set_keepalive_retries(Some(super::pool::KEEPALIVE_PROBES));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(backends.idle_timeout)
            .pool_max_idle_per_host(backends.max_idle_per_endpoint)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https);
        Ok(RouteServiceRuntime {
            signer: Signer::new(rs),
            recommend_https: rs.recommend_https,
            hairpinning: rs.hairpinning,
            hairpinning_allowlist: rs.hairpinning_allowlist.clone(),
            strict_signature_validation: rs.strict_signature_validation,
            client,
        })
    }
}

impl Signer {
    pub fn new(rs: &RouteServices) -> Signer {
        Signer {
            key: derive(&rs.secret),
            previous: rs.secret_decrypt_only.as_deref().map(derive),
            timeout: rs.timeout,
        }
    }

    /// The `X-CF-Proxy-Signature` and `X-CF-Proxy-Metadata` values for a request forwarded to
    /// `forwarded_url`, made at `now`.
    pub fn sign(&self, forwarded_url: &str, now: SystemTime) -> (String, String) {
        let signed = Signed {
            forwarded_url: forwarded_url.to_string(),
            requested_time: rfc3339(now),
        };
        let mut sealed = serde_json::to_vec(&signed).expect("serialisable");
        let nonce: [u8; NONCE_LEN] = rand::random();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut sealed,
            )
            .expect("AES-GCM seals any length the JSON has");
        let metadata = serde_json::to_vec(&Metadata {
            nonce: STANDARD.encode(nonce),
        })
        .expect("serialisable");
        (URL_SAFE.encode(sealed), URL_SAFE.encode(metadata))
    }

    /// The forwarded URL a request that came back was signed for, when its signature is this
    /// gateway's (or the previous secret's) and younger than `timeout` at `now`.
    pub fn verify(&self, headers: &HeaderMap, now: SystemTime) -> Result<String, SignatureError> {
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let metadata = text(&X_CF_PROXY_METADATA).ok_or(SignatureError::NoMetadata)?;
        let signature = text(&X_CF_PROXY_SIGNATURE).ok_or(SignatureError::Malformed)?;
        let decode = |s: &str| {
            base64::engine::GeneralPurpose::new(
                &base64::alphabet::URL_SAFE,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            )
            .decode(s.trim())
            .map_err(|_| SignatureError::Malformed)
        };
        let metadata: Metadata =
            serde_json::from_slice(&decode(metadata)?).map_err(|_| SignatureError::Malformed)?;
        let nonce: [u8; NONCE_LEN] = STANDARD
            .decode(metadata.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(SignatureError::Malformed)?;
        let sealed = decode(signature)?;
        let open = |key: &LessSafeKey| {
            let mut buf = sealed.clone();
            key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
                .ok()
                .map(|plain| plain.to_vec())
        };
        let plain = open(&self.key)
            .or_else(|| self.previous.as_ref().and_then(open))
            .ok_or(SignatureError::WrongKey)?;
        let signed: Signed =
            serde_json::from_slice(&plain).map_err(|_| SignatureError::Malformed)?;
        let at = parse_rfc3339(&signed.requested_time).ok_or(SignatureError::Malformed)?;
        // A signature from the future (clocks apart) is as good as a fresh one.
        let age = now.duration_since(at).unwrap_or_default();
        if age > self.timeout {
            return Err(SignatureError::Expired {
                age,
                timeout: self.timeout,
            });
        }
        Ok(signed.forwarded_url)
    }
}

/// Checks a request that came back from a route service (it carries `X-CF-Proxy-Signature`)
/// for the route `key`: the signature must be this gateway's secret's (or the previous one's),
/// within the timeout, and made for a URL of the same route (a route service may change the
/// path within it, not send the request to another route).
pub fn came_back(
    services: &RouteServiceRuntime,
    table: &RouteTable,
    key: &RouteKey,
    headers: &HeaderMap,
) -> Result<(), SignatureError> {
    let forwarded = services.signer.verify(headers, SystemTime::now())?;
    let other = || SignatureError::OtherRoute {
        signed: forwarded.clone(),
    };
    let url = url::Url::parse(&forwarded).map_err(|_| other())?;
    let host = crate::names::normalize_host(url.host_str().unwrap_or_default());
    // Routed as the request itself was (see `routing_path`).
    let path = super::headers::routing_path(url.path()).ok_or_else(other)?;
    match table.lookup(&host, &path) {
        Some(pool) if pool.key == *key => Ok(()),
        _ => Err(other()),
    }
}

/// Checks a request for a route without a route service that carries `X-CF-Proxy-Signature`
/// anyway, with `strict_signature_validation` (GoRouter's): the signature must be this
/// gateway's (or the previous secret's) and younger than the timeout, whatever URL it names.
/// So a route service's own route, called directly with forged headers, does not reach the
/// service, which would forward the request to the URL the headers name.
pub fn signed_anyway(
    services: &RouteServiceRuntime,
    headers: &HeaderMap,
) -> Result<(), SignatureError> {
    if !services.strict_signature_validation || !headers.contains_key(X_CF_PROXY_SIGNATURE) {
        return Ok(());
    }
    services.signer.verify(headers, SystemTime::now()).map(drop)
}

/// Counts one request in `portcullis_route_service_requests_total{outcome}`.
pub(super) fn count(state: &State, outcome: &'static str) {
    state
        .metrics
        .route_service_requests
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// Sends a request for a route bound to the route service at `service` (an `https://` URL) to
/// that service, signed for the URL it asked for (`host`, `pq`), and answers with the service's
/// response. A service that is a route of this gateway is reached through that route's
/// endpoints (hairpinning).
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    state: &State,
    rt: &Runtime,
    table: &RouteTable,
    services: &RouteServiceRuntime,
    service: &str,
    host: &str,
    pq: &PathAndQuery,
    mut out: Request<ProxyBody>,
    settings: &ConnectSettings<'_>,
    done: &mut Completion,
) -> Result<Response<ProxyBody>, Reject> {
    let outcome = |o| count(state, o);
    let scheme = if services.recommend_https {
        "https"
    } else {
        "http"
    };
    let forwarded = format!("{scheme}://{host}{pq}");
    let (signature, metadata) = services.signer.sign(&forwarded, SystemTime::now());
    // Registrations are checked to carry an `https://` URL with a host.
    let Some((uri, authority)) = service
        .parse::<Uri>()
        .ok()
        .and_then(|u| Some((u.clone(), u.authority()?.clone())))
    else {
        outcome("failed");
        return Err(Reject::EndpointFailure);
    };
    let h = out.headers_mut();
    for (name, value) in [
        (X_CF_FORWARDED_URL, forwarded),
        (X_CF_PROXY_SIGNATURE, signature),
        (X_CF_PROXY_METADATA, metadata),
    ] {
        h.insert(
            name,
            HeaderValue::try_from(value).expect("base64 and a request's own URL are visible ASCII"),
        );
    }
    h.insert(
        HOST,
        HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value"),
    );
    let timeout = rt.config.backends.response_header_timeout;
    let sent_at = Instant::now();
    let pool = if services.hairpinning {
        hairpin_pool(table, &rt.config, &services.hairpinning_allowlist, &uri)
    } else {
        None
    };
    let result = match pool {
        // Through the route's endpoints, as any request for it goes (instance headers, retries,
        // cooldowns); its own policy is none (see `hairpin_pool`).
        Some(pool) => {
            let pq = uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            let max_conns = rt.config.backends.max_conns;
            let mut full = false;
            super::send_to_endpoints(
                state,
                rt,
                &pool.key,
                (
                    &mut pool.selector().balancing(rt.config.backends.balancing),
                    None,
                    |e| e.has_room(max_conns),
                ),
                out,
                (authority.as_str(), &pq),
                false,
                settings,
                done,
                &mut full,
            )
            .await
            .map(|(resp, _, lease)| {
                done.lease = Some((lease, settings.max_idle));
                resp
            })
            .map_err(|r| r.unwrap_or(Reject::EndpointFailure))
        }
        None => {
            *out.uri_mut() = uri;
            *out.version_mut() = Version::HTTP_11;
            match tokio::time::timeout(timeout, services.client.request(out)).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) => {
                    tracing::debug!(route_service = service, error = %e, error_source = ?std::error::Error::source(&e), "route service request failed");
                    Err(Reject::EndpointFailure)
                }
                Err(_) => Err(Reject::EndpointTimeout),
            }
        }
    };
    match result {
        Ok(resp) => {
            // The service's time, as a backend's: it is not the gateway's (`gorouter_time`).
            done.record.backend_time = Some(sent_at.elapsed());
            let (mut parts, body) = resp.into_parts();
            super::headers::strip_hop_by_hop(&mut parts.headers, false);
            Ok(Response::from_parts(
                parts,
                super::stalling(body, rt.config.backends.response_body_timeout),
            ))
        }
        // The client stopped sending its body: the handler answers 408, and the service did
        // not fail.
        Err(reject) if done.request_watch.as_ref().is_some_and(|w| w.stalled()) => Err(reject),
        Err(reject) => {
            tracing::debug!(
                route_service = service,
                ?reject,
                "route service did not answer"
            );
            outcome("failed");
            Err(reject)
        }
    }
}

/// The route a route service's URL names in this gateway's table, when the gateway may reach
/// it directly (GoRouter's hairpinning): outside every mTLS domain, without a policy, not
/// bound to a route service itself, and on the `allowlist` when there is one. Anything else
/// goes out through DNS, as any caller would.
fn hairpin_pool(
    table: &RouteTable,
    cfg: &Config,
    allowlist: &[String],
    service: &Uri,
) -> Option<Arc<Pool>> {
    let host = crate::names::normalize_host(service.host()?);
    if cfg.domain_for(&host).is_some() || !allowed_to_hairpin(allowlist, &host) {
        return None;
    }
    let pool = table.lookup(&host, service.path())?;
    (!pool.policy.is_enforcing() && pool.route_service.is_none()).then(|| pool.clone())
}

/// Whether `host` (lowercase) is on `route_services.hairpinning_allowlist`, as GoRouter matches
/// it: a name itself, or a `*.` entry whose domain is what follows the host's first label. An
/// empty list allows every host.
fn allowed_to_hairpin(allowlist: &[String], host: &str) -> bool {
    let parent = host.split_once('.').map(|(_, parent)| parent);
    allowlist.is_empty()
        || allowlist.iter().any(|e| match e.strip_prefix("*.") {
            Some(domain) => parent == Some(domain),
            None => e == host,
        })
}

/// Go's `time.Time` JSON form (RFC 3339 with nanoseconds), in UTC.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a SystemTime formats")
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(secret: &str, previous: Option<&str>, timeout: Duration) -> Signer {
        Signer::new(&RouteServices {
            secret_decrypt_only: previous.map(str::to_string),
            timeout,
            ..RouteServices::new(secret)
        })
    }

    fn headers(sig: &str, meta: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(X_CF_PROXY_SIGNATURE, sig.parse().unwrap());
        h.insert(X_CF_PROXY_METADATA, meta.parse().unwrap());
        h
    }

    #[test]
    fn a_signature_comes_back_with_its_url_until_it_expires() {
        let rs = runtime("s3cret", None, Duration::from_secs(60));
        let now = SystemTime::now();
        let url = "https://app.example.com/a/b?c=d%20e";
        let (sig, meta) = rs.sign(url, now);
        // GoRouter's shapes: base64url with padding; the metadata is {"nonce": <base64>}.
        let meta_json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE.decode(&meta).unwrap()).unwrap();
        assert_eq!(
            STANDARD
                .decode(meta_json["nonce"].as_str().unwrap())
                .unwrap()
                .len(),
            12
        );
        assert_eq!(meta_json.as_object().unwrap().len(), 1);
        let h = headers(&sig, &meta);
        assert_eq!(rs.verify(&h, now + Duration::from_secs(59)).unwrap(), url);
        assert!(matches!(
            rs.verify(&h, now + Duration::from_secs(61)),
            Err(SignatureError::Expired { .. })
        ));
        // Another secret does not open it; a tampered byte does not either.
        let other = runtime("other", None, Duration::from_secs(60));
        assert_eq!(other.verify(&h, now), Err(SignatureError::WrongKey));
        let mut raw = URL_SAFE.decode(&sig).unwrap();
        raw[3] ^= 1;
        let h2 = headers(&URL_SAFE.encode(raw), &meta);
        assert_eq!(rs.verify(&h2, now), Err(SignatureError::WrongKey));
        // Garbage and a missing metadata header are refused as such, never a panic.
        for (s, m) in [
            ("!!", &meta[..]),
            (&sig[..], "e30="),
            (&sig[..], "bm9wZQ=="),
        ] {
            assert_eq!(
                rs.verify(&headers(s, m), now),
                Err(SignatureError::Malformed)
            );
        }
        let mut h3 = HeaderMap::new();
        h3.insert(X_CF_PROXY_SIGNATURE, sig.parse().unwrap());
        assert_eq!(rs.verify(&h3, now), Err(SignatureError::NoMetadata));
    }

    #[test]
    fn the_previous_secret_still_opens_what_it_signed() {
        let old = runtime("old", None, Duration::from_secs(60));
        let rotated = runtime("new", Some("old"), Duration::from_secs(60));
        let now = SystemTime::now();
        let (sig, meta) = old.sign("https://a.example/", now);
        assert_eq!(
            rotated.verify(&headers(&sig, &meta), now).unwrap(),
            "https://a.example/"
        );
        // …and new requests are signed with the new one only.
        let (sig, meta) = rotated.sign("https://a.example/", now);
        assert_eq!(
            old.verify(&headers(&sig, &meta), now),
            Err(SignatureError::WrongKey)
        );
    }

    /// A signature made by another implementation of GoRouter's scheme (Python's hashlib and
    /// `cryptography`: PBKDF2-HMAC-SHA256 without salt, 100,001 rounds, AES-128-GCM, base64url
    /// with padding; the time as Go writes a local one) opens here.
    #[test]
    fn a_signature_made_elsewhere_opens() {
        let rs = runtime("my-route-services-secret", None, Duration::from_secs(60));
        let sig = "xWbet8YqTrQO6lfLCMjW7WcTW2Vmx0MoZcAqFPJ1X4OSDEvdt7lxrm6evY6NmrtH1VX0GYC3PLmKqffB5SG7sVh6llP_iYO9VqQZ2aH8iB0SZJNzzKbDHwXJr2XqsQU3YNVuBX1baxgmZOjvvdFj0vNPn4JZ709W";
        let meta = "eyJub25jZSI6IkFBRUNBd1FGQmdjSUNRb0wifQ==";
        let signed = parse_rfc3339("2026-12-02T22:10:05Z").unwrap();
        let url = rs
            .verify(&headers(sig, meta), signed + Duration::from_secs(30))
            .unwrap();
        assert_eq!(url, "https://app.example.com/p?q=1");
        assert!(matches!(
            rs.verify(&headers(sig, meta), signed + Duration::from_secs(61)),
            Err(SignatureError::Expired { .. })
        ));
    }

    #[test]
    fn times_read_as_go_writes_them() {
        let t = parse_rfc3339("2026-12-02T23:10:05.123456789+01:00").unwrap();
        let utc = parse_rfc3339("2026-12-02T22:10:05.123456789Z").unwrap();
        assert_eq!(t, utc);
        let now = SystemTime::now();
        assert_eq!(parse_rfc3339(&rfc3339(now)).unwrap(), now);
    }

    #[test]
    fn the_hairpinning_allowlist_matches_names_and_one_label_below_wildcards() {
        let list = ["*.apps.internal".to_string(), "rs.example.com".to_string()];
        for (host, allowed) in [
            ("auth.apps.internal", true),
            ("rs.example.com", true),
            ("a.b.apps.internal", false),
            ("apps.internal", false),
            ("x.rs.example.com", false),
            ("example.com", false),
            ("auth.apps.internal.evil", false),
        ] {
            assert_eq!(allowed_to_hairpin(&list, host), allowed, "{host}");
        }
        assert!(allowed_to_hairpin(&[], "anything.example"));
    }
}
