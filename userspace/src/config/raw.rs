//! The config file as written: every scalar that needs checking is kept as a string here so that
//! validation can report all problems at once, each with its key path.

use serde::Deserialize;

use crate::registry::Registration;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub listen: Option<RawListen>,
    pub admin: Option<RawAdmin>,
    pub tls: RawTls,
    pub forwarded_client_cert: Option<String>,
    pub x_forwarded_proto: Option<String>,
    pub domains: Vec<RawDomain>,
    pub authorization: RawAuthorization,
    pub backends: RawBackends,
    pub registry: RawRegistry,
    pub nats: Option<RawNats>,
    pub routes: Vec<Registration>,
    pub access_log: RawAccessLog,
    pub xdp: RawXdp,
    pub limits: RawLimits,
    pub drain: RawDrain,
    pub tracing: RawTracing,
    pub http_rewrite: RawHttpRewrite,
    pub route_services: Option<RawRouteServices>,
    pub html_error_template_file: Option<String>,
}

/// GoRouter's `route_services_*` settings.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRouteServices {
    pub secret: Option<String>,
    pub secret_decrypt_only: Option<String>,
    pub timeout: Option<String>,
    pub recommend_https: Option<bool>,
    pub hairpinning: Option<bool>,
    pub hairpinning_allowlist: Option<Vec<String>>,
    pub strict_signature_validation: bool,
    pub ca_certs: Option<String>,
}

/// GoRouter's `http_rewrite`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHttpRewrite {
    pub responses: RawResponseRewrite,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawResponseRewrite {
    pub add_headers_if_not_present: Vec<RawHeaderValue>,
    pub remove_headers: Vec<RawHeaderName>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHeaderValue {
    pub name: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHeaderName {
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawListen {
    pub https: Option<String>,
    pub http: Option<String>,
    pub proxy_protocol: Option<RawProxyProtocol>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawProxyProtocol {
    pub from: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_file: Option<String>,
    pub tls: Option<RawAdminTls>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdminTls {
    pub cert_chain: Option<String>,
    pub private_key: Option<String>,
    pub client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTls {
    pub certificates: Vec<RawCertificate>,
    pub handshake_timeout: Option<String>,
    pub ktls: Option<String>,
    /// `1.2` or `1.3`, as a YAML number or a string.
    pub min_version: Option<serde_norway::Value>,
    pub cipher_suites: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawCertificate {
    pub cert_chain: Option<String>,
    pub private_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDomain {
    pub name: Option<String>,
    pub ca_certs: Option<String>,
    pub forwarded_client_cert: Option<String>,
    pub xfcc_format: Option<String>,
    pub allowed_sources: Option<RawAllowedSources>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAllowedSources {
    pub cidrs: Vec<String>,
    pub registry_hosts: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAuthorization {
    pub endpoint_selection: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBackends {
    pub ca_certs: Option<String>,
    pub cert_chain: Option<String>,
    pub private_key: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_header_timeout: Option<String>,
    pub response_body_timeout: Option<String>,
    pub keep_alive_probe_interval: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_idle_per_endpoint: Option<usize>,
    pub h2_streams_per_connection: Option<usize>,
    pub failure_cooldown: Option<String>,
    pub sticky_session_cookies: Option<Vec<String>>,
    pub secure_cookies: bool,
    pub max_conns: Option<usize>,
    pub availability_zone: Option<String>,
    pub az_preference: Option<String>,
    pub balancing_algorithm: Option<String>,
    pub max_attempts: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRegistry {
    pub droplet_stale_threshold: Option<String>,
    pub prune_interval: Option<String>,
    pub start_delay: Option<String>,
    pub healthy_while_disconnected: Option<bool>,
    pub routing_table_sharding_mode: Option<String>,
    pub isolation_segments: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawNats {
    pub servers: Vec<String>,
    pub share_denials: Option<bool>,
    pub tls: Option<RawNatsTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawNatsTls {
    pub ca_certs: Option<String>,
    pub cert_chain: Option<String>,
    pub private_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAccessLog {
    pub path: Option<String>,
    pub extra_fields: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    pub redact_query_parameters: Option<String>,
    pub redact_source_ip: Option<bool>,
    pub redact_forwarded_for: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawXdp {
    pub interfaces: Vec<String>,
    pub mode: Option<String>,
    pub ports: Option<Vec<u16>>,
    pub reject: Option<String>,
    pub pin_path: Option<String>,
    pub detach_on_exit: bool,
    pub deny_learning: RawDenyLearning,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDenyLearning {
    pub enabled: Option<bool>,
    pub threshold: Option<u32>,
    pub window: Option<String>,
    pub ttl: Option<String>,
    pub max_ttl: Option<String>,
    pub exempt: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub linger_timeout: Option<String>,
    pub h2_max_concurrent_streams: Option<u32>,
    pub workers: Option<usize>,
    pub listen_backlog: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTracing {
    pub w3c: bool,
    pub w3c_tenant_id: Option<String>,
    pub trace_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDrain {
    pub wait: Option<String>,
    pub timeout: Option<String>,
}
