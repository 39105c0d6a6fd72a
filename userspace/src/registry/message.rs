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
    #[serde(default)]
    pub options: BTreeMap<String, String>,
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
    #[error("invalid loadbalancing '{0}', must be one of round-robin, least-connection")]
    BadLoadBalancing(String),
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
            RegistrationError::BadLoadBalancing(_) => "bad_loadbalancing",
        }
    }
}

/// A route key: normalised host plus a path prefix without trailing `/` (empty for the root).
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
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.host, self.path)
    }
}

/// How a pool picks among its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    LeastConnection,
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
    pub load_balancing: LoadBalancing,
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
        let load_balancing = match raw.options.get("loadbalancing").map(String::as_str) {
            None | Some("") | Some("round-robin") => LoadBalancing::RoundRobin,
            Some("least-connection") => LoadBalancing::LeastConnection,
            Some(other) => return Err(RegistrationError::BadLoadBalancing(other.to_string())),
        };
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
            policy,
            route_service,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_normalise() {
        let k = RouteKey::parse("App.Apps.Identity./v1/?x=1").unwrap();
        assert_eq!(
            (k.host.as_str(), k.path.as_str()),
            ("app.apps.identity", "/v1")
        );
        assert_eq!(RouteKey::parse("a.b/").unwrap().path, "");
        assert!(RouteKey::parse("").is_none());
        assert!(RouteKey::parse("a b").is_none());
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
