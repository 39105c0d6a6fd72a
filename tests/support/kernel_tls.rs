//! What the kernel says about its TLS: `/proc/net/tls_stat` and the AES-GCM it picked.

use std::collections::BTreeMap;

/// `/proc/net/tls_stat` as name → value (empty when the kernel has no TLS).
pub fn tls_stat() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// How much one `tls_stat` counter grew between two readings (a counter absent counts as 0).
pub fn stat_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, k: &str) -> u64 {
    after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)
}

/// The kernel's `gcm(aes)` driver, as the gateway's kTLS probe reads it from `/proc/crypto`
/// (listed once something has used it).
pub fn gcm_aes_driver() -> Option<String> {
    std::fs::read_to_string("/proc/crypto")
        .ok()
        .and_then(|c| portcullis::tls::gcm_aes_driver(&c))
}
