//! Any bytes as a request's path: building the path it is routed by never panics, never yields
//! a `.` or `..` segment or a slash spelled another way, and the route it leads to does not
//! depend on the case of its letters (routes match in any case, as GoRouter's do), so no
//! spelling of a path meets another route's policy than the path it means.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::routing_path;
use portcullis::registry::{Registration, ValidRegistration};
use portcullis::routing::{Pool, RegistryState, RouteTable};

const HOST: &str = "app.apps.identity";

/// A host with nested routes, some registered in capitals.
fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut state = RegistryState::default();
        let now = Instant::now();
        for (i, path) in ["", "/admin", "/Admin/Keys", "/api/v1", "/API/V2/x", "/é"]
            .into_iter()
            .enumerate()
        {
            let reg = ValidRegistration::try_from(Registration {
                uris: vec![format!("{HOST}{path}")],
                host: Some("127.0.0.1".into()),
                port: Some(9000 + i as u16),
                ..Default::default()
            })
            .expect("a valid registration");
            state.register(&reg, false, Duration::from_secs(60), now);
        }
        state.snapshot()
    })
}

fn same(a: Option<&Arc<Pool>>, b: Option<&Arc<Pool>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    // A request's path (`Uri::path`): it starts with `/` and holds no query or fragment.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if !raw.starts_with('/') || raw.contains(['?', '#']) {
        return;
    }
    let Some(path) = routing_path(raw) else {
        return;
    };
    assert!(
        !path.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} routed as {path:?}"
    );
    assert!(!path.contains('\\'), "{raw:?} routed as {path:?}");
    let table = table();
    let found = table.lookup(HOST, &path);
    // The root route catches every path.
    let pool = found.expect("the root route matches every path");
    for other in [path.to_ascii_lowercase(), path.to_ascii_uppercase()] {
        assert!(
            same(Some(pool), table.lookup(HOST, &other)),
            "{path:?} and {other:?} meet different routes"
        );
    }
    // The route is the longest registered prefix of the path, on a segment boundary.
    let lower = path.to_ascii_lowercase();
    let prefix = pool.key.path.as_str();
    let at_boundary = |p: &str| {
        lower.starts_with(p) && matches!(lower.as_bytes().get(p.len()), None | Some(b'/'))
    };
    assert!(
        prefix.is_empty() || at_boundary(prefix),
        "{path:?} routed to {prefix:?}"
    );
    for longer in table.pools().iter().map(|p| p.key.path.as_str()) {
        assert!(
            longer.len() <= prefix.len() || !at_boundary(longer),
            "{path:?} routed to {prefix:?}, not {longer:?}"
        );
    }
});
