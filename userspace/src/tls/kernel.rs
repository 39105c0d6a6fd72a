//! Kernel TLS (SPEC §5): after the rustls handshake, record encryption moves into the kernel
//! where it supports the TLS ULP and the negotiated cipher suite.
//!
//! The probe runs once at start. Each connection is then accepted on a [`ktls::CorkStream`] so
//! rustls stops reading exactly at a record boundary, and handed to the kernel with
//! [`super::kstream`]. A suite the kernel cannot take stays in userspace rustls.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ktls::CompatibleCiphers;
use rustls::SupportedCipherSuite;

use crate::config::KtlsMode;

/// What the start-up probe found.
pub struct KernelTls {
    ciphers: CompatibleCiphers,
}

impl KernelTls {
    /// Whether the kernel can take a connection that negotiated `suite`.
    pub fn supports(&self, suite: Option<SupportedCipherSuite>) -> bool {
        suite.is_some_and(|s| self.ciphers.is_compatible(s))
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
        Ok(()) => match CompatibleCiphers::new().await {
            Err(e) => Err(format!("cipher probe failed: {e}")),
            Ok(ciphers) if !any(&ciphers) => {
                Err("the TLS ULP loads but takes none of the AES-GCM/ChaCha20 suites".into())
            }
            Ok(ciphers) => Ok(ciphers),
        },
    };
    match (found, mode) {
        (Ok(ciphers), _) => {
            tracing::info!(
                tls13 = ?ciphers.tls13,
                tls12 = ?ciphers.tls12,
                "kernel TLS available: established connections move their record crypto into the kernel"
            );
            Ok(Some(Arc::new(KernelTls { ciphers })))
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

fn any(c: &CompatibleCiphers) -> bool {
    [&c.tls12, &c.tls13]
        .iter()
        .any(|v| v.aes_gcm_128 || v.aes_gcm_256 || v.chacha20_poly1305)
}

/// Sets the `tls` upper-layer protocol on a connected loopback socket, as every kTLS connection
/// will. Fails with ENOENT when the kernel has no TLS support (`CONFIG_TLS` off, module absent).
async fn ulp_available() -> Result<(), String> {
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
    Ok(())
}
