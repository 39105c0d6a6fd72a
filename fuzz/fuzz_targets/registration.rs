//! Any bytes on `router.register` / `router.unregister`: decoding never panics, and whatever
//! decodes can be registered, looked up (by hash too, when the route asks for hash-based
//! routing: the header's value is the input's first bytes) and unregistered without panicking
//! either.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use portcullis::registry::nats::decode_message;
use portcullis::routing::RegistryState;

fuzz_target!(|data: &[u8]| {
    let Ok(reg) = decode_message(data) else {
        return;
    };
    let mut state = RegistryState::default();
    state.register(&reg, false, Duration::from_secs(1), Instant::now());
    let table = state.snapshot();
    for key in &reg.keys {
        let pool = table
            .lookup(&key.host, &key.path)
            .expect("a registered key is routable");
        let mut headers = http::HeaderMap::new();
        if let Some(h) = &pool.hash {
            let value = &data[..data.len().min(24)];
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                headers.insert(h.header.clone(), v);
            }
        }
        let mut sel = pool.selector().hashing(&headers);
        assert!(sel.next(|_| true).is_some());
        assert!(sel.next(|_| true).is_none(), "one endpoint, offered once");
    }
    state.unregister(&reg);
    assert_eq!(state.snapshot().endpoint_count(), 0);
});
