//! Configuration (SPEC §3): YAML → [`raw`] serde types → validated [`Config`].
//!
//! Validation collects every problem with its key path (`domains[0].ca_certs: …`) instead of
//! stopping at the first one; unknown keys are problems too.

mod pem;
mod raw;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::names::DomainPattern;
use crate::registry::{LoadBalancing, ValidRegistration};
pub use pem::{load_certified_key, load_certs, parse_certs, CertFile, CertValidity};
use raw::*;
pub use token::{bearer_access, read_token, Access, Secret};

/// A whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from (for messages and reloads); `None` for the embedded demo.
    pub source: Option<PathBuf>,
    pub listen: Listen,
    pub admin: Option<Admin>,
    pub tls: Tls,
    pub forwarded_client_cert: XfccMode,
    /// `x_forwarded_proto`: what the backends are told the caller's scheme was.
    pub x_forwarded_proto: ForwardedProto,
    pub domains: Vec<Domain>,
    pub endpoint_selection: EndpointSelection,
    pub backends: Backends,
    pub registry: RegistrySettings,
    pub nats: Option<Nats>,
    pub routes: Vec<ValidRegistration>,
    pub access_log: AccessLog,
    pub xdp: Xdp,
    pub limits: Limits,
    pub drain: Drain,
    /// `tracing.w3c`: the `tracestate` key the gateway's W3C Trace Context entries go under
    /// (`portcullis`, or `<tenant>@portcullis`); `None` leaves `traceparent` and `tracestate` as
    /// the caller sent them.
    pub w3c_tracestate_key: Option<Arc<str>>,
    /// `tracing.trace_key` (GoRouter's `trace_key`): a request whose `X-Vcap-Trace` header is
    /// this secret is answered with the gateway's and the endpoint's addresses.
    pub trace_key: Option<Secret>,
    /// `http_rewrite.responses`: headers removed from, then added to, every response.
    pub response_rewrite: ResponseRewrite,
    /// `html_error_template_file` (GoRouter's): the gateway's own answers as the operator's HTML
    /// page, for callers whose `Accept` names `text/html`.
    pub error_template: Option<Arc<crate::proxy::ErrorTemplate>>,
    /// `route_services`: routes bound to a route service send their requests through it; `None`
    /// answers them 502 `route_service_unsupported`, as GoRouter does with route services off.
    pub route_services: Option<RouteServices>,
    /// Every certificate loaded from the files above, in config order, for the expiry checks.
    pub certificate_validity: Vec<CertValidity>,
}

/// `http_rewrite.responses` (GoRouter's): applied to every response the gateway sends, the
/// backends' and its own (404, 403, 502 …), for headers such as `Strict-Transport-Security`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseRewrite {
    /// `remove_headers`: removed first.
    pub remove: Vec<http::HeaderName>,
    /// `add_headers_if_not_present`: then set where the response has no such header.
    pub add_if_absent: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl ResponseRewrite {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add_if_absent.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.add_if_absent {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// Headers the HTTP layer writes itself (framing, hop-by-hop): a rewrite of them would corrupt
/// the response or be undone.
const UNREWRITABLE: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The admin API (SPEC §12).
#[derive(Clone, Debug)]
pub struct Admin {
    pub listen: SocketAddr,
    /// `admin.token_file`: when set, every request but `GET /health` must carry the token as
    /// `Authorization: Bearer <token>`. Read again on every reload, so a token can be rotated.
    pub token: Option<Secret>,
    /// The token file can be read by every user on the host (the gateway warns).
    pub token_world_readable: bool,
    /// `admin.tls`: serve the admin API over TLS (reloaded with the config).
    pub tls: Option<AdminTls>,
    /// `admin.max_connections`: admin connections open at once; one more is closed as soon as
    /// it is accepted (reloaded with the config).
    pub max_connections: usize,
}

/// `admin.max_connections` unless set: scrapers and operators need a handful; the bound keeps
/// the admin API from taking the file descriptors the data plane counts on.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// The admin API's own certificate and, optionally, the CA its clients must present a
/// certificate from.
#[derive(Clone, Debug)]
pub struct AdminTls {
    pub key: Arc<CertifiedKey>,
    pub client_ca: Option<Vec<CertificateDer<'static>>>,
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    /// Peers whose connections start with a PROXY protocol header (`listen.proxy_protocol.from`,
    /// see [`crate::proxy_protocol`]); empty when none do.
    pub proxy_protocol_from: Vec<IpNet>,
}

impl Listen {
    /// Whether a connection from `peer` must start with a PROXY protocol header.
    pub fn expects_proxy_header(&self, peer: std::net::IpAddr) -> bool {
        self.proxy_protocol_from.iter().any(|n| n.contains(&peer))
    }
}

#[derive(Clone, Debug)]
pub struct Tls {
    /// Server certificates; the first is the default when no SAN matches the SNI.
    pub certificates: Vec<ServerCert>,
    pub handshake_timeout: Duration,
    pub ktls: KtlsMode,
    /// Protocol versions offered to clients (`tls.min_version`): TLS 1.3, and 1.2 unless the
    /// minimum is 1.3.
    pub versions: &'static [&'static rustls::SupportedProtocolVersion],
    /// `tls.cipher_suites`, in the order given; empty: rustls's defaults (every suite it has,
    /// all AEAD with forward secrecy).
    pub cipher_suites: Vec<rustls::SupportedCipherSuite>,
}

/// The cipher suites `tls.cipher_suites` may name: rustls's, by their IANA names.
fn cipher_suite_names() -> Vec<(&'static str, rustls::SupportedCipherSuite)> {
    rustls::crypto::ring::DEFAULT_CIPHER_SUITES
        .iter()
        .filter_map(|s| s.suite().as_str().map(|n| (n, *s)))
        .collect()
}

/// One server certificate with the names it serves.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// DNS SANs of the leaf, normalised; `*.` entries match one label.
    pub dns_names: Vec<DomainPattern>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KtlsMode {
    Auto,
    On,
    Off,
}

/// `x_forwarded_proto`: the `X-Forwarded-Proto` a backend gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedProto {
    /// The scheme of the connection the request came on, whatever the caller sent (GoRouter's
    /// `sanitize_forwarded_proto: true`).
    Connection,
    /// Always `https` (GoRouter's `force_forwarded_proto_https`): behind a balancer that
    /// terminates HTTPS and sends plain HTTP on.
    Https,
    /// The caller's own `http` or `https` when it sends one, else the connection's (GoRouter's
    /// default): only behind a balancer that sets the header, since any caller can.
    Client,
}

/// What happens to an incoming `X-Forwarded-Client-Cert` header (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XfccMode {
    AlwaysForward,
    Forward,
    SanitizeSet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XfccFormat {
    Raw,
    Envoy,
}

/// An identity-aware (mTLS) domain.
#[derive(Clone, Debug)]
pub struct Domain {
    pub pattern: DomainPattern,
    /// Trust anchors client certificates must chain to.
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub forwarded_client_cert: XfccMode,
    pub xfcc_format: XfccFormat,
    pub allowed_sources: Option<AllowedSources>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedSources {
    pub cidrs: Vec<IpNet>,
    pub registry_hosts: bool,
}

/// `authorization.endpoint_selection` (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EndpointSelection {
    #[default]
    Filter,
    Strict,
}

#[derive(Clone, Debug)]
pub struct Backends {
    /// Trust anchors for TLS backends; `None` = the router cannot verify TLS backends.
    pub ca_certs: Option<Vec<CertificateDer<'static>>>,
    /// Client certificate presented to TLS backends.
    pub client_cert: Option<Arc<CertifiedKey>>,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    /// `backends.response_body_timeout`: the longest an endpoint's response body may go without
    /// sending anything before it is cut (zero: no limit).
    pub response_body_timeout: Duration,
    /// `backends.keep_alive_probe_interval` (GoRouter's): TCP keepalive on backend connections,
    /// first probe after this much silence and then one this often, nine unanswered probes
    /// ending the connection (zero: the kernel's defaults, off).
    pub keep_alive_probe_interval: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// Requests one h2 backend connection carries at a time; when every connection to a backend
    /// carries this many, another is opened.
    pub h2_streams_per_connection: usize,
    /// How long an endpoint that failed a connection comes after the others in selection
    /// (GoRouter's "ineligible" endpoints); zero = never.
    pub failure_cooldown: Duration,
    /// Cookies that start a sticky session (GoRouter's `sticky_session_cookie_names`); empty =
    /// sticky sessions off. See [`crate::proxy::sticky`].
    pub sticky_session_cookies: Vec<String>,
    /// GoRouter's `secure_cookies`: the instance cookie is always `Secure`, whatever the session
    /// cookie says.
    pub secure_cookies: bool,
    /// Requests in flight to one endpoint at most (GoRouter's `backends.max_conns`); a route
    /// whose endpoints are all that busy answers 503. Zero = no limit.
    pub max_conns: usize,
    /// `backends.availability_zone` with `az_preference: locally-optimistic` (GoRouter's `zone`
    /// and `balancing_algorithm_az_preference`): a request's first endpoint is one registered
    /// in this zone when one can take it; retries, and routes with none there, use any zone.
    pub local_zone: Option<String>,
    /// `backends.max_attempts` (GoRouter's): how many endpoints one request may fail to reach
    /// before it is answered 502.
    pub max_attempts: usize,
    /// `backends.balancing_algorithm` (GoRouter's `balancing_algorithm`): how routes that do not
    /// set `loadbalancing` are balanced, and hash-based routes' requests without their header.
    pub balancing: LoadBalancing,
}

/// `registry.start_delay` unless set: the interval the gateway asks route emitters to
/// register in (`minimumRegisterIntervalInSeconds`), so each has registered once.
pub const DEFAULT_START_DELAY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub droplet_stale_threshold: Duration,
    pub prune_interval: Duration,
    /// `registry.start_delay` (GoRouter's `start_response_delay_interval`): how long after its
    /// first connection to NATS the gateway lets route emitters re-register their routes
    /// before `/health` says it can serve.
    pub start_delay: Duration,
    /// `registry.healthy_while_disconnected`: whether `/health` stays 200 while NATS is
    /// disconnected (the table is kept and served either way). Off, the default, a gateway cut
    /// off from NATS leaves its balancer; on, a NATS outage across the fleet does not take every
    /// gateway out at once.
    pub healthy_while_disconnected: bool,
    /// Which NATS registrations this gateway takes, by their `isolation_segment`.
    pub sharding: Sharding,
}

/// GoRouter's `routing_table_sharding_mode` with its `isolation_segments`: a gateway serving
/// one isolation segment must not route to the apps of the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Every registration (the default).
    All,
    /// Only registrations in these isolation segments.
    Segments(Vec<String>),
    /// Registrations without an isolation segment (the shared one) and those in these.
    SharedAndSegments(Vec<String>),
}

impl Sharding {
    /// Whether a registration with this `isolation_segment` (none or empty: the shared
    /// segment) belongs to this gateway's routing table.
    pub fn serves(&self, segment: Option<&str>) -> bool {
        let segment = segment.unwrap_or("");
        match self {
            Sharding::All => true,
            Sharding::Segments(names) => names.iter().any(|n| n == segment),
            Sharding::SharedAndSegments(names) => {
                segment.is_empty() || names.iter().any(|n| n == segment)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Nats {
    /// The server URLs without the credentials written into them (those are in `auth`), so
    /// that they can be logged.
    pub servers: Vec<String>,
    /// The user and password (or token) written into the server URLs.
    pub auth: Option<NatsAuth>,
    /// Publish learned denials on `portcullis.deny` and apply the fleet's (default true).
    pub share_denials: bool,
    /// TLS to every NATS server (GoRouter's `nats.tls_enabled`), required when set.
    pub tls: Option<NatsTls>,
}

/// Credentials for NATS, from `nats://user:password@host:port` (or `nats://token@host:port`).
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    UserPassword { user: String, password: String },
    Token(String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "user {user:?} with a password"),
            NatsAuth::Token(_) => write!(f, "a token"),
        }
    }
}

/// `route_services` (GoRouter's `route_services_secret`, `route_services_secret_decrypt_only`,
/// `route_services_timeout`, `route_services_recommend_https`): see [`crate::proxy::route_service`].
#[derive(Clone)]
pub struct RouteServices {
    /// Signs the requests sent to route services and checks those that come back.
    pub secret: String,
    /// The previous secret during a rotation: requests signed with it are still taken back.
    pub secret_decrypt_only: Option<String>,
    /// How long a signature is good for: a request that comes back later is refused.
    pub timeout: Duration,
    /// Whether `X-CF-Forwarded-Url` says `https://` (else `http://`).
    pub recommend_https: bool,
    /// GoRouter's `route_services_hairpinning`: a route service that is a route of this
    /// gateway (outside every mTLS domain, without a policy) is sent to that route's endpoints
    /// directly instead of through DNS and the balancer.
    pub hairpinning: bool,
    /// GoRouter's `route_services_hairpinning_allowlist`: when not empty, only route services
    /// whose host is one of these names, or one label below a `*.` entry's domain, are
    /// hairpinned; the others go out through DNS. Lowercase.
    pub hairpinning_allowlist: Vec<String>,
    /// GoRouter's `route_services_strict_signature_validation`: a request for a route without a
    /// route service that carries `X-CF-Proxy-Signature` must carry a valid one (a route
    /// service's own route, called directly with forged headers, is refused).
    pub strict_signature_validation: bool,
    /// Trust anchors for the route services' certificates besides the system's.
    pub ca_certs: Vec<CertificateDer<'static>>,
}

impl RouteServices {
    /// Route services signed with `secret` and every other setting at its default, as a
    /// `route_services` section with only `secret` gives them.
    pub fn new(secret: impl Into<String>) -> Self {
        RouteServices {
            secret: secret.into(),
            secret_decrypt_only: None,
            timeout: Duration::from_secs(60),
            recommend_https: true,
            hairpinning: true,
            hairpinning_allowlist: Vec::new(),
            strict_signature_validation: false,
            ca_certs: Vec::new(),
        }
    }
}

impl std::fmt::Debug for RouteServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteServices")
            .field("secret", &"***")
            .field(
                "secret_decrypt_only",
                &self.secret_decrypt_only.as_ref().map(|_| "***"),
            )
            .field("timeout", &self.timeout)
            .field("recommend_https", &self.recommend_https)
            .field("hairpinning", &self.hairpinning)
            .field("hairpinning_allowlist", &self.hairpinning_allowlist)
            .field(
                "strict_signature_validation",
                &self.strict_signature_validation,
            )
            .field("ca_certs", &self.ca_certs.len())
            .finish()
    }
}

/// `s` with whatever stands between `://` and `@` (credentials) replaced by `***`.
fn redacted(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(a), Some(b)) if b > a + 3 => format!("{}***{}", &s[..a + 3], &s[b..]),
        _ => s.to_string(),
    }
}

/// A NATS server URL split into the URL without credentials and the credentials.
fn nats_server(s: &str) -> Result<(String, Option<NatsAuth>), String> {
    let shown = redacted(s);
    let bad = |why: &str| format!("invalid URL '{shown}': {why}, expected nats://HOST:PORT");
    let mut url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "nats" | "tls") {
        return Err(bad("the scheme is neither nats nor tls"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad("the credentials are not UTF-8 once decoded"))
    };
    let auth = match (url.username(), url.password()) {
        ("", None) => None,
        (user, Some(password)) => Some(NatsAuth::UserPassword {
            user: decode(user)?,
            password: decode(password)?,
        }),
        (token, None) => Some(NatsAuth::Token(decode(token)?)),
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok((url.to_string(), auth))
}

/// `nats.tls`: whom the NATS servers' certificates must chain to, and the client certificate
/// to present (Cloud Foundry's `nats-tls` requires one).
#[derive(Clone, Debug)]
pub struct NatsTls {
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub client_cert: Option<Arc<CertifiedKey>>,
}

#[derive(Clone, Debug)]
pub struct AccessLog {
    /// `None` = stdout.
    pub path: Option<PathBuf>,
    pub extra_fields: Vec<ExtraField>,
    /// `access_log.headers` (GoRouter's `extra_headers_to_log`): request headers each line
    /// ends with, in this order, after the extra fields.
    pub headers: Vec<LoggedHeader>,
    /// `access_log.redact_query_parameters` (GoRouter's `redact_query_parameters`).
    pub redact_query: QueryRedaction,
    /// `access_log.redact_source_ip` (GoRouter's `disable_log_source_ip`): the client address
    /// is logged as `"-"`.
    pub redact_source_ip: bool,
    /// `access_log.redact_forwarded_for` (GoRouter's `disable_log_forwarded_for`):
    /// `x_forwarded_for:"-"`.
    pub redact_forwarded_for: bool,
}

impl Default for AccessLog {
    /// To stdout, with SPEC §9's default extra fields, nothing redacted.
    fn default() -> AccessLog {
        AccessLog {
            path: None,
            extra_fields: ExtraField::ALL[..5].iter().map(|(_, f)| *f).collect(),
            headers: Vec::new(),
            redact_query: QueryRedaction::None,
            redact_source_ip: false,
            redact_forwarded_for: false,
        }
    }
}

/// A request header logged as a field of its own: `X-Tenant-Id` as `x_tenant_id:"…"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedHeader {
    pub name: http::HeaderName,
    /// The field's name in the line: the header's, lower case, `-` written as `_`.
    pub field: String,
}

/// What the access log shows of a request's query string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryRedaction {
    /// The whole query (the default).
    None,
    /// No query: `/users?name=peter` is logged as `/users`.
    All,
    /// The query's SHA-1 in hex, as GoRouter writes it: `/users?hash=<40 hex digits>`.
    Hash,
}

impl QueryRedaction {
    pub const ALL: [(&'static str, QueryRedaction); 3] = [
        ("none", QueryRedaction::None),
        ("all", QueryRedaction::All),
        ("hash", QueryRedaction::Hash),
    ];
}

/// The names a line's own fields have, which a logged header's field must not repeat.
const LINE_FIELDS: [&str; 9] = [
    "x_forwarded_for",
    "x_forwarded_proto",
    "vcap_request_id",
    "response_time",
    "gorouter_time",
    "app_id",
    "app_index",
    "instance_id",
    "x_cf_routererror",
];

/// An access-log extra field (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraField {
    TlsSni,
    CallerCfApp,
    CallerCfSpace,
    CallerCfOrg,
    RoutePolicy,
    FailedAttempts,
    BackendTime,
    Ktls,
    RouteService,
    LocalAddress,
    FailedAttemptsTime,
    DnsTime,
    DialTime,
    TlsTime,
    Resent,
}

impl ExtraField {
    pub const ALL: [(&'static str, ExtraField); 15] = [
        ("tls_sni", ExtraField::TlsSni),
        ("caller_cf_app", ExtraField::CallerCfApp),
        ("caller_cf_space", ExtraField::CallerCfSpace),
        ("caller_cf_org", ExtraField::CallerCfOrg),
        ("route_policy", ExtraField::RoutePolicy),
        ("failed_attempts", ExtraField::FailedAttempts),
        ("backend_time", ExtraField::BackendTime),
        ("ktls", ExtraField::Ktls),
        ("route_service", ExtraField::RouteService),
        // GoRouter's, about the backend connection.
        ("local_address", ExtraField::LocalAddress),
        ("failed_attempts_time", ExtraField::FailedAttemptsTime),
        ("dns_time", ExtraField::DnsTime),
        ("dial_time", ExtraField::DialTime),
        ("tls_time", ExtraField::TlsTime),
        ("resent", ExtraField::Resent),
    ];

    /// The field's name as it appears in the log line.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(n, _)| n)
    }
}

#[derive(Clone, Debug)]
pub struct Xdp {
    pub interfaces: Vec<String>,
    /// bpffs folder where the maps and links are pinned (survive daemon restarts).
    pub pin_path: PathBuf,
    /// Detach on clean shutdown (default: stay attached so protection outlives the daemon).
    pub detach_on_exit: bool,
    pub mode: XdpMode,
    pub ports: Vec<u16>,
    pub reject: XdpReject,
    pub deny_learning: DenyLearning,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpReject {
    Reset,
    Drop,
}

#[derive(Clone, Debug)]
pub struct DenyLearning {
    pub enabled: bool,
    pub threshold: u32,
    pub window: Duration,
    pub ttl: Duration,
    pub max_ttl: Duration,
    pub exempt: Vec<IpNet>,
}

/// Connection and request limits. Not in SPEC §3's example; documented in the README.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// The longest a client may send nothing of a request body the endpoint is waiting for,
    /// before the endpoint answers (zero: no limit). Then 408 `request_body_timeout`.
    pub request_body_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long an HTTP/1.1 connection the gateway closes goes on reading and discarding what the
    /// client still sends (a request body answered before it was read), so that closing does not
    /// reset the connection under the answer (zero: not at all).
    pub linger_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// Threads serving connections, each with its own event loop and backend pool
    /// (0 = one per CPU).
    pub workers: usize,
    /// The listeners' `listen(2)` backlog: how many connections the kernel queues, complete
    /// (accept queue) and half-open (SYN queue), before it turns to SYN cookies or drops. The
    /// kernel caps it at `net.core.somaxconn`.
    pub listen_backlog: u32,
}

/// `backends.response_header_timeout` unless set.
pub const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// `limits.request_body_timeout` unless set: shorter than `backends.response_header_timeout`'s
/// default, so that a client that stops half way through its body is answered 408 before the
/// endpoint waiting for it is blamed (504); nginx's `client_body_timeout` is 60 s.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// `limits.linger_timeout` unless set: as long as nginx's `lingering_timeout`, but a bound on the
/// whole linger where nginx's bounds each wait between reads (its `lingering_time`, 30 s, bounds
/// the whole); Go's server waits 0.5 s.
pub const DEFAULT_LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// The most `limits.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// The most `limits.max_header_bytes` may be: 16 times GoRouter's 1 MiB. It bounds what one
/// request head (an HTTP/1.1 buffer, an h2 header list) may hold in memory, and an h2 header
/// list size is a 32-bit setting.
pub const MAX_HEADER_BYTES: usize = 16 << 20;

/// Endpoints one request may fail to reach before its 502, unless `backends.max_attempts` says
/// (SPEC §6, GoRouter's default).
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;
/// `limits.listen_backlog` unless set: Linux's default `net.core.somaxconn` since 5.4. (Rust's
/// and tokio's listeners use 128, which a burst of new connections overflows.)
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// The largest backlog `listen(2)` takes as given (`somaxconn` is at most this).
pub const MAX_LISTEN_BACKLOG: u32 = 65_535;

impl Limits {
    /// The number of worker threads to start: `workers`, or one per CPU when it is 0.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            idle_timeout: Duration::from_secs(90),
            linger_timeout: DEFAULT_LINGER_TIMEOUT,
            h2_max_concurrent_streams: 256,
            workers: 0,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
        }
    }
}

/// How the gateway stops on SIGTERM or SIGINT (README, "Running a real deployment"). Not in
/// SPEC §3's example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// How long the gateway keeps serving, new connections included, while `/health` answers
    /// 503 so that load balancers take it out of rotation first; responses on HTTP/1.1 close
    /// their connection and h2 connections are sent GOAWAY, so clients reconnect elsewhere.
    pub wait: Duration,
    /// Then the listeners close: how long requests in flight get to finish before the process
    /// exits anyway.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            wait: Duration::ZERO,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `domains[0].forwarded_client_cert`.
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a config could not be used. Always the operator's input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {} problem(s):\n{}", path.display(), problems.len(),
        problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem, one `key: reason` line each.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Self::from_yaml(&text, base, path)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Validates YAML text; `base` resolves relative paths, `name` is used in messages.
    pub fn from_yaml(text: &str, base: &Path, name: &Path) -> Result<Config, ConfigError> {
        // Syntax first, so a YAML error is reported as such with its line and column.
        let value: serde_norway::Value = match serde_norway::from_str(text) {
            Ok(serde_norway::Value::Null) => serde_norway::Value::Mapping(Default::default()),
            Ok(v) => v,
            Err(e) => {
                return Err(ConfigError::Syntax {
                    path: name.to_path_buf(),
                    message: format!("invalid YAML: {e}"),
                })
            }
        };
        let mut unknown = Vec::new();
        let raw: RawConfig = {
            let mut on_unknown = |path: serde_ignored::Path<'_>| {
                unknown.push(Problem {
                    key: format_ignored(&path.to_string()),
                    reason: "unknown key".into(),
                })
            };
            let de = serde_ignored::Deserializer::new(value, &mut on_unknown);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = format_ignored(&e.path().to_string());
                let inner = e.into_inner();
                ConfigError::Syntax {
                    path: name.to_path_buf(),
                    message: if path.is_empty() {
                        format!("invalid configuration: {inner}")
                    } else {
                        format!("{path}: {inner}")
                    },
                }
            })?
        };
        let mut v = Validator {
            base,
            problems: unknown,
            validity: Vec::new(),
        };
        let cfg = v.config(raw);
        if v.problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: name.to_path_buf(),
                problems: v.problems,
            })
        }
    }

    /// The mTLS domain that governs a normalised host name (exact beats wildcard).
    pub fn domain_for(&self, host: &str) -> Option<&Domain> {
        crate::names::best_match(self.domains.iter().map(|d| &d.pattern), host)
            .map(|i| &self.domains[i])
    }
}

/// serde_ignored and serde_path_to_error write `domains.0.name`; we write `domains[0].name`.
fn format_ignored(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.').filter(|s| !s.is_empty() && *s != "?") {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

struct Validator<'a> {
    base: &'a Path,
    problems: Vec<Problem>,
    /// Every certificate loaded so far.
    validity: Vec<CertValidity>,
}

impl Validator<'_> {
    /// What the XDP gate's maps can hold (their sizes are fixed when the program is built):
    /// checked when `xdp.interfaces` asks for the gate, so a config it cannot enforce is refused
    /// at load or reload instead of leaving the maps half written. Registry hosts come on top at
    /// run time; those that do not fit leave their domain to the daemon's own check.
    fn gate_capacity(&mut self, ports: &[u16], domains: &[Domain], balancers: &[IpNet]) {
        use portcullis_common::{ALLOW_ENTRIES, BALANCER_ENTRIES, MAX_DOMAINS, PORT_ENTRIES};
        let distinct: std::collections::BTreeSet<&IpNet> = balancers.iter().collect();
        if distinct.len() > BALANCER_ENTRIES as usize {
            self.problem(
                "listen.proxy_protocol.from",
                format!(
                    "{} prefixes; the XDP gate's BALANCERS map holds {BALANCER_ENTRIES}",
                    distinct.len()
                ),
            );
        }
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        if distinct.len() > PORT_ENTRIES as usize {
            self.problem(
                "xdp.ports",
                format!(
                    "{} ports; the XDP gate inspects at most {PORT_ENTRIES}",
                    distinct.len()
                ),
            );
        }
        if domains.len() > MAX_DOMAINS as usize {
            self.problem(
                "domains",
                format!(
                    "{} domains; the XDP gate (xdp.interfaces) tells at most {MAX_DOMAINS} apart",
                    domains.len()
                ),
            );
        }
        let prefixes: usize = domains
            .iter()
            .filter_map(|d| d.allowed_sources.as_ref())
            // `cidrs` are truncated to their network already; the same network twice is one.
            .map(|a| {
                a.cidrs
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .sum();
        if prefixes > ALLOW_ENTRIES as usize {
            self.problem(
                "domains",
                format!(
                    "the allowed_sources lists hold {prefixes} prefixes; the XDP gate's ALLOW map \
                     holds {ALLOW_ENTRIES}"
                ),
            );
        }
    }

    fn problem(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        self.parse_duration(key, raw, default, false)
    }

    /// `backends.sticky_session_cookies`: cookie names, `JSESSIONID` unless set.
    fn sticky_session_cookies(&mut self, raw: Option<Vec<String>>) -> Vec<String> {
        let Some(names) = raw else {
            return vec!["JSESSIONID".to_string()];
        };
        let key = "backends.sticky_session_cookies";
        for (i, name) in names.iter().enumerate() {
            if name == crate::proxy::sticky::VCAP_ID {
                self.problem(
                    format!("{key}[{i}]"),
                    "__VCAP_ID__ is the cookie the gateway sets to keep a session's instance",
                );
            } else if !crate::proxy::sticky::cookie_name_ok(name) {
                self.problem(
                    format!("{key}[{i}]"),
                    format!("'{name}' cannot be a cookie name (letters, digits and !#$%&'*+-.^_`|~ only)"),
                );
            }
        }
        names
    }

    /// `access_log.headers`: header names, each logged once under a field name of its own.
    fn logged_headers(&mut self, names: &[String]) -> Vec<LoggedHeader> {
        let mut out: Vec<LoggedHeader> = Vec::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            let key = format!("access_log.headers[{i}]");
            let Ok(name) = http::HeaderName::from_bytes(n.as_bytes()) else {
                self.problem(key, format!("'{n}' is not a header name"));
                continue;
            };
            let field = name.as_str().replace('-', "_");
            let taken = LINE_FIELDS
                .iter()
                .copied()
                .chain(ExtraField::ALL.iter().map(|(f, _)| *f))
                .any(|f| f == field);
            if taken {
                self.problem(
                    key,
                    format!("'{n}' would be logged as {field}, a field the line already has"),
                );
            } else if out.iter().any(|h| h.name == name) {
                self.problem(key, format!("'{n}' is listed twice"));
            } else {
                out.push(LoggedHeader { name, field });
            }
        }
        out
    }

    /// `backends.keep_alive_probe_interval`: whole seconds (the kernel counts keepalive times in
    /// seconds), 1 s by default as GoRouter's, `0s` for none.
    fn keep_alive_probe_interval(&mut self, raw: Option<&str>) -> Duration {
        let key = "backends.keep_alive_probe_interval";
        let d = self.duration_or_zero(key, raw, Duration::from_secs(1));
        if d.subsec_nanos() != 0 {
            self.problem(
                key,
                "must be whole seconds: the kernel times TCP keepalive probes in seconds",
            );
            return Duration::from_secs(1);
        }
        if d.as_secs() > 32_767 {
            self.problem(key, "must be at most 32767s (the kernel's limit)");
            return Duration::from_secs(1);
        }
        d
    }

    /// A duration where `0s` means "not at all".
    fn duration_or_zero(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        self.parse_duration(key, raw, default, true)
    }

    fn parse_duration(
        &mut self,
        key: &str,
        raw: Option<&str>,
        default: Duration,
        zero_ok: bool,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw.trim()) {
            Ok(d) if zero_ok || !d.is_zero() => d,
            Ok(_) => {
                self.problem(key, "must be greater than zero");
                default
            }
            Err(_) => {
                self.problem(
                    key,
                    format!("invalid duration '{raw}', expected e.g. '10s' or '2m'"),
                );
                default
            }
        }
    }

    fn addr(&mut self, key: &str, raw: &str) -> Option<SocketAddr> {
        match raw.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(key, format!("invalid address '{raw}', expected IP:PORT"));
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: Option<&str>,
        options: &[(&str, T)],
        default: T,
        what: &str,
    ) -> T {
        let Some(raw) = raw else { return default };
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == raw) {
            return *v;
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.problem(
            key,
            format!(
                "invalid {what} '{raw}', must be one of {}",
                names.join(", ")
            ),
        );
        default
    }

    /// `backends.availability_zone` and `backends.az_preference` (`none` | `locally-optimistic`).
    fn local_zone(&mut self, zone: Option<&str>, preference: Option<&str>) -> Option<String> {
        let local = self.choice(
            "backends.az_preference",
            preference,
            &[("none", false), ("locally-optimistic", true)],
            false,
            "preference",
        );
        let zone = zone.map(str::trim).filter(|z| !z.is_empty());
        match (local, zone) {
            (true, Some(z)) => Some(z.to_string()),
            (true, None) => {
                self.problem(
                    "backends.availability_zone",
                    "az_preference locally-optimistic needs the gateway's own availability zone",
                );
                None
            }
            (false, _) => None,
        }
    }

    /// `registry.routing_table_sharding_mode` and `registry.isolation_segments`, as GoRouter's.
    fn sharding(&mut self, raw: &raw::RawRegistry) -> Sharding {
        #[derive(Clone, Copy)]
        enum Mode {
            All,
            Segments,
            Shared,
        }
        let mode = self.choice(
            "registry.routing_table_sharding_mode",
            raw.routing_table_sharding_mode.as_deref(),
            &[
                ("all", Mode::All),
                ("segments", Mode::Segments),
                ("shared-and-segments", Mode::Shared),
            ],
            Mode::All,
            "mode",
        );
        let names = raw.isolation_segments.clone();
        for (i, n) in names.iter().enumerate() {
            if n.trim().is_empty() {
                self.problem(
                    format!("registry.isolation_segments[{i}]"),
                    "an isolation segment needs a name (registrations without one are the shared segment: use shared-and-segments)",
                );
            }
        }
        match mode {
            Mode::All => {
                if !names.is_empty() {
                    self.problem(
                        "registry.isolation_segments",
                        "has no effect with routing_table_sharding_mode all (the default): set segments or shared-and-segments",
                    );
                }
                Sharding::All
            }
            Mode::Segments => {
                if names.is_empty() {
                    self.problem(
                        "registry.isolation_segments",
                        "routing_table_sharding_mode segments needs at least one isolation segment, or no route is served",
                    );
                }
                Sharding::Segments(names)
            }
            Mode::Shared => Sharding::SharedAndSegments(names),
        }
    }

    /// `tls.min_version`: `1.2` (default) offers TLS 1.3 and 1.2, `1.3` TLS 1.3 alone. Written
    /// as a YAML number or a string.
    fn tls_versions(
        &mut self,
        raw: Option<&serde_norway::Value>,
    ) -> &'static [&'static rustls::SupportedProtocolVersion] {
        let text = raw.map(|v| match v {
            serde_norway::Value::String(s) => s.clone(),
            serde_norway::Value::Number(n) => n.to_string(),
            other => format!("{other:?}"),
        });
        static ONLY_13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        self.choice(
            "tls.min_version",
            text.as_deref(),
            &[("1.2", rustls::DEFAULT_VERSIONS), ("1.3", ONLY_13)],
            rustls::DEFAULT_VERSIONS,
            "version",
        )
    }

    /// `tls.cipher_suites`: IANA names of rustls's suites; every offered version must keep one.
    fn cipher_suites(
        &mut self,
        raw: Option<&[String]>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Vec<rustls::SupportedCipherSuite> {
        let Some(raw) = raw else { return Vec::new() };
        let known = cipher_suite_names();
        let mut chosen: Vec<rustls::SupportedCipherSuite> = Vec::new();
        let mut unknown = false;
        for (i, name) in raw.iter().enumerate() {
            match known
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            {
                Some((_, s)) if !chosen.iter().any(|c| c.suite() == s.suite()) => chosen.push(*s),
                Some(_) => {}
                None => {
                    let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
                    self.problem(
                        format!("tls.cipher_suites[{i}]"),
                        format!(
                            "unknown cipher suite '{name}', must be one of {}",
                            names.join(", ")
                        ),
                    );
                    unknown = true;
                }
            }
        }
        if unknown {
            return Vec::new();
        }
        for v in versions {
            if !chosen.iter().any(|s| s.version() == *v) {
                let version = if v.version == rustls::ProtocolVersion::TLSv1_3 {
                    "TLS 1.3 (TLS13_*)"
                } else {
                    "TLS 1.2 (TLS_ECDHE_*; or set tls.min_version: 1.3)"
                };
                self.problem(
                    "tls.cipher_suites",
                    format!("no suite for {version}, which the gateway offers"),
                );
            }
        }
        chosen
    }

    fn cidrs(&mut self, key: &str, raw: &[String]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, c) in raw.iter().enumerate() {
            let parsed = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => out.push(n.trunc()),
                Err(_) => self.problem(format!("{key}[{i}]"), format!("invalid CIDR '{c}'")),
            }
        }
        out
    }

    fn admin(&mut self, raw: RawAdmin) -> Option<Admin> {
        let token = raw.token_file.as_deref().and_then(|rel| {
            let path = self.base.join(rel);
            match read_token(&path) {
                Ok(t) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path).map_or(0, |m| m.permissions().mode());
                    Some((Secret::new(&t), mode & 0o004 != 0))
                }
                Err(e) => {
                    self.problem("admin.token_file", e);
                    None
                }
            }
        });
        let listen = match raw.listen.as_deref() {
            Some(a) => self.addr("admin.listen", a)?,
            None if raw.token_file.is_some() || raw.tls.is_some() => {
                self.problem(
                    "admin.listen",
                    "required with admin.token_file and admin.tls",
                );
                return None;
            }
            None => return None,
        };
        let tls = raw.tls.and_then(|t| {
            let key = self.certified_key(
                "admin.tls",
                t.cert_chain.as_deref(),
                t.private_key.as_deref(),
            );
            let client_ca = t
                .client_ca
                .as_deref()
                .map(|p| self.certs("admin.tls.client_ca", p));
            Some(AdminTls {
                key: key?.key,
                client_ca: match client_ca {
                    Some(c) => Some(c?),
                    None => None,
                },
            })
        });
        let max_connections = match raw.max_connections {
            Some(0) => {
                self.problem("admin.max_connections", "must be at least 1");
                return None;
            }
            Some(n) => n,
            None => DEFAULT_ADMIN_MAX_CONNECTIONS,
        };
        Some(Admin {
            listen,
            max_connections,
            token_world_readable: token.as_ref().is_some_and(|t| t.1),
            token: token.map(|t| t.0),
            tls,
        })
    }

    /// A header name for `http_rewrite`: present, valid, and not one the HTTP layer owns.
    fn rewrite_name(&mut self, key: &str, name: Option<&str>) -> Option<http::HeaderName> {
        let Some(name) = name else {
            self.problem(format!("{key}.name"), "required");
            return None;
        };
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => {
                self.problem(
                    format!("{key}.name"),
                    format!("'{name}' is not a valid header name"),
                );
                None
            }
            Ok(h) if UNREWRITABLE.contains(&h.as_str()) => {
                self.problem(
                    format!("{key}.name"),
                    format!("'{name}' is written by the HTTP layer itself and cannot be rewritten"),
                );
                None
            }
            Ok(h) => Some(h),
        }
    }

    fn error_template(&mut self, rel: &str) -> Option<Arc<crate::proxy::ErrorTemplate>> {
        const KEY: &str = "html_error_template_file";
        let path = self.base.join(rel);
        let src = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                self.problem(KEY, format!("cannot read '{}': {e}", path.display()));
                return None;
            }
        };
        match crate::proxy::ErrorTemplate::parse(&src) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                self.problem(KEY, format!("'{}' {e}", path.display()));
                None
            }
        }
    }

    fn response_rewrite(&mut self, raw: &RawResponseRewrite) -> ResponseRewrite {
        let mut out = ResponseRewrite::default();
        for (i, h) in raw.remove_headers.iter().enumerate() {
            let key = format!("http_rewrite.responses.remove_headers[{i}]");
            if let Some(name) = self.rewrite_name(&key, h.name.as_deref()) {
                out.remove.push(name);
            }
        }
        for (i, h) in raw.add_headers_if_not_present.iter().enumerate() {
            let key = format!("http_rewrite.responses.add_headers_if_not_present[{i}]");
            let name = self.rewrite_name(&key, h.name.as_deref());
            let value = match h.value.as_deref() {
                None => {
                    self.problem(format!("{key}.value"), "required");
                    None
                }
                Some(v) => match http::HeaderValue::from_str(v) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.problem(
                            format!("{key}.value"),
                            "not a valid header value (visible ASCII, spaces and tabs only)",
                        );
                        None
                    }
                },
            };
            if let (Some(name), Some(value)) = (name, value) {
                out.add_if_absent.push((name, value));
            }
        }
        out
    }

    fn certs(&mut self, key: &str, rel: &str) -> Option<Vec<CertificateDer<'static>>> {
        match load_certs(self.base, rel) {
            Ok(c) => {
                self.validity.extend(pem::validity(key, rel, &c));
                Some(c)
            }
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    fn certified_key(
        &mut self,
        key: &str,
        chain: Option<&str>,
        pkey: Option<&str>,
    ) -> Option<CertFile> {
        match (chain, pkey) {
            (Some(c), Some(k)) => match load_certified_key(self.base, c, k) {
                Ok(ck) => {
                    let chain = format!("{key}.cert_chain");
                    self.validity.extend(pem::validity(&chain, c, &ck.key.cert));
                    Some(ck)
                }
                Err((field, e)) => {
                    self.problem(format!("{key}.{field}"), e);
                    None
                }
            },
            (None, _) => {
                self.problem(format!("{key}.cert_chain"), "required");
                None
            }
            (_, None) => {
                self.problem(format!("{key}.private_key"), "required");
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let fallback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let listen = match raw.listen {
            Some(l) => {
                let https = match l.https.as_deref() {
                    Some(a) => self.addr("listen.https", a),
                    None => {
                        self.problem("listen.https", "required");
                        None
                    }
                };
                let http = l.http.as_deref().and_then(|a| self.addr("listen.http", a));
                let proxy_protocol_from = match l.proxy_protocol {
                    None => Vec::new(),
                    Some(pp) if pp.from.is_empty() => {
                        self.problem(
                            "listen.proxy_protocol.from",
                            "lists no peer: name the load balancers' addresses (CIDRs), or \
                             leave proxy_protocol out",
                        );
                        Vec::new()
                    }
                    Some(pp) => self.cidrs("listen.proxy_protocol.from", &pp.from),
                };
                Listen {
                    https: https.unwrap_or(fallback),
                    http,
                    proxy_protocol_from,
                }
            }
            None => {
                self.problem("listen.https", "required");
                Listen {
                    https: fallback,
                    http: None,
                    proxy_protocol_from: Vec::new(),
                }
            }
        };
        let admin = raw.admin.and_then(|a| self.admin(a));

        let mut certificates = Vec::new();
        if raw.tls.certificates.is_empty() {
            self.problem(
                "tls.certificates",
                "at least one server certificate is required",
            );
        }
        for (i, c) in raw.tls.certificates.iter().enumerate() {
            let key = format!("tls.certificates[{i}]");
            if let Some(cf) =
                self.certified_key(&key, c.cert_chain.as_deref(), c.private_key.as_deref())
            {
                certificates.push(ServerCert {
                    key: cf.key,
                    dns_names: cf.dns_names,
                });
            }
        }
        let versions = self.tls_versions(raw.tls.min_version.as_ref());
        let tls = Tls {
            certificates,
            handshake_timeout: self.duration(
                "tls.handshake_timeout",
                raw.tls.handshake_timeout.as_deref(),
                Duration::from_secs(10),
            ),
            ktls: self.choice(
                "tls.ktls",
                raw.tls.ktls.as_deref(),
                &[
                    ("auto", KtlsMode::Auto),
                    ("on", KtlsMode::On),
                    ("off", KtlsMode::Off),
                ],
                KtlsMode::Auto,
                "mode",
            ),
            versions,
            cipher_suites: self.cipher_suites(raw.tls.cipher_suites.as_deref(), versions),
        };

        let xfcc_modes = [
            ("always_forward", XfccMode::AlwaysForward),
            ("forward", XfccMode::Forward),
            ("sanitize_set", XfccMode::SanitizeSet),
        ];
        let forwarded_client_cert = self.choice(
            "forwarded_client_cert",
            raw.forwarded_client_cert.as_deref(),
            &xfcc_modes,
            XfccMode::AlwaysForward,
            "mode",
        );

        let x_forwarded_proto = self.choice(
            "x_forwarded_proto",
            raw.x_forwarded_proto.as_deref(),
            &[
                ("connection", ForwardedProto::Connection),
                ("https", ForwardedProto::Https),
                ("client", ForwardedProto::Client),
            ],
            ForwardedProto::Connection,
            "mode",
        );

        let mut domains: Vec<Domain> = Vec::new();
        for (i, d) in raw.domains.iter().enumerate() {
            let key = format!("domains[{i}]");
            let pattern = match d.name.as_deref() {
                None => {
                    self.problem(format!("{key}.name"), "required");
                    None
                }
                Some(n) => match DomainPattern::parse(n) {
                    Ok(p) => {
                        if domains.iter().any(|o| o.pattern == p) {
                            self.problem(format!("{key}.name"), format!("duplicate domain '{p}'"));
                        }
                        Some(p)
                    }
                    Err(e) => {
                        self.problem(format!("{key}.name"), e.to_string());
                        None
                    }
                },
            };
            let ca_certs = match d.ca_certs.as_deref() {
                None => {
                    self.problem(format!("{key}.ca_certs"), "required");
                    None
                }
                Some(p) => self.certs(&format!("{key}.ca_certs"), p),
            };
            let mode = self.choice(
                &format!("{key}.forwarded_client_cert"),
                d.forwarded_client_cert.as_deref(),
                &xfcc_modes,
                XfccMode::SanitizeSet,
                "mode",
            );
            let format = self.choice(
                &format!("{key}.xfcc_format"),
                d.xfcc_format.as_deref(),
                &[("raw", XfccFormat::Raw), ("envoy", XfccFormat::Envoy)],
                XfccFormat::Raw,
                "format",
            );
            let allowed_sources = d.allowed_sources.as_ref().map(|a| AllowedSources {
                cidrs: self.cidrs(&format!("{key}.allowed_sources.cidrs"), &a.cidrs),
                registry_hosts: a.registry_hosts,
            });
            if let (Some(pattern), Some(ca_certs)) = (pattern, ca_certs) {
                domains.push(Domain {
                    pattern,
                    ca_certs,
                    forwarded_client_cert: mode,
                    xfcc_format: format,
                    allowed_sources,
                });
            }
        }

        let endpoint_selection = self.choice(
            "authorization.endpoint_selection",
            raw.authorization.endpoint_selection.as_deref(),
            &[
                ("filter", EndpointSelection::Filter),
                ("strict", EndpointSelection::Strict),
            ],
            EndpointSelection::Filter,
            "mode",
        );

        let b = &raw.backends;
        let ca_certs = b
            .ca_certs
            .as_deref()
            .and_then(|p| self.certs("backends.ca_certs", p));
        let client_cert = if b.cert_chain.is_some() || b.private_key.is_some() {
            self.certified_key(
                "backends",
                b.cert_chain.as_deref(),
                b.private_key.as_deref(),
            )
            .map(|c| c.key)
        } else {
            None
        };
        let backends = Backends {
            ca_certs,
            client_cert,
            connect_timeout: self.duration(
                "backends.connect_timeout",
                b.connect_timeout.as_deref(),
                Duration::from_secs(5),
            ),
            response_header_timeout: self.duration(
                "backends.response_header_timeout",
                b.response_header_timeout.as_deref(),
                DEFAULT_RESPONSE_HEADER_TIMEOUT,
            ),
            // GoRouter's whole-request limit (`request_timeout_in_seconds`) is 900 s; this one
            // counts only silence, so nothing GoRouter serves is cut by it.
            response_body_timeout: self.duration_or_zero(
                "backends.response_body_timeout",
                b.response_body_timeout.as_deref(),
                Duration::from_secs(900),
            ),
            keep_alive_probe_interval: self
                .keep_alive_probe_interval(b.keep_alive_probe_interval.as_deref()),
            idle_timeout: self.duration(
                "backends.idle_timeout",
                b.idle_timeout.as_deref(),
                Duration::from_secs(90),
            ),
            max_idle_per_endpoint: b.max_idle_per_endpoint.unwrap_or(100),
            h2_streams_per_connection: match b.h2_streams_per_connection {
                Some(0) => {
                    self.problem(
                        "backends.h2_streams_per_connection",
                        "must be at least 1 (requests one h2 backend connection carries at a time)",
                    );
                    1
                }
                Some(n) => n,
                None => 100,
            },
            failure_cooldown: self.duration_or_zero(
                "backends.failure_cooldown",
                b.failure_cooldown.as_deref(),
                Duration::from_secs(30),
            ),
            sticky_session_cookies: self.sticky_session_cookies(b.sticky_session_cookies.clone()),
            secure_cookies: b.secure_cookies,
            max_conns: b.max_conns.unwrap_or(0),
            local_zone: self.local_zone(b.availability_zone.as_deref(), b.az_preference.as_deref()),
            max_attempts: match b.max_attempts {
                Some(0) => {
                    self.problem(
                        "backends.max_attempts",
                        "must be at least 1 (the endpoints one request may try)",
                    );
                    1
                }
                Some(n) => n,
                None => DEFAULT_MAX_ATTEMPTS,
            },
            balancing: self.choice(
                "backends.balancing_algorithm",
                b.balancing_algorithm.as_deref(),
                &LoadBalancing::ALL,
                LoadBalancing::RoundRobin,
                "algorithm",
            ),
        };

        let registry = RegistrySettings {
            droplet_stale_threshold: self.duration(
                "registry.droplet_stale_threshold",
                raw.registry.droplet_stale_threshold.as_deref(),
                Duration::from_secs(120),
            ),
            start_delay: self.duration_or_zero(
                "registry.start_delay",
                raw.registry.start_delay.as_deref(),
                DEFAULT_START_DELAY,
            ),
            healthy_while_disconnected: raw.registry.healthy_while_disconnected.unwrap_or(false),
            prune_interval: self.duration(
                "registry.prune_interval",
                raw.registry.prune_interval.as_deref(),
                Duration::from_secs(30),
            ),
            sharding: self.sharding(&raw.registry),
        };

        let nats = raw.nats.map(|n| {
            if n.servers.is_empty() {
                self.problem("nats.servers", "at least one server is required");
            }
            let mut servers = Vec::with_capacity(n.servers.len());
            let mut auth: Option<NatsAuth> = None;
            for (i, s) in n.servers.iter().enumerate() {
                match nats_server(s) {
                    Err(e) => self.problem(format!("nats.servers[{i}]"), e),
                    Ok((url, None)) => servers.push(url),
                    Ok((url, Some(a))) => {
                        servers.push(url);
                        if auth.as_ref().is_some_and(|known| *known != a) {
                            self.problem(
                                format!("nats.servers[{i}]"),
                                "names other credentials than the servers before it; one user \
                                 and password (or token) serves them all, as GoRouter's \
                                 nats.user and nats.pass",
                            );
                        }
                        auth.get_or_insert(a);
                    }
                }
            }
            let tls = n.tls.map(|t| {
                let ca_certs = match t.ca_certs.as_deref() {
                    None => {
                        self.problem(
                            "nats.tls.ca_certs",
                            "required: the CA bundle the NATS servers' certificates chain to",
                        );
                        None
                    }
                    Some(p) => self.certs("nats.tls.ca_certs", p),
                };
                let client_cert = if t.cert_chain.is_some() || t.private_key.is_some() {
                    self.certified_key(
                        "nats.tls",
                        t.cert_chain.as_deref(),
                        t.private_key.as_deref(),
                    )
                    .map(|c| c.key)
                } else {
                    None
                };
                NatsTls {
                    ca_certs: ca_certs.unwrap_or_default(),
                    client_cert,
                }
            });
            Nats {
                servers,
                auth,
                share_denials: n.share_denials.unwrap_or(true),
                tls,
            }
        });

        let mut routes = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            match ValidRegistration::try_from(r) {
                Ok(v) => {
                    if v.route_service.is_some() && raw.route_services.is_none() {
                        self.problem(
                            format!("routes[{i}].route_service_url"),
                            "the route is bound to a route service, but route_services is not configured: its requests would all be answered 502; configure route_services or remove it",
                        );
                    }
                    for problem in &v.option_problems {
                        self.problem(
                            format!("routes[{i}].options.{}", problem.option()),
                            problem.to_string(),
                        );
                    }
                    for bad in &v.policy.malformed {
                        self.problem(
                            format!("routes[{i}].options.route_policy_sources"),
                            format!("malformed source '{bad}', expected cf:any, cf:app:<guid>, cf:space:<guid> or cf:org:<guid>"),
                        );
                    }
                    routes.push(v)
                }
                Err(e) => self.problem(format!("routes[{i}]"), e.to_string()),
            }
        }

        let access_log = AccessLog {
            path: match raw.access_log.path.as_deref() {
                None | Some("-") => None,
                Some(p) => Some(self.base.join(p)),
            },
            extra_fields: match raw.access_log.extra_fields {
                None => AccessLog::default().extra_fields,
                Some(names) => names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        let found = ExtraField::ALL
                            .iter()
                            .find(|(name, _)| name == n)
                            .map(|(_, f)| *f);
                        if found.is_none() {
                            let all: Vec<&str> = ExtraField::ALL.iter().map(|(n, _)| *n).collect();
                            self.problem(
                                format!("access_log.extra_fields[{i}]"),
                                format!("unknown field '{n}', must be one of {}", all.join(", ")),
                            );
                        }
                        found
                    })
                    .collect(),
            },
            headers: self.logged_headers(raw.access_log.headers.as_deref().unwrap_or_default()),
            redact_query: self.choice(
                "access_log.redact_query_parameters",
                raw.access_log.redact_query_parameters.as_deref(),
                &QueryRedaction::ALL,
                QueryRedaction::None,
                "value",
            ),
            redact_source_ip: raw.access_log.redact_source_ip.unwrap_or(false),
            redact_forwarded_for: raw.access_log.redact_forwarded_for.unwrap_or(false),
        };

        let x = &raw.xdp;
        let dl = &x.deny_learning;
        let threshold = dl.threshold.unwrap_or(20);
        if threshold == 0 {
            self.problem("xdp.deny_learning.threshold", "must be at least 1");
        }
        let ttl = self.duration(
            "xdp.deny_learning.ttl",
            dl.ttl.as_deref(),
            Duration::from_secs(60),
        );
        let max_ttl = self.duration(
            "xdp.deny_learning.max_ttl",
            dl.max_ttl.as_deref(),
            Duration::from_secs(3600),
        );
        if max_ttl < ttl {
            self.problem("xdp.deny_learning.max_ttl", "must not be shorter than ttl");
        }
        let ports = x.ports.clone().unwrap_or_else(|| {
            [listen.https.port()]
                .into_iter()
                .filter(|p| *p != 0)
                .collect()
        });
        if ports.contains(&0) {
            self.problem("xdp.ports", "port 0 is not a valid port");
        }
        if !x.interfaces.is_empty() {
            self.gate_capacity(&ports, &domains, &listen.proxy_protocol_from);
        }
        let xdp = Xdp {
            interfaces: x.interfaces.clone(),
            pin_path: PathBuf::from(x.pin_path.as_deref().unwrap_or("/sys/fs/bpf/portcullis")),
            detach_on_exit: x.detach_on_exit,
            mode: self.choice(
                "xdp.mode",
                x.mode.as_deref(),
                &[
                    ("auto", XdpMode::Auto),
                    ("native", XdpMode::Native),
                    ("skb", XdpMode::Skb),
                ],
                XdpMode::Auto,
                "mode",
            ),
            ports,
            reject: self.choice(
                "xdp.reject",
                x.reject.as_deref(),
                &[("reset", XdpReject::Reset), ("drop", XdpReject::Drop)],
                XdpReject::Reset,
                "action",
            ),
            deny_learning: DenyLearning {
                enabled: dl.enabled.unwrap_or(true),
                threshold,
                window: self.duration(
                    "xdp.deny_learning.window",
                    dl.window.as_deref(),
                    Duration::from_secs(10),
                ),
                ttl,
                max_ttl,
                exempt: self.cidrs("xdp.deny_learning.exempt", &dl.exempt),
            },
        };

        let defaults = Limits::default();
        let l = &raw.limits;
        let max_header_bytes = l.max_header_bytes.unwrap_or(defaults.max_header_bytes);
        if !(8192..=MAX_HEADER_BYTES).contains(&max_header_bytes) {
            self.problem(
                "limits.max_header_bytes",
                format!("{max_header_bytes} is not in 8192..={MAX_HEADER_BYTES}"),
            );
        }
        let workers = l.workers.unwrap_or(defaults.workers);
        if workers > MAX_WORKERS {
            self.problem(
                "limits.workers",
                format!("{workers} is more than {MAX_WORKERS}; 0 means one per CPU"),
            );
        }
        let listen_backlog = l.listen_backlog.unwrap_or(defaults.listen_backlog);
        if listen_backlog == 0 || listen_backlog > MAX_LISTEN_BACKLOG {
            self.problem(
                "limits.listen_backlog",
                format!("{listen_backlog} is not in 1..={MAX_LISTEN_BACKLOG}"),
            );
        }
        let limits = Limits {
            max_connections: l.max_connections.unwrap_or(defaults.max_connections).max(1),
            max_header_bytes: max_header_bytes.clamp(8192, MAX_HEADER_BYTES),
            header_read_timeout: self.duration(
                "limits.header_read_timeout",
                l.header_read_timeout.as_deref(),
                defaults.header_read_timeout,
            ),
            request_body_timeout: self.duration_or_zero(
                "limits.request_body_timeout",
                l.request_body_timeout.as_deref(),
                defaults.request_body_timeout,
            ),
            idle_timeout: self.duration(
                "limits.idle_timeout",
                l.idle_timeout.as_deref(),
                defaults.idle_timeout,
            ),
            linger_timeout: self.duration_or_zero(
                "limits.linger_timeout",
                l.linger_timeout.as_deref(),
                defaults.linger_timeout,
            ),
            h2_max_concurrent_streams: l
                .h2_max_concurrent_streams
                .unwrap_or(defaults.h2_max_concurrent_streams),
            workers: workers.min(MAX_WORKERS),
            listen_backlog: listen_backlog.clamp(1, MAX_LISTEN_BACKLOG),
        };
        let (d, defaults) = (&raw.drain, Drain::default());
        let drain = Drain {
            wait: self.duration_or_zero("drain.wait", d.wait.as_deref(), defaults.wait),
            timeout: self.duration_or_zero("drain.timeout", d.timeout.as_deref(), defaults.timeout),
        };

        let w3c_tracestate_key = self.tracing(&raw.tracing);
        let trace_key = raw.tracing.trace_key.as_deref().and_then(|k| {
            token::check_secret(k)
                .map_err(|e| self.problem("tracing.trace_key", e))
                .ok()
                .map(|()| Secret::new(k))
        });
        let response_rewrite = self.response_rewrite(&raw.http_rewrite.responses);
        let error_template = raw
            .html_error_template_file
            .as_deref()
            .and_then(|rel| self.error_template(rel));
        let route_services = raw.route_services.as_ref().map(|r| self.route_services(r));

        Config {
            source: None,
            listen,
            admin,
            tls,
            forwarded_client_cert,
            x_forwarded_proto,
            domains,
            endpoint_selection,
            backends,
            registry,
            nats,
            routes,
            access_log,
            xdp,
            limits,
            drain,
            w3c_tracestate_key,
            trace_key,
            response_rewrite,
            error_template,
            route_services,
            certificate_validity: std::mem::take(&mut self.validity),
        }
    }

    /// `route_services`: a secret is required (every gateway behind the same balancer needs the
    /// same one, as each takes back what another signed).
    fn route_services(&mut self, r: &RawRouteServices) -> RouteServices {
        let key = "route_services";
        let secret = match r.secret.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                self.problem(
                    format!("{key}.secret"),
                    "required: the key route service requests are signed with (GoRouter's route_services_secret)",
                );
                String::new()
            }
        };
        let secret_decrypt_only = match r.secret_decrypt_only.as_deref() {
            Some("") => {
                self.problem(format!("{key}.secret_decrypt_only"), "empty");
                None
            }
            other => other.map(str::to_string),
        };
        let ca_certs = r
            .ca_certs
            .as_deref()
            .and_then(|p| self.certs(&format!("{key}.ca_certs"), p))
            .unwrap_or_default();
        let defaults = RouteServices::new(secret);
        let hairpinning = r.hairpinning.unwrap_or(defaults.hairpinning);
        let hairpinning_allowlist =
            self.hairpinning_allowlist(r.hairpinning_allowlist.as_deref(), hairpinning);
        RouteServices {
            secret_decrypt_only,
            timeout: self.duration(
                &format!("{key}.timeout"),
                r.timeout.as_deref(),
                defaults.timeout,
            ),
            recommend_https: r.recommend_https.unwrap_or(defaults.recommend_https),
            hairpinning,
            hairpinning_allowlist,
            strict_signature_validation: r.strict_signature_validation,
            ca_certs,
            ..defaults
        }
    }

    /// `route_services.hairpinning_allowlist`: host names (`auth.example.com`) and one-label
    /// wildcards (`*.example.com`), as GoRouter takes them, lowercased.
    fn hairpinning_allowlist(&mut self, raw: Option<&[String]>, hairpinning: bool) -> Vec<String> {
        let key = "route_services.hairpinning_allowlist";
        let Some(raw) = raw else {
            return Vec::new();
        };
        if !hairpinning && !raw.is_empty() {
            self.problem(
                key,
                "has no effect unless route_services.hairpinning is true",
            );
        }
        let label_ok =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let mut out = Vec::new();
        for (i, entry) in raw.iter().enumerate() {
            let entry = entry.to_ascii_lowercase();
            let name = entry.strip_prefix("*.").unwrap_or(&entry);
            let labels: Vec<&str> = name.split('.').collect();
            if labels.len() < 2 || !labels.iter().all(|l| label_ok(l)) {
                self.problem(
                    format!("{key}[{i}]"),
                    format!(
                        "'{entry}' is neither a host name (auth.example.com) nor a wildcard \
                         (*.example.com)"
                    ),
                );
                continue;
            }
            out.push(entry);
        }
        out
    }

    /// `tracing`: the W3C `tracestate` key, when W3C Trace Context is on. A tenant id must be
    /// a W3C multi-tenant key's tenant part: a lowercase letter or digit, then up to 240 of
    /// `a-z 0-9 _ - * /`.
    fn tracing(&mut self, t: &RawTracing) -> Option<Arc<str>> {
        let tenant = t.w3c_tenant_id.as_deref();
        if let Some(id) = tenant {
            let mut chars = id.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            let rest_ok = chars.all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '*' | '/')
            });
            if !first_ok || !rest_ok || id.len() > 241 {
                self.problem(
                    "tracing.w3c_tenant_id",
                    format!(
                        "'{id}' is not a W3C tracestate tenant: a lowercase letter or digit, \
                         then up to 240 of a-z 0-9 _ - * /"
                    ),
                );
            }
            if !t.w3c {
                self.problem(
                    "tracing.w3c_tenant_id",
                    "has no effect unless tracing.w3c is true",
                );
            }
        }
        t.w3c.then(|| match tenant {
            Some(id) => format!("{id}@portcullis").into(),
            None => "portcullis".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems `check` reports for a config that must be invalid.
    fn problems_of(yaml: &str) -> Vec<String> {
        Config::from_yaml(yaml, Path::new("."), Path::new("t.yaml"))
            .unwrap_err()
            .problems()
    }

    #[test]
    fn nats_tls_needs_its_ca_and_a_whole_client_certificate() {
        let problems = problems_of(
            "nats: {servers: [\"nats://127.0.0.1:4222\"], tls: {cert_chain: c.pem, verify: no}}\n",
        );
        for want in [
            "nats.tls.ca_certs: required: the CA bundle the NATS servers' certificates chain to",
            "nats.tls.private_key: required",
            "nats.tls.verify: unknown key",
        ] {
            assert!(
                problems.contains(&want.to_string()),
                "{want} in {problems:?}"
            );
        }
        let problems = problems_of(
            "nats: {servers: [\"nats://127.0.0.1:4222\"], tls: {ca_certs: /nonexistent/ca.pem}}\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("nats.tls.ca_certs: ") && p.contains("/nonexistent/ca.pem")),
            "{problems:?}"
        );
    }

    #[test]
    fn nats_credentials_leave_the_urls_and_never_reach_a_message() {
        assert_eq!(
            nats_server("nats://router:p%40ss%25@10.0.0.5:4222").unwrap(),
            (
                "nats://10.0.0.5:4222".to_string(),
                Some(NatsAuth::UserPassword {
                    user: "router".into(),
                    password: "p@ss%".into()
                })
            )
        );
        assert_eq!(
            nats_server("tls://10.0.0.6:4224").unwrap(),
            ("tls://10.0.0.6:4224".to_string(), None)
        );
        assert_eq!(
            nats_server("nats://tok3n@[::1]:4222").unwrap(),
            (
                "nats://[::1]:4222".to_string(),
                Some(NatsAuth::Token("tok3n".into()))
            )
        );
        let auth = NatsAuth::UserPassword {
            user: "router".into(),
            password: "secret".into(),
        };
        assert_eq!(format!("{auth:?}"), "user \"router\" with a password");
        let problems: Vec<String> = problems_of(
            "nats: {servers: [\"nats://a:secret1@h1:4222\", \"nats://a:secret2@h2:4222\", \
             \"ftp://a:secret3@h3\", \"nats://a:secret4@\", \"nats://h5:4222\"]}\n",
        )
        .into_iter()
        .filter(|p| p.starts_with("nats."))
        .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("nats.servers[1]: names other credentials"),
            "{problems:?}"
        );
        assert_eq!(
            problems[1],
            "nats.servers[2]: invalid URL 'ftp://***@h3': the scheme is neither nats nor tls, \
             expected nats://HOST:PORT"
        );
        assert!(
            problems[2].starts_with("nats.servers[3]: invalid URL 'nats://***@'"),
            "{problems:?}"
        );
        assert!(
            !problems.iter().any(|p| p.contains("secret")),
            "{problems:?}"
        );
    }

    #[test]
    fn http_rewrite_names_valid_headers_the_http_layer_does_not_own() {
        let problems: Vec<String> = problems_of(
            "http_rewrite:\n  responses:\n    add_headers_if_not_present:\n\
             \x20     - {name: X-Frame-Options}\n\
             \x20     - {name: \"bad name\", value: x}\n\
             \x20     - {name: X-Ok, value: \"a\\nb\"}\n\
             \x20   remove_headers: [{name: Transfer-Encoding}, {value: x}, {name: Server}]\n",
        )
        .into_iter()
        .filter(|p| p.starts_with("http_rewrite"))
        .collect();
        let key = "http_rewrite.responses";
        for want in [
            format!("{key}.add_headers_if_not_present[0].value: required"),
            format!(
                "{key}.add_headers_if_not_present[1].name: 'bad name' is not a valid header name"
            ),
            format!(
                "{key}.add_headers_if_not_present[2].value: not a valid header value (visible \
                 ASCII, spaces and tabs only)"
            ),
            format!(
                "{key}.remove_headers[0].name: 'Transfer-Encoding' is written by the HTTP layer \
                 itself and cannot be rewritten"
            ),
            format!("{key}.remove_headers[1].name: required"),
            format!("{key}.remove_headers[1].value: unknown key"),
        ] {
            assert!(problems.contains(&want), "{want} in {problems:?}");
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
    }

    #[test]
    fn key_paths_use_brackets_for_indices() {
        assert_eq!(format_ignored("domains.0.name"), "domains[0].name");
        assert_eq!(
            format_ignored("routes.12.options.x"),
            "routes[12].options.x"
        );
        assert_eq!(format_ignored("."), "");
    }

    #[test]
    fn limits_workers_defaults_to_one_per_cpu_and_is_bounded() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Limits::default().worker_threads(), cpus);
        let two = Limits {
            workers: 2,
            ..Limits::default()
        };
        assert_eq!(two.worker_threads(), 2);
        let problems = problems_of("limits: {workers: 5000}\n");
        assert!(
            problems.contains(
                &"limits.workers: 5000 is more than 1024; 0 means one per CPU".to_string()
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn max_header_bytes_is_bounded_both_ways() {
        for (bytes, ok) in [
            (4096u64, false),
            (8192, true),
            (16 << 20, true),
            (1 << 32, false),
        ] {
            let problems = section_problems("limits", &format!("max_header_bytes: {bytes}"));
            if ok {
                assert!(problems.is_empty(), "{bytes}: {problems:?}");
            } else {
                assert_eq!(
                    problems,
                    [format!(
                        "limits.max_header_bytes: {bytes} is not in 8192..=16777216"
                    )]
                );
            }
        }
    }

    #[test]
    fn drain_defaults_to_no_wait_and_ten_seconds_and_takes_zero() {
        let d = Drain::default();
        assert_eq!(
            (d.wait, d.timeout),
            (Duration::ZERO, Duration::from_secs(10))
        );
        let problems = problems_of("drain: {wait: 0s, timeout: 0s}\n");
        assert!(
            !problems.iter().any(|p| p.starts_with("drain")),
            "{problems:?}"
        );
        let problems = problems_of("drain: {wait: soon, timeout: -1s, grace: 5s}\n");
        for want in [
            "drain.wait: invalid duration 'soon', expected e.g. '10s' or '2m'",
            "drain.timeout: invalid duration '-1s', expected e.g. '10s' or '2m'",
            "drain.grace: unknown key",
        ] {
            assert!(
                problems.contains(&want.to_string()),
                "{want} in {problems:?}"
            );
        }
    }

    #[test]
    fn request_body_timeout_defaults_below_the_header_timeout_and_takes_zero() {
        let limits = Limits::default();
        assert_eq!(limits.request_body_timeout, Duration::from_secs(30));
        assert!(limits.request_body_timeout < DEFAULT_RESPONSE_HEADER_TIMEOUT);
        assert!(section_problems("limits", "request_body_timeout: 0s").is_empty());
        assert_eq!(
            section_problems("limits", "request_body_timeout: a while"),
            ["limits.request_body_timeout: invalid duration 'a while', expected e.g. '10s' or '2m'"]
        );
    }

    #[test]
    fn linger_timeout_defaults_to_5s_and_takes_zero() {
        assert_eq!(Limits::default().linger_timeout, Duration::from_secs(5));
        assert!(section_problems("limits", "linger_timeout: 0s").is_empty());
        assert_eq!(
            section_problems("limits", "linger_timeout: -1s"),
            ["limits.linger_timeout: invalid duration '-1s', expected e.g. '10s' or '2m'"]
        );
    }

    #[test]
    fn listen_backlog_defaults_to_4096_and_is_bounded() {
        assert_eq!(Limits::default().listen_backlog, 4096);
        for bad in ["0", "65536"] {
            let problems = problems_of(&format!("limits: {{listen_backlog: {bad}}}\n"));
            assert!(
                problems.contains(&format!("limits.listen_backlog: {bad} is not in 1..=65535")),
                "{problems:?}"
            );
        }
        let problems = problems_of("limits: {listen_backlog: 65535}\n");
        assert!(
            !problems
                .iter()
                .any(|p| p.starts_with("limits.listen_backlog")),
            "{problems:?}"
        );
    }

    /// With the gate asked for, a config its maps cannot hold is refused with the sizes named;
    /// without it (no `xdp.interfaces`) the daemon enforces any number itself.
    #[test]
    fn the_gate_capacity_is_checked_when_the_gate_is_configured() {
        use portcullis_common::ALLOW_ENTRIES;
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::Ca::root("identity").unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        // One more distinct prefix than the map holds, split over two domains, with duplicates
        // (the same network written twice counts once).
        let nets = |from: u32, n: u32| -> String {
            (from..from + n)
                .map(|i| format!("\"10.{}.{}.{}/32\"", i >> 16, (i >> 8) & 255, i & 255))
                .collect::<Vec<_>>()
                .join(",")
        };
        let half = ALLOW_ENTRIES / 2;
        let config = |interfaces: &str, ports: &str, extra: u32| {
            format!(
                "domains:\n\
                 - {{name: \"*.a.identity\", ca_certs: ca.pem, allowed_sources: {{cidrs: [{}, \"10.0.0.9\"]}}}}\n\
                 - {{name: \"*.b.identity\", ca_certs: ca.pem, allowed_sources: {{cidrs: [{}]}}}}\n\
                 xdp: {{interfaces: [{interfaces}], ports: [{ports}]}}\n",
                nets(0, half),
                nets(half, half + extra),
            )
        };
        let problems = |yaml: String| {
            Config::from_yaml(&yaml, dir.path(), Path::new("t.yaml"))
                .unwrap_err()
                .problems()
        };
        let seventeen: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let over = problems(config("eth0", &seventeen.join(","), 1));
        for want in [
            "xdp.ports: 17 ports; the XDP gate inspects at most 16".to_string(),
            format!(
                "domains: the allowed_sources lists hold {} prefixes; the XDP gate's ALLOW map holds {ALLOW_ENTRIES}",
                ALLOW_ENTRIES + 1
            ),
        ] {
            assert!(over.contains(&want), "{want} in {over:?}");
        }
        // Load balancers: as many prefixes as BALANCERS holds, the same one twice counting once.
        let balancers = |n: u32, interfaces: &str| {
            format!(
                "listen: {{https: \"127.0.0.1:443\", proxy_protocol: {{from: [{}, \"10.0.0.0/32\"]}}}}\n\
                 domains: [{{name: \"*.a.identity\", ca_certs: ca.pem}}]\n\
                 xdp: {{interfaces: [{interfaces}]}}\n",
                nets(0, n)
            )
        };
        let limit = portcullis_common::BALANCER_ENTRIES;
        let p = problems(balancers(limit + 1, "eth0"));
        let want = format!(
            "listen.proxy_protocol.from: {} prefixes; the XDP gate's BALANCERS map holds {limit}",
            limit + 1
        );
        assert!(p.contains(&want), "{want} in {p:?}");
        for yaml in [balancers(limit, "eth0"), balancers(limit + 1, "")] {
            let p = Config::from_yaml(&yaml, dir.path(), Path::new("t.yaml"))
                .err()
                .map(|e| e.problems())
                .unwrap_or_default();
            assert!(!p.iter().any(|p| p.starts_with("listen")), "{p:?}");
        }
        // At capacity (and 16 ports, one repeated), and without the gate: no such problem.
        let sixteen = format!("{},16", seventeen[..16].join(","));
        for yaml in [
            config("eth0", &sixteen, 0),
            config("", &seventeen.join(","), 1),
        ] {
            let p = problems(yaml);
            assert!(
                !p.iter()
                    .any(|p| p.starts_with("xdp.ports") || p.starts_with("domains")),
                "{p:?}"
            );
        }
    }

    #[test]
    fn h2_streams_per_connection_must_be_positive() {
        let problems = problems_of("backends: {h2_streams_per_connection: 0}\n");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("backends.h2_streams_per_connection: must be at least 1")),
            "{problems:?}"
        );
    }

    #[test]
    fn missing_listen_and_certificates_are_both_reported() {
        let problems = problems_of("admin: {listen: \"127.0.0.1:1\"}\n");
        assert!(
            problems.contains(&"listen.https: required".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("tls.certificates:")),
            "{problems:?}"
        );
    }

    #[test]
    fn admin_tls_problems_name_their_key() {
        let problems = problems_of(
            "admin: {listen: \"127.0.0.1:1\", tls: {private_key: k.pem, client_ca: nope.pem}}\n",
        );
        for want in [
            "admin.tls.cert_chain: required",
            "admin.tls.client_ca: cannot read './nope.pem'",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "{want} in {problems:?}"
            );
        }
        let problems = problems_of("admin: {tls: {cert_chain: c.pem, private_key: k.pem}}\n");
        assert!(
            problems.contains(
                &"admin.listen: required with admin.token_file and admin.tls".to_string()
            ),
            "{problems:?}"
        );
        let problems = problems_of("admin: {listen: \"127.0.0.1:1\", tls: {cert: c.pem}}\n");
        assert!(
            problems.contains(&"admin.tls.cert: unknown key".to_string()),
            "{problems:?}"
        );
        let problems = problems_of("admin: {listen: \"127.0.0.1:1\", max_connections: 0}\n");
        assert!(
            problems.contains(&"admin.max_connections: must be at least 1".to_string()),
            "{problems:?}"
        );
        let problems = problems_of("admin: {listen: \"127.0.0.1:1\", max_connections: -1}\n");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("admin.max_connections: invalid value: integer `-1`")),
            "{problems:?}"
        );
    }

    #[test]
    fn sticky_session_cookie_names_are_checked() {
        let problems = problems_of(
            "backends: {sticky_session_cookies: [JSESSIONID, \"a b\", __VCAP_ID__, \"\"]}\n",
        );
        assert_eq!(
            problems[2..],
            [
                "backends.sticky_session_cookies[1]: 'a b' cannot be a cookie name (letters, digits and !#$%&'*+-.^_`|~ only)",
                "backends.sticky_session_cookies[2]: __VCAP_ID__ is the cookie the gateway sets to keep a session's instance",
                "backends.sticky_session_cookies[3]: '' cannot be a cookie name (letters, digits and !#$%&'*+-.^_`|~ only)",
            ]
        );
    }

    #[test]
    fn tls_versions_and_cipher_suites_are_checked() {
        let problems = |tls: &str| {
            problems_of(&format!(
                "tls: {{certificates: [{{cert_chain: none.pem, private_key: none.key}}], {tls}}}\n"
            ))
            .into_iter()
            .filter(|p| !p.starts_with("listen") && !p.starts_with("tls.certificates"))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            problems("min_version: 1.1"),
            ["tls.min_version: invalid version '1.1', must be one of 1.2, 1.3"]
        );
        assert_eq!(
            problems("min_version: TLSv1.3"),
            ["tls.min_version: invalid version 'TLSv1.3', must be one of 1.2, 1.3"]
        );
        let unknown = problems("cipher_suites: [TLS13_AES_256_GCM_SHA384, RC4-MD5, \"\"]");
        assert_eq!(unknown.len(), 2, "{unknown:?}");
        assert!(unknown[1].starts_with("tls.cipher_suites[2]: unknown cipher suite ''"));
        assert!(
            unknown[0].starts_with(
                "tls.cipher_suites[1]: unknown cipher suite 'RC4-MD5', must be one of TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
            ),
            "{unknown:?}"
        );
        assert_eq!(
            problems("cipher_suites: [TLS13_AES_256_GCM_SHA384]"),
            ["tls.cipher_suites: no suite for TLS 1.2 (TLS_ECDHE_*; or set tls.min_version: 1.3), which the gateway offers"]
        );
        assert_eq!(
            problems(
                "min_version: \"1.3\", cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]"
            ),
            ["tls.cipher_suites: no suite for TLS 1.3 (TLS13_*), which the gateway offers"]
        );
        assert!(problems(
            "min_version: 1.3, cipher_suites: [tls13_aes_256_gcm_sha384, TLS13_AES_256_GCM_SHA384]"
        )
        .is_empty());
    }

    /// The problems `check` reports under `section` for `section: {body}` (the required
    /// sections' own problems left out).
    fn section_problems(section: &str, body: &str) -> Vec<String> {
        problems_of(&format!("{section}: {{{body}}}\n"))
            .into_iter()
            .filter(|p| p.starts_with(section))
            .collect()
    }

    #[test]
    fn w3c_tracing_takes_a_tenant_only_when_on() {
        let problems = |tracing: &str| section_problems("tracing", tracing);
        assert_eq!(
            problems("w3c: true, w3c_tenant_id: Acme"),
            [
                "tracing.w3c_tenant_id: 'Acme' is not a W3C tracestate tenant: a lowercase letter \
              or digit, then up to 240 of a-z 0-9 _ - * /"
            ]
        );
        assert_eq!(
            problems("w3c_tenant_id: acme"),
            ["tracing.w3c_tenant_id: has no effect unless tracing.w3c is true"]
        );
        let not_bool = Config::from_yaml("tracing: {w3c: yes}\n", Path::new("."), Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(not_bool.contains("tracing.w3c: invalid type"), "{not_bool}");
        assert!(problems("w3c: true, w3c_tenant_id: a-1_b*c/d").is_empty());
        assert!(problems("w3c: false").is_empty());
    }

    #[test]
    fn the_trace_key_is_a_secret() {
        let problems = |tracing: &str| section_problems("tracing", tracing);
        assert_eq!(
            problems("trace_key: \"22\""),
            ["tracing.trace_key: has 2 characters; at least 16 are required (e.g. `openssl rand \
              -hex 32`)"]
        );
        assert_eq!(
            problems("trace_key: \"0123456789 abcdef\""),
            ["tracing.trace_key: holds ' '; a token is visible ASCII without spaces"]
        );
        assert!(problems("trace_key: \"0123456789abcdef\"").is_empty());
    }

    #[test]
    fn proxy_protocol_names_its_peers() {
        let problems = |listen: &str| section_problems("listen", listen);
        let https = "https: \"127.0.0.1:443\", ";
        assert_eq!(
            problems(&format!("{https}proxy_protocol: {{from: []}}")),
            [
                "listen.proxy_protocol.from: lists no peer: name the load balancers' addresses \
              (CIDRs), or leave proxy_protocol out"
            ]
        );
        assert_eq!(
            problems(&format!(
                "{https}proxy_protocol: {{from: [10.0.0.0/8, lb1]}}"
            )),
            ["listen.proxy_protocol.from[1]: invalid CIDR 'lb1'"]
        );
        assert_eq!(
            problems(&format!(
                "{https}proxy_protocol: {{from: [10.0.0.1], v2: true}}"
            )),
            ["listen.proxy_protocol.v2: unknown key"]
        );
        let yaml =
            "listen: {https: \"127.0.0.1:443\", proxy_protocol: {from: [10.0.0.0/24, \"::1\"]}}\n";
        let problems = problems_of(yaml);
        assert!(
            !problems.iter().any(|p| p.starts_with("listen")),
            "{problems:?}"
        );
    }

    #[test]
    fn az_preference_needs_the_gateways_zone() {
        let problems = |backends: &str| section_problems("backends", backends);
        assert_eq!(
            problems("az_preference: local"),
            ["backends.az_preference: invalid preference 'local', must be one of none, locally-optimistic"]
        );
        assert_eq!(
            problems("az_preference: locally-optimistic, availability_zone: \" \""),
            ["backends.availability_zone: az_preference locally-optimistic needs the gateway's own availability zone"]
        );
        assert!(problems("az_preference: locally-optimistic, availability_zone: z1").is_empty());
        assert!(problems("availability_zone: z1").is_empty());
    }

    #[test]
    fn max_attempts_is_at_least_one() {
        assert_eq!(
            section_problems("backends", "max_attempts: 0"),
            ["backends.max_attempts: must be at least 1 (the endpoints one request may try)"]
        );
        assert!(section_problems("backends", "max_attempts: 5").is_empty());
    }

    #[test]
    fn access_log_headers_and_redaction_are_checked() {
        let problems = |access_log: &str| section_problems("access_log", access_log);
        assert!(problems(
            "headers: [X-Tenant-Id, traceparent], redact_query_parameters: hash, \
             redact_source_ip: true, redact_forwarded_for: true"
        )
        .is_empty());
        assert_eq!(
            problems("redact_query_parameters: some"),
            ["access_log.redact_query_parameters: invalid value 'some', must be one of none, all, hash"]
        );
        assert_eq!(
            problems("headers: [X-Tenant-Id, \"bad name\", x-tenant-id, X-Forwarded-For, TLS-SNI]"),
            [
                "access_log.headers[1]: 'bad name' is not a header name",
                "access_log.headers[2]: 'x-tenant-id' is listed twice",
                "access_log.headers[3]: 'X-Forwarded-For' would be logged as x_forwarded_for, a field the line already has",
                "access_log.headers[4]: 'TLS-SNI' would be logged as tls_sni, a field the line already has",
            ]
        );
        let not_bool = problems_of("access_log: {redact_source_ip: sometimes}\n");
        assert!(
            not_bool.iter().any(|p| p.contains("redact_source_ip")),
            "{not_bool:?}"
        );
    }

    #[test]
    fn the_default_balancing_algorithm_is_gorouters_choice() {
        let problems = |backends: &str| section_problems("backends", backends);
        assert!(
            problems("response_body_timeout: 0s").is_empty(),
            "0s: no limit"
        );
        assert!(
            problems("keep_alive_probe_interval: 0s").is_empty(),
            "0s: off"
        );
        assert!(problems("keep_alive_probe_interval: 30s").is_empty());
        assert_eq!(
            problems("keep_alive_probe_interval: 1500ms"),
            ["backends.keep_alive_probe_interval: must be whole seconds: the kernel times TCP keepalive probes in seconds"]
        );
        assert_eq!(
            problems("keep_alive_probe_interval: 10h"),
            ["backends.keep_alive_probe_interval: must be at most 32767s (the kernel's limit)"]
        );
        let body = problems("response_body_timeout: long");
        assert!(
            body.len() == 1 && body[0].starts_with("backends.response_body_timeout: "),
            "{body:?}"
        );
        assert_eq!(
            problems("balancing_algorithm: hash"),
            ["backends.balancing_algorithm: invalid algorithm 'hash', must be one of round-robin, least-connection"]
        );
        assert!(problems("balancing_algorithm: least-connection").is_empty());
    }

    #[test]
    fn sharding_follows_gorouter_and_is_checked() {
        let problems = |registry: &str| section_problems("registry", registry);
        let delay = problems("start_delay: soon");
        assert!(
            delay.len() == 1 && delay[0].starts_with("registry.start_delay: "),
            "{delay:?}"
        );
        assert!(
            problems("start_delay: 0s").is_empty(),
            "0s: healthy once connected"
        );
        assert_eq!(
            problems("routing_table_sharding_mode: some"),
            ["registry.routing_table_sharding_mode: invalid mode 'some', must be one of all, segments, shared-and-segments"]
        );
        assert_eq!(
            problems("routing_table_sharding_mode: segments"),
            ["registry.isolation_segments: routing_table_sharding_mode segments needs at least one isolation segment, or no route is served"]
        );
        assert_eq!(
            problems("isolation_segments: [a]"),
            ["registry.isolation_segments: has no effect with routing_table_sharding_mode all (the default): set segments or shared-and-segments"]
        );
        assert_eq!(
            problems("routing_table_sharding_mode: shared-and-segments, isolation_segments: [a, \" \"]"),
            ["registry.isolation_segments[1]: an isolation segment needs a name (registrations without one are the shared segment: use shared-and-segments)"]
        );
        assert!(problems("routing_table_sharding_mode: shared-and-segments").is_empty());
        let seg = Sharding::Segments(vec!["a".into()]);
        let shared = Sharding::SharedAndSegments(vec!["a".into()]);
        for (segment, all, only, and_shared) in [
            (None, true, false, true),
            (Some(""), true, false, true),
            (Some("a"), true, true, true),
            (Some("b"), true, false, false),
            (Some("A"), true, false, false),
        ] {
            assert_eq!(Sharding::All.serves(segment), all);
            assert_eq!(seg.serves(segment), only, "{segment:?}");
            assert_eq!(shared.serves(segment), and_shared, "{segment:?}");
        }
    }

    #[test]
    fn x_forwarded_proto_is_one_of_its_modes() {
        let problems = problems_of("x_forwarded_proto: sanitize\n");
        assert!(
            problems.contains(
                &"x_forwarded_proto: invalid mode 'sanitize', must be one of connection, https, client"
                    .to_string()
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn the_hairpinning_allowlist_takes_names_and_one_label_wildcards() {
        let problems = |body: &str| section_problems("route_services", body);
        assert_eq!(
            problems(
                "secret: s, hairpinning_allowlist: [\"*.Apps.Internal\", rs.example.com, \
                 \"rs.*.example.com\", \"*.*.example.com\", localhost, \"*.com.\", \"a b.com\"]"
            ),
            [
                "route_services.hairpinning_allowlist[2]: 'rs.*.example.com' is neither a host name (auth.example.com) nor a wildcard (*.example.com)",
                "route_services.hairpinning_allowlist[3]: '*.*.example.com' is neither a host name (auth.example.com) nor a wildcard (*.example.com)",
                "route_services.hairpinning_allowlist[4]: 'localhost' is neither a host name (auth.example.com) nor a wildcard (*.example.com)",
                "route_services.hairpinning_allowlist[5]: '*.com.' is neither a host name (auth.example.com) nor a wildcard (*.example.com)",
                "route_services.hairpinning_allowlist[6]: 'a b.com' is neither a host name (auth.example.com) nor a wildcard (*.example.com)",
            ]
        );
        assert_eq!(
            problems("secret: s, hairpinning: false, hairpinning_allowlist: [a.example.com]"),
            ["route_services.hairpinning_allowlist: has no effect unless route_services.hairpinning is true"]
        );
        assert!(problems("secret: s, hairpinning: false, hairpinning_allowlist: []").is_empty());
    }

    #[test]
    fn route_services_new_has_the_defaults_of_a_section_with_only_its_secret() {
        let mut v = Validator {
            base: Path::new("."),
            problems: Vec::new(),
            validity: Vec::new(),
        };
        let from_file = v.route_services(&RawRouteServices {
            secret: Some("s3".into()),
            ..Default::default()
        });
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(from_file.secret, "s3");
        assert_eq!(
            format!("{from_file:?}"),
            format!("{:?}", RouteServices::new("s3"))
        );
    }

    #[test]
    fn route_services_need_a_secret_and_take_bound_static_routes() {
        let problems = problems_of(
            "route_services: {secret_decrypt_only: \"\", timeout: soon, ca_certs: /nonexistent/rs.pem, hairpins: yes}\n\
             routes:\n\
             - {uris: [a.apps.plain], host: 127.0.0.1, port: 9001, route_service_url: \"https://rs.example/\"}\n",
        );
        let ours: Vec<_> = problems
            .iter()
            .filter(|p| p.starts_with("route"))
            .map(String::as_str)
            .collect();
        assert_eq!(ours.len(), 5, "{ours:#?}");
        for want in [
            "route_services.hairpins: unknown key",
            "route_services.secret: required: the key route service requests are signed with (GoRouter's route_services_secret)",
            "route_services.secret_decrypt_only: empty",
        ] {
            assert!(ours.contains(&want), "{want}: {ours:#?}");
        }
        assert!(ours
            .iter()
            .any(|p| p.starts_with("route_services.timeout: ")));
        assert!(ours.iter().any(
            |p| p.starts_with("route_services.ca_certs: ") && p.contains("/nonexistent/rs.pem")
        ));
        // The secret is never printed.
        let rs = RouteServices {
            secret_decrypt_only: Some("hunter1".into()),
            ..RouteServices::new("hunter2")
        };
        let text = format!("{rs:?}");
        assert!(!text.contains("hunter"), "{text}");
    }

    #[test]
    fn a_static_route_cannot_be_bound_to_a_route_service() {
        let problems = problems_of(
            "routes:\n\
             - {uris: [a.apps.plain], host: 127.0.0.1, port: 9001, route_service_url: \"https://rs.example/\"}\n\
             - {uris: [b.apps.plain], host: 127.0.0.1, port: 9002, route_service_url: \"http://rs.example/\"}\n\
             - {uris: [c.apps.plain], host: 127.0.0.1, port: 9003, route_service_url: \"\"}\n",
        );
        assert_eq!(
            problems[2..],
            [
                "routes[0].route_service_url: the route is bound to a route service, but route_services is not configured: its requests would all be answered 502; configure route_services or remove it",
                "routes[1]: route_service_url 'http://rs.example/' is not an https:// URL",
            ]
        );
    }

    #[test]
    fn a_static_route_option_that_cannot_be_used_is_refused_by_name() {
        let problems = problems_of(
            "routes:\n\
             - {uris: [a.apps.plain], host: 127.0.0.1, port: 9001, options: {loadbalancing: hash, hash_header: X-Tenant, hash_balance: 1.25}}\n\
             - {uris: [b.apps.plain], host: 127.0.0.1, port: 9002, options: {loadbalancing: weighted}}\n\
             - {uris: [c.apps.plain], host: 127.0.0.1, port: 9003, options: {loadbalancing: hash, hash_balance: -2}}\n",
        );
        let routes: Vec<&String> = problems
            .iter()
            .filter(|p| p.starts_with("routes"))
            .collect();
        assert_eq!(
            routes,
            [
                "routes[1].options.loadbalancing: invalid loadbalancing 'weighted', must be one of round-robin, least-connection, hash: the route is balanced by backends.balancing_algorithm",
                "routes[2].options.hash_header: loadbalancing is hash but hash_header is missing: the route is balanced by backends.balancing_algorithm",
                "routes[2].options.hash_balance: invalid hash_balance '-2', must be a number of at least 0 (0: no limit): no limit is applied",
            ]
        );
    }

    #[test]
    fn admin_token_problems_name_their_key() {
        let problems = problems_of("admin: {token_file: no-such-token}\n");
        for want in [
            "admin.token_file: cannot read './no-such-token'",
            "admin.listen: required with admin.token_file",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "{want} in {problems:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "short\n").unwrap();
        let problems = Config::from_yaml(
            "admin: {listen: \"127.0.0.1:1\", token_file: t}\n",
            dir.path(),
            Path::new("t.yaml"),
        )
        .unwrap_err()
        .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("admin.token_file: the token in")
                    && p.contains("has 5 characters")),
            "{problems:?}"
        );
    }
}
