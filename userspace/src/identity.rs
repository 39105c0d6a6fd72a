//! Caller identity from the verified leaf certificate (SPEC §7).
//!
//! Only the certificate this connection verified is ever read: no request header can supply or
//! change an identity (SPEC §13).

use std::sync::OnceLock;

use http::HeaderValue;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

/// The app, space and org named by a caller's instance-identity certificate.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    /// `OU=app:<guid>`; always present.
    pub app: String,
    /// `OU=space:<guid>`, when present and not empty.
    pub space: Option<String>,
    /// `OU=organization:<guid>`, when present and not empty.
    pub org: Option<String>,
}

/// Why a verified certificate yields no identity. The caller is at fault in every case.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate could not be parsed: {0}")]
    Unparsable(String),
    #[error("certificate has no 'app:' OU")]
    NoApp,
    #[error("certificate has conflicting '{0}' OUs")]
    Conflict(&'static str),
}

/// What a connection knows about its peer certificate, computed once after the handshake.
#[derive(Clone, Debug)]
pub struct PeerCert {
    /// The leaf's DER bytes, for XFCC.
    pub der: Vec<u8>,
    /// The caller's identity, or why there is none.
    pub identity: Result<Identity, IdentityError>,
    /// The subject in XFCC envoy order: CN, each OU in certificate order, then O, L, ST, C.
    pub envoy_subject: String,
    /// The XFCC header value in each format (raw, envoy), made on first use: every request on the
    /// connection carries the same one.
    pub xfcc: [OnceLock<Option<HeaderValue>>; 2],
}

impl PeerCert {
    /// Parses a verified leaf certificate. Never fails: an unparsable certificate gives no identity.
    pub fn from_der(der: &[u8]) -> Self {
        match X509Certificate::from_der(der) {
            Ok((_, cert)) => PeerCert {
                der: der.to_vec(),
                identity: identity_of(cert.subject()),
                envoy_subject: envoy_subject(cert.subject()),
                xfcc: Default::default(),
            },
            Err(e) => PeerCert {
                der: der.to_vec(),
                identity: Err(IdentityError::Unparsable(e.to_string())),
                envoy_subject: String::new(),
                xfcc: Default::default(),
            },
        }
    }

    /// Lowercase hex SHA-256 of the leaf DER.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }
}

fn identity_of(subject: &X509Name<'_>) -> Result<Identity, IdentityError> {
    let mut app = None;
    let mut space = None;
    let mut org = None;
    for ou in subject.iter_organizational_unit() {
        let Ok(value) = ou.as_str() else { continue };
        let (slot, name, v) = if let Some(v) = value.strip_prefix("app:") {
            (&mut app, "app", v)
        } else if let Some(v) = value.strip_prefix("space:") {
            (&mut space, "space", v)
        } else if let Some(v) = value.strip_prefix("organization:") {
            (&mut org, "organization", v)
        } else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        match slot {
            Some(existing) if existing != v => return Err(IdentityError::Conflict(name)),
            Some(_) => {}
            None => *slot = Some(v.to_string()),
        }
    }
    Ok(Identity {
        app: app.ok_or(IdentityError::NoApp)?,
        space,
        org,
    })
}

fn envoy_subject(subject: &X509Name<'_>) -> String {
    let mut parts = Vec::new();
    let mut push = |key: &str, iter: &mut dyn Iterator<Item = &AttributeTypeAndValue<'_>>| {
        for attr in iter {
            if let Ok(v) = attr.as_str() {
                parts.push(format!("{key}={v}"));
            }
        }
    };
    push("CN", &mut subject.iter_common_name());
    push("OU", &mut subject.iter_organizational_unit());
    push("O", &mut subject.iter_organization());
    push("L", &mut subject.iter_locality());
    push("ST", &mut subject.iter_state_or_province());
    push("C", &mut subject.iter_country());
    parts.join(",")
}
