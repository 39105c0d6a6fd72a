//! Endpoint selection: round-robin, least-connection or by a request header's hash, never
//! offering an endpoint twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Endpoint, HashRouting, Pool};
use crate::registry::LoadBalancing;

/// Offers a pool's endpoints one at a time in load-balancing order (for retries).
pub struct Selector<'a> {
    pool: &'a Pool,
    start: usize,
    tried: Vec<usize>,
    /// The gateway's own availability zone, under `az_preference: locally-optimistic`.
    zone: Option<&'a str>,
    /// The request's slot in the pool's hash table, under hash-based routing.
    slot: Option<usize>,
    /// `backends.balancing_algorithm`, for a pool whose registration does not name one.
    default: LoadBalancing,
}

impl<'a> Selector<'a> {
    pub(super) fn new(pool: &'a Pool, start: usize) -> Self {
        Selector {
            pool,
            start,
            tried: Vec::new(),
            zone: None,
            slot: None,
            default: LoadBalancing::RoundRobin,
        }
    }

    /// The algorithm for a pool whose registration names none (GoRouter's
    /// `balancing_algorithm`); round-robin unless set.
    pub fn balancing(mut self, default: LoadBalancing) -> Self {
        self.default = default;
        self
    }

    /// Hash-based routing: when the pool has it and the request carries its header (the first
    /// value, not empty), endpoints are offered from that value's slot in table order, and the
    /// zone preference is ignored (as GoRouter does). Without the header, the pool's other
    /// balancing applies.
    pub fn hashing(mut self, headers: &http::HeaderMap) -> Self {
        if let Some(h) = &self.pool.hash {
            if let Some(v) = headers.get(&h.header).filter(|v| !v.is_empty()) {
                self.slot = Some(h.table.slot(v.as_bytes()));
            }
        }
        self
    }

    /// Whether endpoints are offered by the request's hash.
    pub fn is_hashed(&self) -> bool {
        self.slot.is_some()
    }

    /// GoRouter's `locally-optimistic` preference: the first endpoint offered is one registered
    /// in `zone` when one is eligible and not cooling down; later ones (retries) come from any.
    pub fn local_first(mut self, zone: Option<&'a str>) -> Self {
        self.zone = zone;
        self
    }

    /// The next untried endpoint for which `eligible` holds, or `None` when none is left.
    /// Endpoints cooling down after a failed connection ([`Endpoint::mark_failed`]) come after
    /// every other one, so a dead instance costs one failed connection per cooldown instead of
    /// one per turn of the rotation; when only they are left they are still offered (they may
    /// be back, and a 502 without trying would turn one failure into a cooldown of errors).
    pub fn next(&mut self, eligible: impl Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
        let mut now = None;
        let mut skipped = false;
        let mut cooling = |e: &Endpoint| {
            // The clock is read only once an endpoint has failed at all.
            let cool = e.failed_until.load(Ordering::Relaxed) != 0
                && e.cooling_down(*now.get_or_insert_with(super::now_ms));
            skipped |= cool;
            cool
        };
        // Under `locally-optimistic`, a request's first endpoint comes from the gateway's zone
        // when one there is eligible and not cooling down.
        let local = self
            .zone
            .filter(|_| self.tried.is_empty() && self.slot.is_none());
        let chosen = local
            .and_then(|z| self.pick(|e| e.availability_zone == z && eligible(e) && !cooling(e)))
            .or_else(|| self.pick(|e| eligible(e) && !cooling(e)));
        let chosen = match chosen {
            Some(i) => i,
            None if skipped => self.pick(&eligible)?,
            None => return None,
        };
        self.tried.push(chosen);
        Some(self.pool.endpoints[chosen].clone())
    }

    /// The untried endpoint registered as instance `id` (a sticky session's), if `eligible` holds
    /// for it. It is offered even while cooling down, as GoRouter does: the session lives there,
    /// and when it fails the next endpoint takes over (and the session moves with the response).
    pub fn prefer(
        &mut self,
        id: &str,
        eligible: impl Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let eps = &self.pool.endpoints;
        let chosen = (0..eps.len()).find(|i| {
            !self.tried.contains(i) && eps[*i].private_instance_id == id && eligible(&eps[*i])
        })?;
        self.tried.push(chosen);
        Some(eps[chosen].clone())
    }

    /// The untried endpoint for which `ok` holds that the pool's load balancing picks first.
    fn pick(&self, mut ok: impl FnMut(&Endpoint) -> bool) -> Option<usize> {
        if let (Some(slot), Some(h)) = (self.slot, &self.pool.hash) {
            if let Some(i) = self.pick_hashed(slot, h, &mut ok) {
                return Some(i);
            }
            // Only endpoints outside the table (a second one with the same instance id) are
            // left, if any: they come in rotation.
        }
        let eps = &self.pool.endpoints;
        let n = eps.len();
        let order = (0..n).map(|i| (self.start + i) % n);
        let mut candidates = order.filter(|i| !self.tried.contains(i) && ok(&eps[*i]));
        match self.pool.load_balancing.unwrap_or(self.default) {
            LoadBalancing::RoundRobin => candidates.next(),
            LoadBalancing::LeastConnection => {
                candidates.min_by_key(|i| eps[*i].active.load(Ordering::Relaxed))
            }
        }
    }

    /// The first untried endpoint for which `ok` holds in table order from `slot`. One with
    /// more than `hash_balance` times the pool's average requests in flight is passed over for
    /// the next (GoRouter's overflow to the next instance in the table), unless every other one
    /// is as well.
    fn pick_hashed(
        &self,
        slot: usize,
        h: &HashRouting,
        ok: &mut impl FnMut(&Endpoint) -> bool,
    ) -> Option<usize> {
        let eps = &self.pool.endpoints;
        let average = (h.balance > 0.0).then(|| {
            let total: usize = eps.iter().map(|e| e.active.load(Ordering::Relaxed)).sum();
            total as f64 / eps.len() as f64
        });
        let busy = |e: &Endpoint| {
            average.is_some_and(|average| {
                average > 0.0 && e.active.load(Ordering::Relaxed) as f64 / average > h.balance
            })
        };
        let mut usable = |i: usize| i < eps.len() && !self.tried.contains(&i) && ok(&eps[i]);
        // Most requests take the slot's owner: no walk, no allocation.
        let owner = h.table.owner(slot);
        let mut overflow = None;
        if usable(owner) {
            if !busy(&eps[owner]) {
                return Some(owner);
            }
            overflow = Some(owner);
        }
        let mut seen = vec![false; eps.len()];
        if let Some(s) = seen.get_mut(owner) {
            *s = true;
        }
        let mut left = eps.len().saturating_sub(1);
        for i in h.table.from(slot) {
            if left == 0 {
                // Every endpoint judged: the rest of the table only repeats them.
                break;
            }
            if i >= eps.len() || std::mem::replace(&mut seen[i], true) {
                continue;
            }
            left -= 1;
            if usable(i) {
                if !busy(&eps[i]) {
                    return Some(i);
                }
                overflow.get_or_insert(i);
            }
        }
        overflow
    }

    /// How many endpoints were offered so far.
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::registry::{Registration, ValidRegistration};
    use crate::routing::RegistryState;

    /// An endpoint of route `a.x` on `port`, balanced by `lb`, in `zone`.
    fn endpoint(lb: &str, port: u16, zone: Option<&str>) -> ValidRegistration {
        ValidRegistration::try_from(Registration {
            uris: vec!["a.x".into()],
            host: Some("127.0.0.1".into()),
            port: Some(port),
            availability_zone: zone.map(str::to_string),
            options: [("loadbalancing".to_string(), lb.to_string())].into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn table(lb: &str, ports: &[u16]) -> RegistryState {
        let mut s = RegistryState::default();
        for p in ports {
            s.register(
                &endpoint(lb, *p, None),
                false,
                Duration::from_secs(9),
                Instant::now(),
            );
        }
        s
    }

    #[test]
    fn round_robin_rotates_and_retries_skip_tried() {
        let t = table("round-robin", &[1, 2, 3]).snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        let firsts: Vec<u16> = (0..3)
            .map(|_| pool.selector().next(|_| true).unwrap().port)
            .collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 2, 3]);
        let mut sel = pool.selector();
        let seen: Vec<u16> = std::iter::from_fn(|| sel.next(|_| true))
            .map(|e| e.port)
            .collect();
        assert_eq!(seen.len(), 3);
        assert_eq!(sel.attempts(), 3);
        assert!(pool.selector().next(|e| e.port == 9).is_none());
    }

    #[test]
    fn least_connection_prefers_idle() {
        let t = table("least-connection", &[1, 2]).snapshot();
        let pool = t.lookup("a.x", "").unwrap();
        pool.endpoints[0]
            .active
            .store(5, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(pool.selector().next(|_| true).unwrap().port, 2);
        }
    }

    #[test]
    fn an_endpoint_that_failed_comes_last_until_its_cooldown_ends_or_it_answers() {
        for lb in ["round-robin", "least-connection"] {
            let mut state = table(lb, &[1, 2, 3]);
            let t = state.snapshot();
            let pool = t.lookup("a.x", "/").unwrap();
            let two = &pool.endpoints[1];
            assert_eq!(two.port, 2);
            assert!(two.mark_failed(Duration::from_secs(60)));
            assert!(!two.mark_failed(Duration::from_secs(60)), "said once");
            for _ in 0..6 {
                let mut sel = pool.selector();
                let order: Vec<u16> = std::iter::from_fn(|| sel.next(|_| true))
                    .map(|e| e.port)
                    .collect();
                assert_eq!(order.len(), 3, "{lb}: every endpoint is still offered");
                assert_eq!(order[2], 2, "{lb}: the failed one last: {order:?}");
            }
            // Only it left (the others not eligible): still offered.
            assert_eq!(pool.selector().next(|e| e.port == 2).unwrap().port, 2);

            // A heartbeat (re-registration) keeps the cooldown; an answer ends it.
            let r = endpoint(lb, 2, None);
            state.register(&r, false, Duration::from_secs(9), Instant::now());
            let t = state.snapshot();
            let pool = t.lookup("a.x", "/").unwrap();
            let two = pool.endpoints.iter().find(|e| e.port == 2).unwrap();
            assert!(two.cooldown_left().is_some(), "{lb}");
            two.mark_answered();
            assert_eq!(two.cooldown_left(), None);
            let firsts: Vec<u16> = (0..3)
                .map(|_| pool.selector().next(|_| true).unwrap().port)
                .collect();
            if lb == "round-robin" {
                assert!(firsts.contains(&2), "{firsts:?}");
            }

            // A cooldown of zero marks nothing; an ended one lets it back in turn.
            assert!(!two.mark_failed(Duration::ZERO));
            assert_eq!(two.cooldown_left(), None);
            assert!(two.mark_failed(Duration::from_millis(1)));
            std::thread::sleep(Duration::from_millis(5));
            assert!(!two.cooling_down(crate::routing::now_ms()));
            assert!(
                two.mark_failed(Duration::from_secs(1)),
                "a new failure is said again"
            );
        }
    }

    /// A hash route `a.x` over instances `instance-a`..`-c` (ports 1–3, registered in reverse
    /// so that pool order is not name order) with `hash_balance`.
    fn hashed(balance: &str) -> RegistryState {
        let mut s = RegistryState::default();
        for (port, id) in [(3, "instance-c"), (1, "instance-a"), (2, "instance-b")] {
            let r = ValidRegistration::try_from(Registration {
                uris: vec!["a.x".into()],
                host: Some("127.0.0.1".into()),
                port: Some(port),
                private_instance_id: Some(id.into()),
                availability_zone: Some(format!("z{port}")),
                options: [
                    ("loadbalancing", "hash"),
                    ("hash_header", "Tenant"),
                    ("hash_balance", balance),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            })
            .unwrap();
            s.register(&r, false, Duration::from_secs(9), Instant::now());
        }
        s
    }

    fn tenant(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("tenant", value.parse().unwrap());
        h
    }

    #[test]
    fn a_hash_key_picks_its_instance_and_overflows_in_table_order() {
        let t = hashed("0").snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        let id = |e: Arc<crate::routing::Endpoint>| e.private_instance_id.clone();
        // The owners of GoRouter's table (see maglev.rs), whatever the zone preference says.
        for (key, owner) in [
            ("tenant-1", "instance-b"),
            ("tenant-3", "instance-a"),
            ("acme", "instance-c"),
        ] {
            for _ in 0..4 {
                let mut sel = pool
                    .selector()
                    .local_first(Some("z1"))
                    .hashing(&tenant(key));
                assert!(sel.is_hashed());
                assert_eq!(id(sel.next(|_| true).unwrap()), owner, "{key}");
            }
        }
        // Retries follow the table from the key's slot: b, c, a for tenant-1.
        let mut sel = pool.selector().hashing(&tenant("tenant-1"));
        let order: Vec<String> = std::iter::from_fn(|| sel.next(|_| true)).map(id).collect();
        assert_eq!(order, ["instance-b", "instance-c", "instance-a"]);
        // Not eligible (full, out of scope) or cooling down: the next one in the table.
        let next = |ok: &dyn Fn(&crate::routing::Endpoint) -> bool| {
            id(pool
                .selector()
                .hashing(&tenant("tenant-1"))
                .next(ok)
                .unwrap())
        };
        assert_eq!(
            next(&|e| e.private_instance_id != "instance-b"),
            "instance-c"
        );
        let b = pool
            .endpoints
            .iter()
            .find(|e| e.private_instance_id == "instance-b")
            .unwrap();
        b.mark_failed(Duration::from_secs(60));
        assert_eq!(next(&|_| true), "instance-c");
        assert_eq!(
            next(&|e| e.private_instance_id == "instance-b"),
            "instance-b",
            "only it left"
        );
        b.mark_answered();
        // No header, an empty one: the pool's rotation (every instance in turn).
        let mut all = std::collections::BTreeSet::new();
        for h in [http::HeaderMap::new(), tenant("")].iter().cycle().take(6) {
            let mut sel = pool.selector().hashing(h);
            assert!(!sel.is_hashed());
            all.insert(id(sel.next(|_| true).unwrap()));
        }
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn hash_balance_passes_over_an_instance_busier_than_the_average_allows() {
        let t = hashed("1.2").snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        let by_id = |id: &str| {
            pool.endpoints
                .iter()
                .find(|e| e.private_instance_id == id)
                .unwrap()
        };
        let first = |key: &str| {
            let mut sel = pool.selector().hashing(&tenant(key));
            sel.next(|_| true).unwrap().private_instance_id.clone()
        };
        let load = |a: usize, b: usize, c: usize| {
            for (id, n) in [("instance-a", a), ("instance-b", b), ("instance-c", c)] {
                by_id(id).active.store(n, Ordering::Relaxed);
            }
        };
        // b has 3 of 5 in flight: 3 / (5/3) = 1.8 > 1.2, so tenant-1 goes to c, the next in
        // b's table order; at 2 of 5 (1.2, not more) it stays.
        load(1, 3, 1);
        assert_eq!(first("tenant-1"), "instance-c");
        load(2, 2, 1);
        assert_eq!(first("tenant-1"), "instance-b");
        // b and c both over (1.5 each): a.
        load(0, 4, 4);
        assert_eq!(first("tenant-1"), "instance-a");
        // Every instance over is impossible with a balance of at least 1; below 1, the first
        // in table order is taken rather than none.
        let t = hashed("0.5").snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        pool.endpoints
            .iter()
            .for_each(|e| e.active.store(3, Ordering::Relaxed));
        let mut sel = pool.selector().hashing(&tenant("tenant-1"));
        assert_eq!(
            sel.next(|_| true).unwrap().private_instance_id,
            "instance-b"
        );
        load(0, 0, 0);
        // Nothing in flight: the owner, always.
        load(0, 0, 0);
        assert_eq!(first("tenant-1"), "instance-b");
        // Without a balance the owner takes any load.
        let t = hashed("0").snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        pool.endpoints.iter().for_each(|e| {
            e.active.store(
                if e.private_instance_id == "instance-b" {
                    50
                } else {
                    0
                },
                Ordering::Relaxed,
            )
        });
        let mut sel = pool.selector().hashing(&tenant("tenant-1"));
        assert_eq!(
            sel.next(|_| true).unwrap().private_instance_id,
            "instance-b"
        );
    }

    #[test]
    fn the_table_is_rebuilt_only_when_the_instances_change() {
        let mut s = hashed("0");
        let t1 = s.snapshot();
        // A heartbeat: same instances, same table.
        let r = ValidRegistration::try_from(Registration {
            uris: vec!["a.x".into()],
            host: Some("127.0.0.1".into()),
            port: Some(2),
            private_instance_id: Some("instance-b".into()),
            options: t1.lookup("a.x", "/").unwrap().options.clone(),
            ..Default::default()
        })
        .unwrap();
        s.register(&r, false, Duration::from_secs(9), Instant::now());
        let t2 = s.snapshot();
        let table = |t: &crate::routing::RouteTable| {
            t.lookup("a.x", "/")
                .unwrap()
                .hash
                .as_ref()
                .unwrap()
                .table
                .clone()
        };
        assert!(Arc::ptr_eq(&table(&t1), &table(&t2)));
        // instance-b leaves: a new table, where tenant-1 (b's) goes to c, as in GoRouter.
        s.unregister(&r);
        let t3 = s.snapshot();
        assert!(!Arc::ptr_eq(&table(&t2), &table(&t3)));
        let pool = t3.lookup("a.x", "/").unwrap();
        let mut sel = pool.selector().hashing(&tenant("tenant-1"));
        assert_eq!(
            sel.next(|_| true).unwrap().private_instance_id,
            "instance-c"
        );
        // Options without hash drop the table.
        let plain = ValidRegistration::try_from(Registration {
            options: Default::default(),
            ..r.raw.clone()
        })
        .unwrap();
        s.register(&plain, false, Duration::from_secs(9), Instant::now());
        assert!(s.snapshot().lookup("a.x", "/").unwrap().hash.is_none());
    }

    #[test]
    fn locally_optimistic_offers_the_own_zone_first_and_any_zone_after() {
        for lb in ["round-robin", "least-connection"] {
            let mut state = RegistryState::default();
            for (port, zone) in [(1, "z1"), (2, "z2"), (3, "z1"), (4, "z2")] {
                let r = endpoint(lb, port, Some(zone));
                state.register(&r, false, Duration::from_secs(9), Instant::now());
            }
            let t = state.snapshot();
            let pool = t.lookup("a.x", "/").unwrap();
            let first = |zone: Option<&str>, ok: &dyn Fn(u16) -> bool| {
                pool.selector()
                    .local_first(zone)
                    .next(|e| ok(e.port))
                    .map(|e| e.port)
            };
            let mut firsts = std::collections::BTreeSet::new();
            for _ in 0..8 {
                let p = first(Some("z1"), &|_| true).unwrap();
                assert!(p == 1 || p == 3, "{lb}: {p}");
                firsts.insert(p);
            }
            if lb == "round-robin" {
                assert_eq!(firsts.len(), 2, "both local endpoints take turns");
            }
            // Retries come from any zone, each endpoint once.
            let mut sel = pool.selector().local_first(Some("z1"));
            let order: Vec<u16> = std::iter::from_fn(|| sel.next(|_| true))
                .map(|e| e.port)
                .collect();
            assert_eq!(order.len(), 4, "{lb}: {order:?}");
            // No eligible local endpoint, or only cooling ones: another zone's answers.
            assert_eq!(first(Some("z1"), &|p| p == 2), Some(2));
            assert_eq!(first(Some("z9"), &|p| p == 4), Some(4));
            pool.endpoints[0].mark_failed(Duration::from_secs(60));
            pool.endpoints[2].mark_failed(Duration::from_secs(60));
            for _ in 0..4 {
                let p = first(Some("z1"), &|_| true).unwrap();
                assert!(p == 2 || p == 4, "{lb}: cooling local endpoints wait: {p}");
            }
            // Without the preference, every zone takes turns from the start.
            pool.endpoints[0].mark_answered();
            pool.endpoints[2].mark_answered();
            if lb == "round-robin" {
                let any: std::collections::BTreeSet<u16> =
                    (0..8).filter_map(|_| first(None, &|_| true)).collect();
                assert_eq!(any.len(), 4);
            }
        }
    }
}
