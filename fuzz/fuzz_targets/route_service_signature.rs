//! Any bytes as the `X-CF-Proxy-Signature` and `X-CF-Proxy-Metadata` of a request that says it
//! came back from a route service (the two split at the first NUL): checking them never
//! panics, and nothing but a signature made with the secret opens. Any bytes as a forwarded URL
//! come back unchanged from a signature made for them.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use portcullis::config::RouteServices;
use portcullis::proxy::route_service::{Signer, X_CF_PROXY_METADATA, X_CF_PROXY_SIGNATURE};

fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        Signer::new(&RouteServices {
            secret_decrypt_only: Some("previous".into()),
            ..RouteServices::new("my-route-services-secret")
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_252_000);
    let (sig, meta) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let mut headers = http::HeaderMap::new();
    if let (Ok(s), Ok(m)) = (
        http::HeaderValue::from_bytes(sig),
        http::HeaderValue::from_bytes(meta),
    ) {
        headers.insert(X_CF_PROXY_SIGNATURE, s);
        headers.insert(X_CF_PROXY_METADATA, m);
        // A forged signature opening would be a break of AES-GCM, not a fuzzing find. (The
        // seed made in Python is a real signature, long expired at `now`.)
        assert!(signer().verify(&headers, now).is_err());
    }
    if let Ok(url) = std::str::from_utf8(data) {
        let (s, m) = signer().sign(url, now);
        let mut headers = http::HeaderMap::new();
        headers.insert(X_CF_PROXY_SIGNATURE, s.parse().unwrap());
        headers.insert(X_CF_PROXY_METADATA, m.parse().unwrap());
        assert_eq!(signer().verify(&headers, now).unwrap(), url);
    }
});
