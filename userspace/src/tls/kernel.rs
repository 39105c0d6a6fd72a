//! Kernel TLS (SPEC §5): after the rustls handshake, record encryption moves into the kernel
//! where it supports the TLS ULP and every cipher suite the gateway offers.
//!
//! The probe runs once at start. Each connection's handshake then runs on rustls' unbuffered API
//! ([`super::unbuffered`]) and the connection is handed to the kernel with [`super::kstream`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ktls::CompatibleCiphers;
use rustls::CipherSuite;

use crate::config::KtlsMode;

/// What the start-up probe found: the kernel takes every suite the gateway may negotiate.
pub struct KernelTls {
    rekeys: bool,
    /// Records a connection sends under one key before it updates the key (or, where it cannot,
    /// ends), when lower than the cipher suite's confidentiality limit.
    record_cap: AtomicU64,
}

impl KernelTls {
    fn new(rekeys: bool) -> Self {
        Self {
            rekeys,
            record_cap: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether kernel connections follow TLS 1.3 KeyUpdates (Linux 6.14 and later); where not, a
    /// peer's KeyUpdate ends its connection (see [`super::kstream`]).
    pub fn follows_key_updates(&self) -> bool {
        self.rekeys
    }

    /// Whether a connection can replace its own send keys when they have encrypted as many
    /// records as the cipher suite allows: TLS 1.3 on a kernel that rekeys.
    pub(super) fn updates_send_keys(&self, suite: rustls::SupportedCipherSuite) -> bool {
        self.rekeys && suite.tls13().is_some()
    }

    /// How many records a connection with `suite` may send under one key: the suite's
    /// confidentiality limit (2^24 for AES-GCM; ChaCha20-Poly1305 has none that matters), as rustls
    /// enforces for the connections it encrypts itself, or a lower cap.
    pub(super) fn record_limit(&self, suite: rustls::SupportedCipherSuite) -> u64 {
        let common = match suite {
            rustls::SupportedCipherSuite::Tls12(s) => &s.common,
            rustls::SupportedCipherSuite::Tls13(s) => &s.common,
        };
        common
            .confidentiality_limit
            .min(self.record_cap.load(Ordering::Relaxed))
    }

    /// Caps the records sent under one key below the cipher suite's limit, for connections
    /// moved into the kernel from now on. The limit is millions of records; tests lower it to
    /// reach it.
    #[doc(hidden)]
    pub fn cap_records_per_key(&self, records: u64) {
        self.record_cap.store(records, Ordering::Relaxed);
    }
}

/// Probes the kernel per `tls.ktls` and says once what was chosen. `Err` (only with `on`) when
/// the kernel cannot do it.
pub async fn probe(mode: KtlsMode) -> Result<Option<Arc<KernelTls>>, String> {
    if mode == KtlsMode::Off {
        tracing::info!("kernel TLS off (tls.ktls: off); TLS records stay in userspace rustls");
        return Ok(None);
    }
    let found = match ulp_available().await {
        Err(why) => Err(why),
        Ok(rekeys) => match CompatibleCiphers::new().await {
            Err(e) => Err(format!("cipher probe failed: {e}")),
            Ok(ciphers) => match missing(&ciphers) {
                Some(missing) => Err(format!(
                    "the TLS ULP loads but does not take {missing}, which clients may negotiate"
                )),
                None => Ok((ciphers, rekeys)),
            },
        },
    };
    // The cipher probe set AES-GCM keys, so the kernel has picked its gcm(aes) implementation.
    let slow_aes = std::fs::read_to_string("/proc/crypto")
        .ok()
        .and_then(|c| gcm_aes_driver(&c))
        .filter(|d| unaccelerated(d));
    let found = judge_aes(found, slow_aes, mode);
    match (found, mode) {
        (Ok((ciphers, rekeys)), _) => {
            tracing::info!(
                tls13 = ?ciphers.tls13,
                tls12 = ?ciphers.tls12,
                key_updates = if rekeys {
                    "followed"
                } else {
                    "end the connection (the kernel cannot replace kTLS keys before Linux 6.14)"
                },
                "kernel TLS available: established connections move their record crypto into the kernel"
            );
            Ok(Some(Arc::new(KernelTls::new(rekeys))))
        }
        (Err(why), KtlsMode::On) => Err(format!("tls.ktls is on but {why}")),
        (Err(why), _) => {
            tracing::info!(
                reason = %why,
                "kernel TLS unavailable; TLS records stay in userspace rustls"
            );
            Ok(None)
        }
    }
}

/// With `auto`, a kernel whose AES-GCM is not the CPU's accelerated code ([`unaccelerated`]) is
/// not used: rustls on the CPU's AES instructions costs less. With `on` it is, with a warning.
/// `slow_aes` names the kernel's driver when it is such code.
fn judge_aes<T>(
    found: Result<T, String>,
    slow_aes: Option<String>,
    mode: KtlsMode,
) -> Result<T, String> {
    match (found, slow_aes) {
        (Ok(_), Some(driver)) if mode == KtlsMode::Auto => Err(format!(
            "the kernel's AES-GCM is not the CPU's accelerated code ({driver}), several times \
             the CPU of rustls' (load the CPU's AES module, aesni_intel on x86, or set \
             tls.ktls: on to use it anyway)"
        )),
        (Ok(found), Some(driver)) => {
            tracing::warn!(
                %driver,
                "tls.ktls is on but the kernel's AES-GCM is not the CPU's accelerated code, \
                 several times the CPU of rustls' (load the CPU's AES module, aesni_intel on x86)"
            );
            Ok(found)
        }
        (found, _) => found,
    }
}

/// The driver the kernel's crypto API uses for `gcm(aes)`: the highest priority of that name in
/// `/proc/crypto` (listed once something has used it), as `driver (priority N)`.
pub fn gcm_aes_driver(proc_crypto: &str) -> Option<String> {
    let mut best: Option<(u32, &str)> = None;
    for entry in proc_crypto.split("\n\n") {
        let field = |k: &str| {
            entry.lines().find_map(|l| {
                let (key, v) = l.split_once(':')?;
                (key.trim() == k).then_some(v.trim())
            })
        };
        if field("name") != Some("gcm(aes)") {
            continue;
        }
        let (Some(driver), Some(priority)) = (field("driver"), field("priority")) else {
            continue;
        };
        let priority = priority.parse().unwrap_or(0);
        if best.is_none_or(|(p, _)| priority > p) {
            best = Some((priority, driver));
        }
    }
    best.map(|(p, d)| format!("{d} (priority {p})"))
}

/// Whether a `gcm(aes)` driver works a block at a time in C instead of with the CPU's pipelined
/// AES-GCM code: Debian 6.1 without `aesni_intel` builds `gcm_base(ctr(aes-generic),…)` (7.2×
/// the instructions per MiB of userspace rustls, against 0.8× with `generic-gcm-aesni`), 7.3
/// without it `gcm-aes-lib` (2.5×; docs/benchmarks.md, `cargo xtask vm-bench`). x86's AES-NI
/// driver is named `generic-gcm-aesni…` ("generic" as opposed to RFC 4106), so the whole names
/// matter.
fn unaccelerated(driver: &str) -> bool {
    ["aes-generic", "ghash-generic", "gcm-aes-lib"]
        .iter()
        .any(|slow| driver.contains(slow))
}

/// The cipher suites the gateway offers that the kernel cannot take, if any. A connection is
/// handed to the kernel only after its handshake, so every suite it may negotiate must fit.
fn missing(c: &CompatibleCiphers) -> Option<String> {
    let missing: Vec<String> = super::server::provider()
        .cipher_suites
        .iter()
        .filter(|s| !kernel_takes(c, s.suite()))
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether the kernel takes `suite`: what matters is the TLS version and the AEAD. (The `ktls`
/// crate's own table leaves out the TLS 1.2 ECDHE_RSA suites, which use the same AEADs.)
fn kernel_takes(c: &CompatibleCiphers, suite: CipherSuite) -> bool {
    use CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256 => c.tls13.aes_gcm_128,
        S::TLS13_AES_256_GCM_SHA384 => c.tls13.aes_gcm_256,
        S::TLS13_CHACHA20_POLY1305_SHA256 => c.tls13.chacha20_poly1305,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            c.tls12.aes_gcm_128
        }
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            c.tls12.aes_gcm_256
        }
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => c.tls12.chacha20_poly1305,
        _ => false,
    }
}

/// Sets the `tls` upper-layer protocol on a connected loopback socket, as every kTLS connection
/// will. Fails with ENOENT when the kernel has no TLS support (`CONFIG_TLS` off, module absent).
/// Then finds out on the same socket whether the kernel can replace its keys.
async fn ulp_available() -> Result<bool, String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| format!("probe socket: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let client = client.map_err(|e| format!("probe connect: {e}"))?;
    // The peer stays open until the option is set: the ULP needs an established connection.
    let _peer = accepted.map_err(|e| format!("probe accept: {e}"))?;
    let name = b"tls";
    // SAFETY: a plain setsockopt on a socket we own, with a valid buffer and length.
    let r = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!(
            "the kernel has no TLS upper-layer protocol (setsockopt TCP_ULP \"tls\": {})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(super::kstream::kernel_rekeys(client.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    /// `/proc/crypto` as Debian's 6.1 shows it without and with `aesni_intel` loaded (excerpts
    /// of what the VMs of `cargo xtask vm-bench` listed).
    const GENERIC: &str = concat!(
        "name         : gcm(aes)\n",
        "driver       : gcm_base(ctr(aes-generic),ghash-clmulni)\n",
        "module       : gcm\n",
        "priority     : 250\n",
        "type         : aead\n\n",
        "name         : aes\n",
        "driver       : aes-generic\n",
        "priority     : 100\n",
    );
    const AESNI: &str = concat!(
        "name         : gcm(aes)\n",
        "driver       : generic-gcm-aesni\n",
        "module       : aesni_intel\n",
        "priority     : 400\n",
        "type         : aead\n\n",
        "name         : gcm(aes)\n",
        "driver       : gcm_base(ctr(aes-generic),ghash-clmulni)\n",
        "module       : gcm\n",
        "priority     : 250\n",
    );

    #[test]
    fn the_kernels_gcm_aes_is_the_highest_priority_driver() {
        let generic = super::gcm_aes_driver(GENERIC).unwrap();
        assert_eq!(
            generic,
            "gcm_base(ctr(aes-generic),ghash-clmulni) (priority 250)"
        );
        assert!(super::unaccelerated(&generic));
        let aesni = super::gcm_aes_driver(AESNI).unwrap();
        assert_eq!(aesni, "generic-gcm-aesni (priority 400)");
        assert!(!super::unaccelerated(&aesni));
        assert!(!super::unaccelerated(
            "generic-gcm-aesni-avx (priority 500)"
        ));
        assert!(!super::unaccelerated("gcm-aes-ce (priority 300)"));
        assert!(super::unaccelerated("gcm-aes-lib (priority 110)"));
        assert_eq!(
            super::gcm_aes_driver("name : aes\ndriver : aes-generic\n"),
            None
        );
    }

    #[test]
    fn auto_leaves_a_kernel_without_accelerated_aes_on_keeps_it() {
        use crate::config::KtlsMode;
        let slow_aes = || Some("gcm-aes-lib (priority 110)".into());
        let why = super::judge_aes(Ok(()), slow_aes(), KtlsMode::Auto).unwrap_err();
        assert!(
            why.contains("accelerated code (gcm-aes-lib (priority 110))")
                && why.contains("aesni_intel"),
            "{why}"
        );
        assert_eq!(super::judge_aes(Ok(()), slow_aes(), KtlsMode::On), Ok(()));
        assert_eq!(super::judge_aes(Ok(()), None, KtlsMode::Auto), Ok(()));
        let missing = Err::<(), _>("no ULP".to_string());
        assert_eq!(
            super::judge_aes(missing, slow_aes(), KtlsMode::Auto),
            Err("no ULP".into())
        );
    }

    use super::KernelTls;
    use rustls::crypto::ring::cipher_suite as suite;

    #[test]
    fn record_limit_is_the_suites_confidentiality_limit_or_the_cap() {
        let k = KernelTls::new(true);
        assert_eq!(k.record_limit(suite::TLS13_AES_128_GCM_SHA256), 1 << 24);
        assert_eq!(k.record_limit(suite::TLS13_AES_256_GCM_SHA384), 1 << 24);
        assert_eq!(
            k.record_limit(suite::TLS13_CHACHA20_POLY1305_SHA256),
            u64::MAX
        );
        assert_eq!(
            k.record_limit(suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            1 << 24
        );
        k.cap_records_per_key(16);
        assert_eq!(k.record_limit(suite::TLS13_AES_128_GCM_SHA256), 16);
        assert_eq!(k.record_limit(suite::TLS13_CHACHA20_POLY1305_SHA256), 16);
    }

    #[test]
    fn only_tls13_on_a_rekeying_kernel_updates_its_send_keys() {
        let (new, old) = (KernelTls::new(true), KernelTls::new(false));
        assert!(new.updates_send_keys(suite::TLS13_AES_128_GCM_SHA256));
        assert!(!new.updates_send_keys(suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
        assert!(!old.updates_send_keys(suite::TLS13_AES_128_GCM_SHA256));
    }
}
