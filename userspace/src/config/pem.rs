//! Loading PEM certificates and keys, with one clear message per failure.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

use crate::names::DomainPattern;

/// When one certificate the config loaded is valid, for the expiry checks (metric and warnings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertValidity {
    /// The config key and the certificate's place in its file: `domains[0].ca_certs[1]`.
    pub key: String,
    /// The file as the config names it.
    pub file: String,
    /// The Subject, as `CN=…, OU=…`.
    pub subject: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// The validity of every certificate in `certs`, keyed `{key}[{i}]`. Every one parsed already
/// ([`parse_certs`] checks), so none is skipped in practice.
pub fn validity(key: &str, file: &str, certs: &[CertificateDer<'_>]) -> Vec<CertValidity> {
    certs
        .iter()
        .enumerate()
        .filter_map(|(i, der)| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let v = cert.validity();
            Some(CertValidity {
                key: format!("{key}[{i}]"),
                file: file.to_string(),
                subject: cert.subject().to_string(),
                not_before: v.not_before.timestamp(),
                not_after: v.not_after.timestamp(),
            })
        })
        .collect()
}

/// A server or client certificate with its key, ready for rustls.
pub struct CertFile {
    pub key: Arc<CertifiedKey>,
    /// DNS and IP SANs of the leaf, normalised.
    pub dns_names: Vec<DomainPattern>,
}

fn read(base: &Path, rel: &str) -> Result<Vec<u8>, String> {
    let path = base.join(rel);
    std::fs::read(&path).map_err(|e| format!("cannot read '{}': {e}", path.display()))
}

/// Reads every CERTIFICATE block of a PEM file (relative to `base`); at least one is required.
pub fn load_certs(base: &Path, rel: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(base, rel)?;
    parse_certs(&bytes).map_err(|e| format!("'{rel}': {e}"))
}

/// Parses every CERTIFICATE block of PEM text; at least one is required, each valid X.509.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = X509Certificate::from_der(c) {
            return Err(format!("certificate #{} is not valid X.509: {e}", i + 1));
        }
    }
    Ok(certs)
}

/// Loads a chain and its private key and checks that they belong together. On failure the first
/// element names the field at fault (`cert_chain` or `private_key`).
pub fn load_certified_key(
    base: &Path,
    chain: &str,
    key: &str,
) -> Result<CertFile, (&'static str, String)> {
    let certs = load_certs(base, chain).map_err(|e| ("cert_chain", e))?;
    let key_bytes = read(base, key).map_err(|e| ("private_key", e))?;
    let der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        (
            "private_key",
            format!("'{key}': no usable private key: {e}"),
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| {
        (
            "private_key",
            format!("'{key}': unsupported private key: {e}"),
        )
    })?;
    let ck = CertifiedKey::new(certs, signing);
    if let Err(e) = ck.keys_match() {
        if !matches!(
            e,
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)
        ) {
            return Err((
                "private_key",
                format!("'{key}' does not match the certificate in '{chain}'"),
            ));
        }
    }
    let dns_names = san_patterns(&ck.cert[0]);
    Ok(CertFile {
        key: Arc::new(ck),
        dns_names,
    })
}

fn san_patterns(leaf: &CertificateDer<'_>) -> Vec<DomainPattern> {
    let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => DomainPattern::parse(d).ok(),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(DomainPattern::Exact(
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string(),
                )),
                16 => Some(DomainPattern::Exact(
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string(),
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
