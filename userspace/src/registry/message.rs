//! GoRouter's registration message (`router.register` / `router.unregister`, SPEC §10), also the
//! shape of static `routes` in the config file.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::authz::RoutePolicy;
use crate::names::normalize_host;

/// A registration as it arrives on the wire or in the config, before validation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Registration {
    #[serde(default)]
    pub uris: Vec<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls_port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub private_instance_id: Option<String>,
    #[serde(default, deserialize_with = "string_or_number")]
    pub private_instance_index: Option<String>,
    #[serde(default)]
    pub server_cert_domain_san: Option<String>,
    #[serde(default)]
    pub route_service_url: Option<String>,
    #[serde(default)]
    pub isolation_segment: Option<String>,
    #[serde(default)]
    pub stale_threshold_in_seconds: Option<u64>,
    #[serde(default)]
    pub endpoint_updated_at_ns: Option<i64>,
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Route options. Cloud Controller sends every value as a string (`"hash_balance":"1.25"`);
    /// numbers and booleans are taken too, as their text, so that a number where a string was
    /// expected does not lose the route (GoRouter lost such routes once: routing-release#585).
    #[serde(default, deserialize_with = "option_values")]
    pub options: BTreeMap<String, String>,
}

/// The `options` map: string values, with numbers and booleans as their text; `null` as absent.
fn option_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    let raw = Option::<BTreeMap<String, Option<Value>>>::deserialize(d)?.unwrap_or_default();
    Ok(raw
        .into_iter()
        .filter_map(|(k, v)| {
            let v = match v? {
                Value::S(s) => s,
                Value::I(n) => n.to_string(),
                Value::U(n) => n.to_string(),
                Value::F(f) => f.to_string(),
                Value::B(b) => b.to_string(),
            };
            Some((k, v))
        })
        .collect())
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        N(i64),
    }
    Ok(Option::<Raw>::deserialize(d)?.map(|r| match r {
        Raw::S(s) => s,
        Raw::N(n) => n.to_string(),
    }))
}

/// Why a registration was refused; the label is the metric's `result` value.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    #[error("missing host")]
    MissingHost,
    #[error("missing port (neither port nor tls_port)")]
    MissingPort,
    #[error("missing uris")]
    MissingUris,
    #[error("invalid uri '{0}'")]
    BadUri(String),
    #[error("route_service_url '{0}' is not an https:// URL")]
    RouteServiceNotHttps(String),
    #[error("tls_port without server_cert_domain_san")]
    TlsWithoutSan,
    #[error("invalid protocol '{0}', must be one of http1, http2")]
    BadProtocol(String),
}

/// A route option that could not be used. The route is registered all the same (as GoRouter
/// does), balanced by `backends.balancing_algorithm` where the option asked for something
/// else; the problem is
/// counted (`portcullis_registry_option_problems_total{option}`), logged when the route's
/// options change, and refused by `check` in static routes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionProblem {
    #[error("invalid loadbalancing '{0}', must be one of round-robin, least-connection, hash: the route is balanced by backends.balancing_algorithm")]
    LoadBalancing(String),
    #[error("loadbalancing is hash but hash_header is missing: the route is balanced by backends.balancing_algorithm")]
    NoHashHeader,
    #[error(
        "invalid hash_header '{0}', not an HTTP header name: the route is balanced by backends.balancing_algorithm"
    )]
    HashHeader(String),
    #[error("invalid hash_balance '{0}', must be a number of at least 0 (0: no limit): no limit is applied")]
    HashBalance(String),
}

impl OptionProblem {
    /// The option at fault: the metric's `option` label.
    pub fn option(&self) -> &'static str {
        match self {
            OptionProblem::LoadBalancing(_) => "loadbalancing",
            OptionProblem::NoHashHeader | OptionProblem::HashHeader(_) => "hash_header",
            OptionProblem::HashBalance(_) => "hash_balance",
        }
    }
}

impl RegistrationError {
    /// The `result` label of `portcullis_registry_messages_total`.
    pub fn label(&self) -> &'static str {
        match self {
            RegistrationError::MissingHost => "missing_host",
            RegistrationError::MissingPort => "missing_port",
            RegistrationError::MissingUris => "missing_uris",
            RegistrationError::BadUri(_) => "bad_uri",
            RegistrationError::RouteServiceNotHttps(_) => "route_service_not_https",
            RegistrationError::TlsWithoutSan => "tls_without_san",
            RegistrationError::BadProtocol(_) => "bad_protocol",
        }
    }
}

/// A route key: normalised host plus a path prefix, lowercased (ASCII) and without trailing `/`
/// (empty for the root).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub host: String,
    pub path: String,
}

impl RouteKey {
    /// Parses a route URI such as `app.apps.identity/v1/?x=1`.
    pub fn parse(uri: &str) -> Option<Self> {
        let uri = uri.trim();
        let uri = uri.split_once('?').map_or(uri, |(u, _)| u);
        let (host, path) = match uri.find('/') {
            Some(i) => (&uri[..i], &uri[i..]),
            None => (uri, ""),
        };
        let host = normalize_host(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':') {
            return None;
        }
        Some(RouteKey {
            host,
            // Lowercase, as GoRouter keys routes: requests match them in any case.
            path: path.trim_end_matches('/').to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.host, self.path)
    }
}

/// How a pool picks among its endpoints (for requests without a hash key, see [`HashOptions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    LeastConnection,
}

impl LoadBalancing {
    /// Each algorithm with its name in `loadbalancing` and `backends.balancing_algorithm`.
    pub const ALL: [(&'static str, LoadBalancing); 2] = [
        ("round-robin", LoadBalancing::RoundRobin),
        ("least-connection", LoadBalancing::LeastConnection),
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoadBalancing::RoundRobin => "round-robin",
            LoadBalancing::LeastConnection => "least-connection",
        }
    }
}

/// GoRouter's hash-based routing (`loadbalancing: hash`, Cloud Foundry RFC 0042): requests with
/// the same value of `header` go to the same instance; those without the header are balanced
/// round-robin.
#[derive(Clone, Debug, PartialEq)]
pub struct HashOptions {
    /// `hash_header`.
    pub header: http::HeaderName,
    /// `hash_balance`: an instance with more than this many times the route's average requests
    /// in flight is passed over for the next one in the table; 0 sets no limit.
    pub balance: f64,
}

/// The backend protocol of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http1,
    Http2,
}

/// A registration that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRegistration {
    pub keys: Vec<RouteKey>,
    pub host: String,
    pub port: u16,
    /// The SAN the backend certificate must carry, when the endpoint is reached over TLS.
    pub tls_san: Option<String>,
    pub protocol: Protocol,
    /// `loadbalancing` when it names round-robin or least-connection; otherwise the gateway's
    /// `backends.balancing_algorithm` applies.
    pub load_balancing: Option<LoadBalancing>,
    /// Set when the route asks for hash-based routing with a usable `hash_header`.
    pub hash: Option<HashOptions>,
    /// Options that could not be used (the route is registered without them).
    pub option_problems: Vec<OptionProblem>,
    pub policy: RoutePolicy,
    /// `route_service_url`, when it is set (an `https://` URL).
    pub route_service: Option<std::sync::Arc<str>>,
    pub raw: Registration,
}

impl ValidRegistration {
    /// The canonical endpoint address, `host:port`, that identifies an endpoint within a pool.
    pub fn addr(&self) -> String {
        endpoint_addr(&self.host, self.port)
    }
}

/// `host:port`, with an IPv6 host in brackets: how an endpoint is addressed and identified.
pub fn endpoint_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl TryFrom<Registration> for ValidRegistration {
    type Error = RegistrationError;

    fn try_from(raw: Registration) -> Result<Self, Self::Error> {
        let host = raw
            .host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .ok_or(RegistrationError::MissingHost)?
            .to_string();
        let (port, tls_san) = match (raw.tls_port, raw.port) {
            (Some(tls), _) if tls != 0 => {
                let san = raw
                    .server_cert_domain_san
                    .clone()
                    .filter(|s| !s.is_empty())
                    .ok_or(RegistrationError::TlsWithoutSan)?;
                (tls, Some(san))
            }
            (_, Some(p)) if p != 0 => (p, None),
            _ => return Err(RegistrationError::MissingPort),
        };
        if raw.uris.is_empty() {
            return Err(RegistrationError::MissingUris);
        }
        let keys = raw
            .uris
            .iter()
            .map(|u| RouteKey::parse(u).ok_or_else(|| RegistrationError::BadUri(u.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let route_service = match raw.route_service_url.as_deref().filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                let https = url.starts_with("https://")
                    && url
                        .parse::<http::Uri>()
                        .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
                if !https {
                    return Err(RegistrationError::RouteServiceNotHttps(url.to_string()));
                }
                Some(url.into())
            }
        };
        let protocol = match raw.protocol.as_deref() {
            None | Some("") | Some("http1") => Protocol::Http1,
            Some("http2") => Protocol::Http2,
            Some(other) => return Err(RegistrationError::BadProtocol(other.to_string())),
        };
        let (load_balancing, hash, option_problems) = balancing_options(&raw.options);
        let policy = RoutePolicy::from_options(
            raw.options.get("route_policy_scope").map(String::as_str),
            raw.options.get("route_policy_sources").map(String::as_str),
        );
        Ok(ValidRegistration {
            keys,
            host,
            port,
            tls_san,
            protocol,
            load_balancing,
            hash,
            option_problems,
            policy,
            route_service,
            raw,
        })
    }
}

/// `loadbalancing`, `hash_header` and `hash_balance`, as GoRouter reads them: an algorithm it
/// does not know, or hash-based routing without a header, leaves the route balanced by the
/// gateway's default algorithm rather than unregistered; `hash_header` and `hash_balance` mean
/// nothing for the other algorithms (Cloud Controller refuses them there) and are ignored.
fn balancing_options(
    options: &BTreeMap<String, String>,
) -> (
    Option<LoadBalancing>,
    Option<HashOptions>,
    Vec<OptionProblem>,
) {
    let mut problems = Vec::new();
    let get = |k: &str| options.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let lb = match get("loadbalancing") {
        None => None,
        Some(name) if let Some((_, lb)) = LoadBalancing::ALL.iter().find(|(n, _)| *n == name) => {
            Some(*lb)
        }
        Some("hash") => {
            let header = match get("hash_header") {
                None => Err(OptionProblem::NoHashHeader),
                Some(h) => http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| OptionProblem::HashHeader(h.to_string())),
            };
            let balance = match get("hash_balance") {
                None => 0.0,
                Some(b) => match b.parse::<f64>() {
                    Ok(f) if f.is_finite() && f >= 0.0 => f,
                    _ => {
                        problems.push(OptionProblem::HashBalance(b.to_string()));
                        0.0
                    }
                },
            };
            return match header {
                Ok(header) => (None, Some(HashOptions { header, balance }), problems),
                Err(p) => {
                    problems.insert(0, p);
                    (None, None, problems)
                }
            };
        }
        Some(other) => {
            problems.push(OptionProblem::LoadBalancing(other.to_string()));
            None
        }
    };
    (lb, None, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_normalise() {
        let k = RouteKey::parse("App.Apps.Identity./V1/?x=1").unwrap();
        assert_eq!(
            (k.host.as_str(), k.path.as_str()),
            ("app.apps.identity", "/v1")
        );
        assert_eq!(RouteKey::parse("app.apps.identity/v1"), Some(k));
        assert_eq!(RouteKey::parse("a.b/").unwrap().path, "");
        assert!(RouteKey::parse("").is_none());
        assert!(RouteKey::parse("a b").is_none());
    }

    /// A registration for `a.x` with these options, as JSON values.
    fn with_options(options: &str) -> ValidRegistration {
        let raw: Registration = serde_json::from_str(&format!(
            r#"{{"uris":["a.x"],"host":"10.0.0.1","port":8080,"options":{options}}}"#
        ))
        .unwrap();
        ValidRegistration::try_from(raw).unwrap()
    }

    #[test]
    fn hash_based_routing_options_as_cloud_controller_sends_them() {
        // Cloud Controller's wire format: every value a string.
        let v = with_options(
            r#"{"loadbalancing":"hash","hash_header":"Tenant-ID","hash_balance":"1.25"}"#,
        );
        let h = v.hash.unwrap();
        assert_eq!((h.header.as_str(), h.balance), ("tenant-id", 1.25));
        assert!(v.option_problems.is_empty());
        assert_eq!(v.raw.options["hash_balance"], "1.25");
        // A number, as a GoRouter release once expected, is taken as well; no balance is 0.
        let v = with_options(r#"{"loadbalancing":"hash","hash_header":"x-t","hash_balance":2}"#);
        assert_eq!(v.hash.unwrap().balance, 2.0);
        assert_eq!(v.raw.options["hash_balance"], "2");
        let v = with_options(r#"{"loadbalancing":"hash","hash_header":"x-t","hash_balance":null}"#);
        assert_eq!(v.hash.unwrap().balance, 0.0);
        // Other scalars are text; the route is kept whatever the values.
        let v = with_options(r#"{"route_policy_scope":"any","x":true,"y":1.5,"z":-3}"#);
        assert_eq!(
            (
                v.raw.options["x"].as_str(),
                v.raw.options["y"].as_str(),
                v.raw.options["z"].as_str()
            ),
            ("true", "1.5", "-3")
        );
        assert!(
            serde_json::from_str::<Registration>(
                r#"{"uris":["a.x"],"options":{"loadbalancing":["hash"]}}"#
            )
            .is_err(),
            "a list is not an option value"
        );
    }

    #[test]
    fn unusable_balancing_options_keep_the_route_and_say_why() {
        // Options; the header and balance hashing uses, if any; the options at fault.
        type Case<'a> = (&'a str, Option<(&'a str, f64)>, &'a [&'a str]);
        let cases: [Case; 8] = [
            (r#"{"loadbalancing":"least-connection"}"#, None, &[]),
            (
                r#"{"loadbalancing":"hash","hash_header":"x-t"}"#,
                Some(("x-t", 0.0)),
                &[],
            ),
            (r#"{"loadbalancing":"weighted"}"#, None, &["loadbalancing"]),
            (r#"{"loadbalancing":"hash"}"#, None, &["hash_header"]),
            (
                r#"{"loadbalancing":"hash","hash_header":"bad header"}"#,
                None,
                &["hash_header"],
            ),
            (
                r#"{"loadbalancing":"hash","hash_header":"x-t","hash_balance":"lots"}"#,
                Some(("x-t", 0.0)),
                &["hash_balance"],
            ),
            (
                r#"{"loadbalancing":"hash","hash_balance":"-1"}"#,
                None,
                &["hash_header", "hash_balance"],
            ),
            // Meaningless without hash (Cloud Controller refuses it): ignored.
            (
                r#"{"loadbalancing":"round-robin","hash_header":"x-t","hash_balance":"NaN"}"#,
                None,
                &[],
            ),
        ];
        for (options, hash, problems) in cases {
            let v = with_options(options);
            assert_eq!(
                v.hash.as_ref().map(|h| (h.header.as_str(), h.balance)),
                hash,
                "{options}"
            );
            let got: Vec<&str> = v.option_problems.iter().map(|p| p.option()).collect();
            assert_eq!(got, problems, "{options}");
            let lc = options.contains("least-connection");
            assert_eq!(v.load_balancing == Some(LoadBalancing::LeastConnection), lc);
        }
        assert_eq!(
            with_options(r#"{"loadbalancing":"weighted"}"#).option_problems[0].to_string(),
            "invalid loadbalancing 'weighted', must be one of round-robin, least-connection, hash: the route is balanced by backends.balancing_algorithm"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let ok: Registration = serde_json::from_str(
            r#"{"uris":["a.apps.identity"],"host":"10.0.0.1","port":8080,"private_instance_index":0,
                "tags":{"app_id":"A"},"options":{"route_policy_scope":"any"}}"#,
        )
        .unwrap();
        let v = ValidRegistration::try_from(ok.clone()).unwrap();
        assert_eq!(v.addr(), "10.0.0.1:8080");
        assert!(v.policy.is_enforcing());
        let mut bad = ok.clone();
        bad.host = None;
        assert_eq!(
            ValidRegistration::try_from(bad).unwrap_err(),
            RegistrationError::MissingHost
        );
        let mut bad = ok.clone();
        bad.route_service_url = Some("http://rs".into());
        assert_eq!(
            ValidRegistration::try_from(bad).unwrap_err().label(),
            "route_service_not_https"
        );
        for url in [
            "https://",
            "https://rs example/",
            "https:///x",
            "rs.example",
        ] {
            let mut bad = ok.clone();
            bad.route_service_url = Some(url.into());
            assert_eq!(
                ValidRegistration::try_from(bad).unwrap_err(),
                RegistrationError::RouteServiceNotHttps(url.into())
            );
        }
        let mut bound = ok.clone();
        bound.route_service_url = Some("https://rs.example.com/auth?x=1".into());
        assert_eq!(
            ValidRegistration::try_from(bound)
                .unwrap()
                .route_service
                .as_deref(),
            Some("https://rs.example.com/auth?x=1")
        );
        let mut unbound = ok.clone();
        unbound.route_service_url = Some(String::new());
        assert!(ValidRegistration::try_from(unbound)
            .unwrap()
            .route_service
            .is_none());
        let mut bad = ok;
        bad.tls_port = Some(443);
        assert_eq!(
            ValidRegistration::try_from(bad).unwrap_err(),
            RegistrationError::TlsWithoutSan
        );
    }
}
