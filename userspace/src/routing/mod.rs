//! Route snapshots and endpoint selection (SPEC §4, §7, §10).
//!
//! A [`RouteTable`] is immutable once built: the registry builds a new one per change and swaps it
//! in whole, so one request always sees one consistent view of route, options and endpoints.

mod maglev;
mod select;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::authz::{RoutePolicy, ScopeTags};
use crate::registry::{HashOptions, LoadBalancing, Protocol, RouteKey, ValidRegistration};
pub use maglev::Maglev;
pub use select::Selector;

/// One backend instance registered under a route.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port` (`[v6]:port`), as connected to.
    pub addr: String,
    pub host: String,
    pub port: u16,
    /// SAN the backend's certificate must carry; `Some` means TLS to this endpoint.
    pub tls_san: Option<String>,
    pub protocol: Protocol,
    pub tags: BTreeMap<String, String>,
    pub app: String,
    pub private_instance_id: String,
    pub private_instance_index: String,
    pub availability_zone: String,
    /// Requests in flight to this endpoint (least-connection); shared across snapshots.
    pub active: Arc<AtomicUsize>,
    /// Until when (a [`now_ms`] time; 0 = not) a connection failure keeps this endpoint behind
    /// the others in selection; shared across snapshots, so a heartbeat does not clear it.
    pub failed_until: Arc<AtomicU64>,
    /// Never pruned (static config routes).
    pub permanent: bool,
    pub stale_threshold: Duration,
    pub refreshed: Instant,
    /// GoRouter's headers naming this instance to its app, made on first use: see
    /// [`Endpoint::instance_headers`].
    pub instance_headers: OnceLock<InstanceHeaders>,
}

/// The values of `X-CF-ApplicationID`, `X-CF-InstanceIndex` and `X-CF-InstanceID`.
#[derive(Debug)]
pub struct InstanceHeaders {
    pub app_id: http::HeaderValue,
    pub index: http::HeaderValue,
    pub instance_id: http::HeaderValue,
}

impl Endpoint {
    /// A permanent HTTP/1.1 endpoint at `host:port` with no tags, identity or TLS (tests and
    /// benchmarks build on it with struct update syntax).
    pub fn plain(host: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: crate::registry::endpoint_addr(host, port),
            host: host.to_string(),
            port,
            tls_san: None,
            protocol: Protocol::Http1,
            tags: BTreeMap::new(),
            app: String::new(),
            private_instance_id: String::new(),
            private_instance_index: String::new(),
            availability_zone: String::new(),
            active: Arc::default(),
            failed_until: Arc::default(),
            permanent: true,
            stale_threshold: Duration::from_secs(120),
            refreshed: Instant::now(),
            instance_headers: OnceLock::new(),
        }
    }

    /// What GoRouter tells an app about the instance a request was sent to: the registration's
    /// `app`, `private_instance_index` and `private_instance_id` (its address when it has none).
    /// Made once per endpoint; a value no header may carry is sent empty.
    pub fn instance_headers(&self) -> &InstanceHeaders {
        self.instance_headers.get_or_init(|| {
            let value = |s: &str| {
                http::HeaderValue::from_str(s).unwrap_or(http::HeaderValue::from_static(""))
            };
            InstanceHeaders {
                app_id: value(&self.app),
                index: value(&self.private_instance_index),
                instance_id: value(self.instance_name()),
            }
        })
    }

    fn tag(&self, name: &str) -> &str {
        self.tags.get(name).map_or("", String::as_str)
    }

    /// Whether a connection failure at most `backends.failure_cooldown` ago keeps it behind the
    /// endpoints that have not failed.
    pub fn cooling_down(&self, now_ms: u64) -> bool {
        let until = self.failed_until.load(Ordering::Relaxed);
        until != 0 && now_ms < until
    }

    /// How long it still cools down, if it does.
    pub fn cooldown_left(&self) -> Option<Duration> {
        let until = self.failed_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until != 0 && now < until).then(|| Duration::from_millis(until - now))
    }

    /// Puts it behind the others for `cooldown` after a failed connection. True when it was
    /// not cooling down already (the failure worth saying).
    pub fn mark_failed(&self, cooldown: Duration) -> bool {
        if cooldown.is_zero() {
            return false;
        }
        let now = now_ms();
        let until = now.saturating_add(cooldown.as_millis() as u64);
        let before = self.failed_until.swap(until, Ordering::Relaxed);
        before == 0 || before <= now
    }

    /// Whether it may take another request under `backends.max_conns` (0 = no limit).
    pub fn has_room(&self, max_conns: usize) -> bool {
        max_conns == 0 || self.active.load(Ordering::Relaxed) < max_conns
    }

    /// Counts a request in flight to it, unless that would take it past `max_conns` (0 = no
    /// limit); `false` when it is full. [`Endpoint::release`] undoes it.
    pub fn reserve(&self, max_conns: usize) -> bool {
        if max_conns == 0 {
            self.active.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.active
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max_conns).then_some(n + 1)
            })
            .is_ok()
    }

    /// Ends a request counted by [`Endpoint::reserve`].
    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends a cooldown after the endpoint answered (one relaxed load when there is none).
    pub fn mark_answered(&self) {
        if self.failed_until.load(Ordering::Relaxed) != 0 {
            self.failed_until.store(0, Ordering::Relaxed);
        }
    }

    /// The endpoint's `process_id` tag (the process it is an instance of; GoRouter's
    /// `X-CF-Process-Instance` asks for one).
    pub fn process_id(&self) -> &str {
        self.tag("process_id")
    }

    /// The endpoint's `app_id` tag, or the registration's `app` field.
    pub fn app_id(&self) -> &str {
        match self.tag("app_id") {
            "" => &self.app,
            t => t,
        }
    }

    /// The name GoRouter knows the instance by (in `X-CF-InstanceID` and in hash-based
    /// routing's table): its `private_instance_id`, or its address when it has none.
    pub fn instance_name(&self) -> &str {
        match self.private_instance_id.as_str() {
            "" => &self.addr,
            id => id,
        }
    }
}

impl ScopeTags for Endpoint {
    fn space_id(&self) -> &str {
        self.tag("space_id")
    }
    fn organization_id(&self) -> &str {
        self.tag("organization_id")
    }
}

/// Milliseconds on a monotonic clock that starts at 1 (0 means "not failed" in
/// [`Endpoint::failed_until`]).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// All endpoints registered under one route key, with the pool-level options.
#[derive(Debug)]
pub struct Pool {
    pub key: RouteKey,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub policy: RoutePolicy,
    /// How requests without a hash key are balanced, when the route says (otherwise by the
    /// gateway's `backends.balancing_algorithm`).
    pub load_balancing: Option<LoadBalancing>,
    /// Hash-based routing (`loadbalancing: hash`), when the route asks for it.
    pub hash: Option<HashRouting>,
    /// The raw options of the registration that set them, for `/routes`.
    pub options: BTreeMap<String, String>,
    /// GoRouter's `route_service_url` (newest registration wins, as GoRouter keeps it): a route
    /// bound to a route service, whose requests reach the app only through it (`route_services`;
    /// without it they are refused rather than sent to the app past the service).
    pub route_service: Option<Arc<str>>,
    /// Round-robin position; shared across snapshots so rebuilding does not reset the rotation.
    next: Arc<AtomicUsize>,
}

/// A pool's hash-based routing: the request header that keys it, the balance limit and the
/// Maglev table over the pool's endpoints.
#[derive(Debug)]
pub struct HashRouting {
    pub header: http::HeaderName,
    /// `hash_balance` (0: no limit).
    pub balance: f64,
    pub table: Arc<Maglev>,
}

impl Pool {
    /// Starts a selection: endpoints are offered in load-balancing order, skipping those tried.
    pub fn selector(&self) -> Selector<'_> {
        Selector::new(self, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// An immutable view of every route. Cloning is O(1): the host map is persistent, so a new
/// snapshot shares everything a change did not touch.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// Pools per host, longest path first.
    hosts: imbl::HashMap<String, Arc<[Arc<Pool>]>>,
    endpoints: usize,
    /// Hosts that are wildcards (`*.example.com`): without any, a miss costs one lookup.
    wildcards: usize,
}

impl RouteTable {
    /// The pool for a normalised host and a request path: longest matching path prefix, on
    /// segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`). When the host has
    /// no route for the path, GoRouter's wildcard routes are tried, nearest first: for
    /// `a.b.example.com`, `*.b.example.com`, then `*.example.com`, then `*.com`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Pool>> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if let Some(pool) = self.lookup_host(host, path) {
            return Some(pool);
        }
        if self.wildcards == 0 {
            return None;
        }
        let mut rest = host.strip_prefix("*.").unwrap_or(host);
        let mut wildcard = String::with_capacity(host.len() + 1);
        while let Some((_, parent)) = rest.split_once('.') {
            wildcard.clear();
            wildcard.push_str("*.");
            wildcard.push_str(parent);
            if let Some(pool) = self.lookup_host(&wildcard, path) {
                return Some(pool);
            }
            rest = parent;
        }
        None
    }

    /// The pool of exactly `host` whose path prefix matches `path` (without its query), in
    /// any case as GoRouter matches (route keys are lowercase): an app that reads `/Admin` as
    /// `/admin` must not get it under a weaker route's policy.
    fn lookup_host(&self, host: &str, path: &str) -> Option<&Arc<Pool>> {
        let pools = self.hosts.get(host)?;
        let path = path.as_bytes();
        pools.iter().find(|p| {
            let prefix = p.key.path.as_bytes();
            prefix.is_empty()
                || (path
                    .get(..prefix.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
                    && matches!(path.get(prefix.len()), None | Some(b'/')))
        })
    }

    /// Every pool, ordered by route key.
    pub fn pools(&self) -> Vec<&Arc<Pool>> {
        let mut all: Vec<_> = self.hosts.values().flat_map(|p| p.iter()).collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// How many endpoint registrations (endpoint × route) the table holds.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    /// Every distinct endpoint host that is an IP address, for `registry_hosts` allow-lists
    /// (SPEC §11). Hosts given as names are skipped: the gate matches source addresses.
    pub fn endpoint_addresses(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.hosts
            .values()
            .flat_map(|p| p.iter())
            .flat_map(|p| p.endpoints.iter())
            .filter_map(|e| e.host.parse().ok())
            .collect()
    }
}

#[derive(Debug)]
struct PoolState {
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    policy: RoutePolicy,
    load_balancing: Option<LoadBalancing>,
    hash: Option<HashOptions>,
    /// The Maglev table of the last snapshot and the instance names it was built for, in pool
    /// order: heartbeats rebuild the pool, and the table only when its instances changed.
    maglev: Option<(Vec<String>, Arc<Maglev>)>,
    options: BTreeMap<String, String>,
    route_service: Option<Arc<str>>,
    next: Arc<AtomicUsize>,
}

impl PoolState {
    /// The pool's hash-based routing for its current endpoints, reusing the last table when
    /// they are the same instances.
    fn hash_routing(&mut self) -> Option<HashRouting> {
        let Some(opts) = &self.hash else {
            self.maglev = None;
            return None;
        };
        let names: Vec<&str> = self.endpoints.values().map(|e| e.instance_name()).collect();
        let table = match &self.maglev {
            Some((built_for, table)) if built_for.iter().eq(names.iter()) => table.clone(),
            _ => {
                let table = Arc::new(Maglev::new(&names)?);
                self.maglev = Some((names.iter().map(|n| n.to_string()).collect(), table.clone()));
                table
            }
        };
        Some(HashRouting {
            header: opts.header.clone(),
            balance: opts.balance,
            table,
        })
    }
}

/// The registry's working state; [`RegistryState::snapshot`] freezes it into a [`RouteTable`].
/// Changes mark their route keys dirty; a snapshot rebuilds only those, so its cost follows the
/// size of the change, not of the table.
#[derive(Debug, Default)]
pub struct RegistryState {
    pools: HashMap<RouteKey, PoolState>,
    table: RouteTable,
    dirty: std::collections::HashSet<RouteKey>,
}

impl RegistryState {
    /// Adds or refreshes an endpoint under each of its route keys. The pool's options, and its
    /// route service, follow the newest registration whose values differ from them.
    pub fn register(
        &mut self,
        reg: &ValidRegistration,
        permanent: bool,
        default_stale: Duration,
        now: Instant,
    ) {
        let addr = reg.addr();
        for key in &reg.keys {
            self.dirty.insert(key.clone());
            let mut created = false;
            let pool = self.pools.entry(key.clone()).or_insert_with(|| {
                created = true;
                PoolState {
                    endpoints: BTreeMap::new(),
                    policy: reg.policy.clone(),
                    load_balancing: reg.load_balancing,
                    hash: reg.hash.clone(),
                    maglev: None,
                    options: reg.raw.options.clone(),
                    route_service: None,
                    next: Arc::default(),
                }
            });
            if created || pool.options != reg.raw.options {
                // Said when the route's options change, not at every heartbeat.
                for problem in &reg.option_problems {
                    tracing::warn!(route = %key, option = problem.option(), "{problem}");
                }
                pool.options = reg.raw.options.clone();
                pool.policy = reg.policy.clone();
                pool.load_balancing = reg.load_balancing;
                pool.hash = reg.hash.clone();
            }
            if pool.route_service.as_deref() != reg.route_service.as_deref() {
                match &reg.route_service {
                    Some(url) => tracing::info!(
                        route = %key,
                        route_service_url = %url,
                        "route bound to a route service: its requests go through it (with route_services configured; otherwise they are answered 502, route_service_unsupported)"
                    ),
                    None => {
                        tracing::info!(route = %key, "route no longer bound to a route service")
                    }
                }
                pool.route_service = reg.route_service.clone();
            }
            let (active, failed_until) = pool
                .endpoints
                .get(&addr)
                .map(|e| (e.active.clone(), e.failed_until.clone()))
                .unwrap_or_default();
            let r = &reg.raw;
            let stale = r
                .stale_threshold_in_seconds
                .filter(|s| *s > 0)
                .map_or(default_stale, Duration::from_secs);
            pool.endpoints.insert(
                addr.clone(),
                Arc::new(Endpoint {
                    addr: addr.clone(),
                    host: reg.host.clone(),
                    port: reg.port,
                    tls_san: reg.tls_san.clone(),
                    protocol: reg.protocol,
                    tags: r.tags.clone(),
                    app: r.app.clone().unwrap_or_default(),
                    private_instance_id: r.private_instance_id.clone().unwrap_or_default(),
                    private_instance_index: r.private_instance_index.clone().unwrap_or_default(),
                    availability_zone: r.availability_zone.clone().unwrap_or_default(),
                    active,
                    failed_until,
                    permanent,
                    stale_threshold: stale,
                    refreshed: now,
                    instance_headers: OnceLock::new(),
                }),
            );
        }
    }

    /// Removes an endpoint from each of its route keys; a route with no endpoint left is gone.
    /// Permanent (static) endpoints are kept.
    pub fn unregister(&mut self, reg: &ValidRegistration) -> usize {
        let addr = reg.addr();
        let mut removed = 0;
        for key in &reg.keys {
            if let Some(pool) = self.pools.get_mut(key) {
                if pool.endpoints.get(&addr).is_some_and(|e| !e.permanent) {
                    pool.endpoints.remove(&addr);
                    self.dirty.insert(key.clone());
                    removed += 1;
                }
                if pool.endpoints.is_empty() {
                    self.pools.remove(key);
                }
            }
        }
        removed
    }

    /// Removes every permanent (static) endpoint; routes left empty are gone.
    pub fn clear_permanent(&mut self) {
        let dirty = &mut self.dirty;
        self.pools.retain(|key, pool| {
            let before = pool.endpoints.len();
            pool.endpoints.retain(|_, e| !e.permanent);
            if pool.endpoints.len() != before {
                dirty.insert(key.clone());
            }
            !pool.endpoints.is_empty()
        });
    }

    /// Removes non-permanent, non-TLS endpoints not refreshed within their stale threshold.
    pub fn prune(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        let dirty = &mut self.dirty;
        self.pools.retain(|key, pool| {
            let before = pool.endpoints.len();
            pool.endpoints.retain(|_, e| {
                e.permanent
                    || e.tls_san.is_some()
                    || now.saturating_duration_since(e.refreshed) <= e.stale_threshold
            });
            if pool.endpoints.len() != before {
                removed += before - pool.endpoints.len();
                dirty.insert(key.clone());
            }
            !pool.endpoints.is_empty()
        });
        removed
    }

    /// Freezes the current state: rebuilds the pools of every key changed since the last call and
    /// returns a table sharing everything else with the previous one.
    pub fn snapshot(&mut self) -> RouteTable {
        let mut by_host: HashMap<String, Vec<RouteKey>> = HashMap::new();
        for key in self.dirty.drain() {
            by_host.entry(key.host.clone()).or_default().push(key);
        }
        for (host, keys) in by_host {
            let old = self
                .table
                .hosts
                .get(&host)
                .cloned()
                .unwrap_or_else(|| Arc::new([]));
            let old_count: usize = old.iter().map(|p| p.endpoints.len()).sum();
            // Untouched pools of this host are kept as they are; changed ones are rebuilt.
            let mut pools: Vec<Arc<Pool>> = old
                .iter()
                .filter(|p| !keys.contains(&p.key))
                .cloned()
                .collect();
            for key in &keys {
                if let Some(p) = self.pools.get_mut(key) {
                    pools.push(Arc::new(Pool {
                        key: key.clone(),
                        endpoints: p.endpoints.values().cloned().collect(),
                        policy: p.policy.clone(),
                        load_balancing: p.load_balancing,
                        hash: p.hash_routing(),
                        options: p.options.clone(),
                        route_service: p.route_service.clone(),
                        next: p.next.clone(),
                    }));
                }
            }
            pools.sort_by_key(|p| std::cmp::Reverse(p.key.path.len()));
            let new_count: usize = pools.iter().map(|p| p.endpoints.len()).sum();
            self.table.endpoints = self.table.endpoints + new_count - old_count;
            let was = !old.is_empty();
            let is = !pools.is_empty();
            if host.starts_with("*.") && was != is {
                if is {
                    self.table.wildcards += 1;
                } else {
                    self.table.wildcards -= 1;
                }
            }
            if pools.is_empty() {
                self.table.hosts.remove(&host);
            } else {
                self.table.hosts.insert(host, pools.into());
            }
        }
        self.table.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registration;

    fn reg(uri: &str, port: u16, opts: &[(&str, &str)]) -> ValidRegistration {
        ValidRegistration::try_from(Registration {
            uris: vec![uri.into()],
            host: Some("127.0.0.1".into()),
            port: Some(port),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn max_conns_reservations_stop_at_the_limit_and_release() {
        let e = Endpoint::plain("127.0.0.1", 1);
        assert!(e.reserve(2) && e.reserve(2));
        assert!(!e.has_room(2) && !e.reserve(2), "full at 2");
        assert_eq!(e.active.load(Ordering::Relaxed), 2);
        e.release();
        assert!(e.has_room(2) && e.reserve(2));
        // No limit: always room, still counted (least-connection).
        assert!(e.has_room(0) && e.reserve(0));
        assert_eq!(e.active.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let mut s = RegistryState::default();
        let now = Instant::now();
        s.register(&reg("a.x", 1, &[]), false, Duration::from_secs(1), now);
        s.register(&reg("a.x/api", 2, &[]), false, Duration::from_secs(1), now);
        let t = s.snapshot();
        assert_eq!(t.lookup("a.x", "/api/v1").unwrap().key.path, "/api");
        assert_eq!(t.lookup("a.x", "/api?q").unwrap().key.path, "/api");
        assert_eq!(t.lookup("a.x", "/apix").unwrap().key.path, "");
        assert!(t.lookup("b.x", "/").is_none());
        // In any case, as GoRouter matches; a registration in capitals is the same route.
        assert_eq!(t.lookup("a.x", "/API/v1").unwrap().key.path, "/api");
        assert_eq!(t.lookup("a.x", "/Api").unwrap().key.path, "/api");
        assert_eq!(t.lookup("a.x", "/APIX").unwrap().key.path, "");
        assert_eq!(t.lookup("a.x", "/A").unwrap().key.path, "");
        s.register(
            &reg("a.x/Docs/V2", 3, &[]),
            false,
            Duration::from_secs(1),
            now,
        );
        s.register(&reg("a.x/API", 4, &[]), false, Duration::from_secs(1), now);
        let t = s.snapshot();
        assert_eq!(t.lookup("a.x", "/docs/v2/x").unwrap().key.path, "/docs/v2");
        assert_eq!(t.lookup("a.x", "/api").unwrap().endpoints.len(), 2);
        // A non-ASCII byte is never split: the prefix is compared byte by byte.
        assert_eq!(t.lookup("a.x", "/ap\u{e9}").unwrap().key.path, "");
    }

    #[test]
    fn wildcard_routes_serve_what_no_nearer_route_does() {
        let mut s = RegistryState::default();
        let now = Instant::now();
        let stale = Duration::from_secs(1);
        let port = |t: &RouteTable, host: &str, path: &str| {
            t.lookup(host, path).map(|p| p.endpoints[0].port)
        };
        s.register(&reg("exact.x", 1, &[]), false, stale, now);
        assert_eq!(port(&s.snapshot(), "a.x", "/"), None, "no wildcard yet");
        s.register(&reg("*.x", 2, &[]), false, stale, now);
        s.register(&reg("*.b.x", 3, &[]), false, stale, now);
        s.register(&reg("*.B.X/api", 4, &[]), false, stale, now);
        s.register(&reg("api.b.x/v2", 5, &[]), false, stale, now);
        let t = s.snapshot();
        // An exact host wins, then the nearest wildcard, at any depth.
        assert_eq!(port(&t, "exact.x", "/"), Some(1));
        assert_eq!(port(&t, "a.x", "/"), Some(2));
        assert_eq!(port(&t, "a.b.x", "/"), Some(3));
        assert_eq!(port(&t, "deep.er.b.x", "/q?x=1"), Some(3));
        assert_eq!(
            port(&t, "a.b.x", "/api/v1"),
            Some(4),
            "the wildcard's own paths"
        );
        assert_eq!(port(&t, "a.c.x", "/api/v1"), Some(2));
        // A host with routes, none for this path: the wildcards still serve it (GoRouter's).
        assert_eq!(port(&t, "api.b.x", "/v2/x"), Some(5));
        assert_eq!(port(&t, "api.b.x", "/other"), Some(3));
        // Not the wildcard's own name, nor a sibling domain.
        assert_eq!(port(&t, "x", "/"), None);
        assert_eq!(port(&t, "a.y", "/"), None);
        assert_eq!(port(&t, "*.b.x", "/"), Some(3));
        // Gone when its last endpoint goes.
        s.unregister(&reg("*.x", 2, &[]));
        s.unregister(&reg("*.b.x", 3, &[]));
        s.unregister(&reg("*.B.X/api", 4, &[]));
        let t = s.snapshot();
        assert_eq!(t.wildcards, 0);
        assert_eq!(port(&t, "a.b.x", "/"), None);
        assert_eq!(port(&t, "api.b.x", "/v2"), Some(5));
    }

    #[test]
    fn newest_differing_options_win_and_last_endpoint_removes_route() {
        let mut s = RegistryState::default();
        let now = Instant::now();
        let a = reg("a.x", 1, &[("route_policy_scope", "any")]);
        let b = reg("a.x", 2, &[("route_policy_scope", "space")]);
        s.register(&a, false, Duration::from_secs(1), now);
        s.register(&b, false, Duration::from_secs(1), now);
        assert_eq!(
            s.snapshot().lookup("a.x", "/").unwrap().options["route_policy_scope"],
            "space"
        );
        s.register(&a, false, Duration::from_secs(1), now);
        assert_eq!(
            s.snapshot().lookup("a.x", "/").unwrap().options["route_policy_scope"],
            "any"
        );
        s.unregister(&a);
        assert!(s.snapshot().lookup("a.x", "/").is_some());
        s.unregister(&b);
        assert!(s.snapshot().lookup("a.x", "/").is_none());
    }

    #[test]
    fn the_newest_registration_sets_the_route_service_for_the_pool() {
        let mut s = RegistryState::default();
        let now = Instant::now();
        let stale = Duration::from_secs(1);
        let bound = |port| {
            ValidRegistration::try_from(crate::registry::Registration {
                route_service_url: Some("https://rs.example/".into()),
                ..reg("a.x", port, &[]).raw
            })
            .unwrap()
        };
        let route_service = |s: &mut RegistryState| {
            s.snapshot()
                .lookup("a.x", "/")
                .unwrap()
                .route_service
                .clone()
        };
        s.register(&reg("a.x", 1, &[]), false, stale, now);
        assert!(route_service(&mut s).is_none());
        s.register(&bound(2), false, stale, now);
        let t = s.snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        assert_eq!(pool.route_service.as_deref(), Some("https://rs.example/"));
        assert_eq!(pool.endpoints.len(), 2, "the pool as a whole is bound");
        // A heartbeat from the other endpoint without it unbinds the route, as in GoRouter.
        s.register(&reg("a.x", 1, &[]), false, stale, now);
        assert!(route_service(&mut s).is_none());
    }

    #[test]
    fn prune_spares_permanent_and_fresh() {
        let mut s = RegistryState::default();
        let t0 = Instant::now();
        s.register(&reg("a.x", 1, &[]), true, Duration::from_secs(1), t0);
        s.register(&reg("a.x", 2, &[]), false, Duration::from_secs(1), t0);
        s.register(&reg("b.x", 3, &[]), false, Duration::from_secs(1), t0);
        assert_eq!(s.prune(t0 + Duration::from_secs(5)), 2);
        let t = s.snapshot();
        assert_eq!(t.lookup("a.x", "").unwrap().endpoints.len(), 1);
        assert!(t.lookup("b.x", "").is_none());
    }
}
