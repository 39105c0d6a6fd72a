//! Prometheus metrics (SPEC §12). Names and labels here are relied on by users' dashboards.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::authz::Rule;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The status code, written as its digits.
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: &'static str,
    pub rule: Rule,
}

impl EncodeLabelValue for Rule {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub domain: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyHeaderLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KtlsLabels {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub subject: String,
    pub result: &'static str,
}

/// A route option that could not be used: `loadbalancing`, `hash_header` or `hash_balance`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OptionLabels {
    pub option: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdpVerdictLabels {
    pub domain: String,
    pub verdict: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdpAttachLabels {
    pub interface: String,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// The backend connection's: `http1` or `http2`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker event loop's index, as in its thread's name (`portcullis-w<worker>`).
    pub worker: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The status code's class: `2xx`, `4xx`, …
    pub class: &'static str,
}

/// Upper bounds of the latency histograms' buckets, in seconds: 0.5 ms to a minute.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// The config key and the certificate's place in its file: `domains[0].ca_certs[1]`.
    pub key: String,
    pub file: String,
    pub subject: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<CodeLabels, Counter>,
    /// `requests`' counter for each status code below 1000 (HTTP's are 100–999) once it has been
    /// seen: counting a request is then an index and an atomic add, where the family's lookup
    /// hashes the label under a lock on every request. The counters are the family's own (a clone
    /// shares the value), so `/metrics` is unchanged.
    request_counters: Box<[OnceLock<Counter>]>,
    pub request_duration: Family<ClassLabels, Histogram, fn() -> Histogram>,
    /// `request_duration`'s histogram per class (1xx to 5xx), made once, so timing a request
    /// takes no hashed lookup.
    request_durations: [Histogram; 5],
    pub backend_response: Histogram,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub ktls_connections: Family<KtlsLabels, Counter>,
    pub proxy_protocol_headers: Family<ProxyHeaderLabels, Counter>,
    pub registry_endpoints: Gauge,
    pub registry_messages: Family<RegistryLabels, Counter>,
    pub route_policy_malformed_sources: Counter,
    pub registry_option_problems: Family<OptionLabels, Counter>,
    pub xdp_verdicts: Family<XdpVerdictLabels, Counter>,
    pub xdp_deny_entries: Gauge,
    pub xdp_ungated_domains: Gauge,
    pub xdp_deny_learned: Counter,
    pub xdp_deny_connections_ended: Counter,
    pub xdp_deny_shared: Family<KindLabels, Counter>,
    pub xdp_deny_lifted: Family<KindLabels, Counter>,
    pub xdp_attached: Family<XdpAttachLabels, Gauge>,
    pub xdp_unparsed: Family<KindLabels, Counter>,
    pub connections_active: Gauge,
    pub worker_connections: Family<WorkerLabels, Gauge>,
    pub connections_idle: Gauge,
    pub accept_errors: Counter,
    pub client_connection_errors: Family<KindLabels, Counter>,
    pub client_lingering_closes: Family<OutcomeLabels, Counter>,
    pub backend_errors: Family<ErrorLabels, Counter>,
    pub backend_early_answers: Family<ProtocolLabels, Counter>,
    pub backend_resends: Family<ReasonLabels, Counter>,
    pub access_log_dropped: Counter,
    pub admin_refused: Counter,
    pub admin_connections_refused: Counter,
    pub backend_exhausted_conns: Counter,
    pub certificate_expiry: Family<CertLabels, Gauge>,
    pub event_loops_stalled: Gauge,
    pub registry_connected: Gauge,
    pub route_service_requests: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let request_duration: Family<ClassLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let request_durations = CLASSES.map(|class| {
            request_duration
                .get_or_create(&ClassLabels { class })
                .clone()
        });
        let m = Metrics {
            requests: Family::default(),
            request_counters: (0..1000).map(|_| OnceLock::new()).collect(),
            request_duration,
            request_durations,
            backend_response: latency_histogram(),
            authz_decisions: Family::default(),
            tls_handshakes: Family::default(),
            ktls_connections: Family::default(),
            proxy_protocol_headers: Family::default(),
            registry_endpoints: Gauge::default(),
            registry_messages: Family::default(),
            route_policy_malformed_sources: Counter::default(),
            registry_option_problems: Family::default(),
            xdp_verdicts: Family::default(),
            xdp_deny_entries: Gauge::default(),
            xdp_ungated_domains: Gauge::default(),
            xdp_deny_learned: Counter::default(),
            xdp_deny_connections_ended: Counter::default(),
            xdp_deny_shared: Family::default(),
            xdp_deny_lifted: Family::default(),
            xdp_attached: Family::default(),
            xdp_unparsed: Family::default(),
            connections_active: Gauge::default(),
            worker_connections: Family::default(),
            connections_idle: Gauge::default(),
            accept_errors: Counter::default(),
            client_connection_errors: Family::default(),
            client_lingering_closes: Family::default(),
            backend_errors: Family::default(),
            backend_early_answers: Family::default(),
            backend_resends: Family::default(),
            access_log_dropped: Counter::default(),
            admin_refused: Counter::default(),
            admin_connections_refused: Counter::default(),
            backend_exhausted_conns: Counter::default(),
            certificate_expiry: Family::default(),
            event_loops_stalled: Gauge::default(),
            registry_connected: Gauge::default(),
            route_service_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a request's head read to its response's last byte written (the access log's \
             response_time), by status class",
            m.request_duration.clone(),
        );
        registry.register(
            "backend_response_seconds",
            "From a request sent to a backend to the backend's response head (the access log's \
             backend_time)",
            m.backend_response.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by rule",
            m.authz_decisions.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by mTLS domain and result",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "ktls_connections",
            "Connections by TLS record layer",
            m.ktls_connections.clone(),
        );
        registry.register(
            "proxy_protocol_headers",
            "PROXY protocol headers read from listen.proxy_protocol.from peers, by result \
             (proxied, local; invalid, timeout and closed close the connection)",
            m.proxy_protocol_headers.clone(),
        );
        registry.register(
            "registry_endpoints",
            "Endpoint registrations in the route table",
            m.registry_endpoints.clone(),
        );
        registry.register(
            "registry_messages",
            "Registry messages, by subject and result",
            m.registry_messages.clone(),
        );
        registry.register(
            "route_policy_malformed_sources",
            "Malformed route_policy_sources entries skipped, once per registration",
            m.route_policy_malformed_sources.clone(),
        );
        registry.register(
            "registry_option_problems",
            "Route options a registration carried that could not be used (the route is registered \
             without them), by option, once per registration",
            m.registry_option_problems.clone(),
        );
        registry.register(
            "xdp_verdicts",
            "XDP verdicts on ClientHellos",
            m.xdp_verdicts.clone(),
        );
        registry.register(
            "xdp_deny_entries",
            "Denials in force: the XDP DENY map's entries (deny learning's own without the gate)",
            m.xdp_deny_entries.clone(),
        );
        registry.register(
            "xdp_ungated_domains",
            "Domains with an allow-list the XDP gate does not check (it does not fit in the ALLOW \
             map, or the last map update failed); the daemon checks it after the ClientHello",
            m.xdp_ungated_domains.clone(),
        );
        registry.register(
            "xdp_deny_shared",
            "Denials shared over NATS, by direction (sent, applied, ignored)",
            m.xdp_deny_shared.clone(),
        );
        registry.register(
            "xdp_deny_lifted",
            "Denials lifted before their expiry, by who lifted them (admin, fleet)",
            m.xdp_deny_lifted.clone(),
        );
        registry.register(
            "xdp_deny_learned",
            "Denials learned from repeated failures",
            m.xdp_deny_learned.clone(),
        );
        registry.register(
            "xdp_deny_connections_ended",
            "Kept-alive connections ended because their caller was learned as denied",
            m.xdp_deny_connections_ended.clone(),
        );
        registry.register(
            "admin_requests_refused",
            "Admin API requests refused for a missing or wrong token (admin.token_file)",
            m.admin_refused.clone(),
        );
        registry.register(
            "admin_connections_refused",
            "Admin API connections closed at once because admin.max_connections were open",
            m.admin_connections_refused.clone(),
        );
        registry.register(
            "backend_exhausted_conns",
            "Requests answered 503 because every endpoint they could go to had backends.max_conns \
             requests in flight",
            m.backend_exhausted_conns.clone(),
        );
        registry.register(
            "xdp_unparsed",
            "ClientHellos the XDP gate passed without a decision, by why",
            m.xdp_unparsed.clone(),
        );
        registry.register(
            "xdp_attached",
            "Whether the XDP program is attached",
            m.xdp_attached.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open",
            m.connections_active.clone(),
        );
        registry.register(
            "worker_connections",
            "Client connections each worker event loop serves (a new connection goes to the least \
             loaded)",
            m.worker_connections.clone(),
        );
        registry.register(
            "connections_idle",
            "HTTP/1.1 client connections waiting for a request with their HTTP buffers released",
            m.connections_idle.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections the listeners could not accept (out of file descriptors, most often)",
            m.accept_errors.clone(),
        );
        registry.register(
            "client_connection_errors",
            "Client connections (HTTP/1.1 and h2, after their TLS handshake) that ended in an \
             error, by kind: header_timeout (no whole request head within \
             limits.header_read_timeout), unparsed_head (an HTTP/1.1 head hyper answered itself: \
             400, 414, 431), incomplete_request (closed in the middle of a request), h2_abuse (GOAWAY \
             ENHANCE_YOUR_CALM: streams reset faster than served, header blocks without end), \
             h2_protocol (another HTTP/2 connection error, sent or received), io (reset, or TLS \
             failing after the handshake), other",
            m.client_connection_errors.clone(),
        );
        registry.register(
            "client_lingering_closes",
            "HTTP/1.1 client connections the gateway closed while the client was still sending \
             (a request body answered before it was read), reading and discarding it first \
             (limits.linger_timeout), by outcome: client_closed (the client then closed), \
             timeout (still open at linger_timeout), shutdown (cut by the gateway's shutdown)",
            m.client_lingering_closes.clone(),
        );
        registry.register(
            "backend_errors",
            "Backend failures, by kind",
            m.backend_errors.clone(),
        );
        registry.register(
            "backend_early_answers",
            "Answers an app ended whole before it had the whole request body (an early 413, say), \
             whose rest the gateway then did not send on, by the backend connection's protocol: \
             http1 (the connection was closed), http2 (the stream was reset with CANCEL, once \
             the app took more of it)",
            m.backend_early_answers.clone(),
        );
        registry.register(
            "backend_resends",
            "Requests sent to their endpoint again on a new connection, by why: a pooled \
             connection found closed before the request went out (stale_connection), one idle \
             for 100 ms or more that ended without answering a replayable request \
             (idle_connection_closed: the backend's keep-alive timeout is shorter than \
             backends.idle_timeout), an h2 backend's REFUSED_STREAM (refused_stream) or GOAWAY \
             (go_away)",
            m.backend_resends.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log records dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate the config loaded expires (its notAfter, Unix seconds), by \
             config key, file and subject",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "event_loops_stalled",
            "Event loops (worker threads, the main runtime) that have not run for 5 s: a task is \
             blocking the thread, and the connections it holds wait",
            m.event_loops_stalled.clone(),
        );
        registry.register(
            "registry_connected",
            "1 while a NATS server is connected (always 1 without NATS), else 0: routes from NATS \
             are not updated and stale ones not pruned",
            m.registry_connected.clone(),
        );
        registry.register(
            "route_service_requests",
            "Requests for routes bound to a route service, by outcome: sent to the service, \
             returned from it and taken back, failed (the service did not answer), or refused \
             on return (invalid_signature, expired, other_route)",
            m.route_service_requests.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn count_request(&self, status: u16) {
        let family = || {
            self.requests
                .get_or_create(&CodeLabels { code: status })
                .clone()
        };
        match self.request_counters.get(usize::from(status)) {
            Some(slot) => slot.get_or_init(family).inc(),
            None => family().inc(),
        };
    }

    /// Times a finished request: its whole duration by status class, and the backend's part
    /// when it was proxied.
    pub fn time_request(&self, status: u16, total: Duration, backend: Option<Duration>) {
        let class = usize::from(status / 100).saturating_sub(1);
        if let Some(h) = self.request_durations.get(class) {
            h.observe(total.as_secs_f64());
        }
        if let Some(b) = backend {
            self.backend_response.observe(b.as_secs_f64());
        }
    }

    pub fn count_decision(&self, allowed: bool, rule: &Rule) {
        self.authz_decisions
            .get_or_create(&AuthzLabels {
                decision: if allowed { "allow" } else { "deny" },
                rule: rule.clone(),
            })
            .inc();
    }

    pub fn count_handshake(
        &self,
        domain: Option<&crate::names::DomainPattern>,
        result: &'static str,
    ) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels {
                domain: domain.map_or_else(|| "-".to_string(), ToString::to_string),
                result,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_per_code_through_the_cached_counters_and_past_them() {
        let m = Metrics::new();
        for code in [200, 200, 200, 503, 200, 1200] {
            m.count_request(code);
        }
        let text = m.encode();
        for line in [
            "portcullis_requests_total{code=\"200\"} 4",
            "portcullis_requests_total{code=\"503\"} 1",
            "portcullis_requests_total{code=\"1200\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(!text.contains("code=\"404\""), "{text}");
    }
}
