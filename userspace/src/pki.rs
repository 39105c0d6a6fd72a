//! Throwaway PKIs for the embedded demo and the tests, made with rcgen.
//!
//! Instance-identity certificates need a subject rcgen cannot write: several OUs, and in Diego's
//! shape all three in one multi-valued RDN. [`Ca::client`] therefore lets rcgen make and sign the
//! certificate, replaces the subject in the to-be-signed part and signs that again with the same
//! rcgen issuer key.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SigningKey,
};
use rustls_pki_types::CertificateDer;

/// An attribute of a subject RDN.
#[derive(Clone, Copy, Debug)]
pub enum Attr<'a> {
    Cn(&'a str),
    Ou(&'a str),
    O(&'a str),
}

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// 2020 to 2060.
    Current,
    /// Ended in 2021.
    Expired,
    /// Starts in 2090.
    NotYetValid,
    /// From and to these Unix times (seconds), e.g. one that expires next week.
    Unix(u64, u64),
}

/// A certificate and its key, in PEM, with the issuing chain.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// Leaf followed by every intermediate (not the root): what a client presents.
    pub chain_pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate authority that can issue leaves and intermediates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub der: CertificateDer<'static>,
    /// PEM of this CA's intermediates up to (not including) the root.
    chain_pem: String,
}

/// Failure to make a certificate; only the demo start-up and tests make them.
pub type PkiError = rcgen::Error;

fn validity(params: &mut CertificateParams, v: Validity) {
    let (from, to) = match v {
        Validity::Current => ((2020, 1, 1), (2060, 1, 1)),
        Validity::Expired => ((2019, 1, 1), (2021, 1, 1)),
        Validity::NotYetValid => ((2090, 1, 1), (2095, 1, 1)),
        Validity::Unix(from, to) => {
            let epoch = date_time_ymd(1970, 1, 1);
            params.not_before = epoch + std::time::Duration::from_secs(from);
            params.not_after = epoch + std::time::Duration::from_secs(to);
            return;
        }
    };
    params.not_before = date_time_ymd(from.0, from.1, from.2);
    params.not_after = date_time_ymd(to.0, to.1, to.2);
}

fn ca_params(cn: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, Validity::Current);
    Ok(p)
}

impl Ca {
    /// A self-signed root.
    pub fn root(cn: &str) -> Result<Ca, PkiError> {
        Self::root_valid(cn, Validity::Current)
    }

    /// A self-signed root valid for `v`.
    pub fn root_valid(cn: &str, v: Validity) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(cn)?;
        validity(&mut params, v);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            chain_pem: String::new(),
        })
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, cn: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(cn)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
        })
    }

    /// A server certificate for DNS names and IP addresses.
    pub fn server(&self, names: &[&str]) -> Result<Leaf, PkiError> {
        self.server_valid(names, Validity::Current)
    }

    /// A server certificate valid for `v`.
    pub fn server_valid(&self, names: &[&str], v: Validity) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, v);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(self.leaf(cert.der().clone(), key))
    }

    /// A client certificate whose subject is exactly `rdns`: each inner slice is one RDN, so
    /// `&[&[Cn(..)], &[Ou(app), Ou(space), Ou(org)]]` is Diego's multi-valued shape.
    pub fn client(&self, rdns: &[&[Attr<'_>]], v: Validity) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "placeholder");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, v);
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = with_subject(cert.der(), &encode_name(rdns), self.issuer.key())?;
        Ok(self.leaf(CertificateDer::from(der), key))
    }

    fn leaf(&self, der: CertificateDer<'static>, key: KeyPair) -> Leaf {
        let cert_pem = pem("CERTIFICATE", &der);
        Leaf {
            chain_pem: format!("{cert_pem}{}", self.chain_pem),
            cert_pem,
            key_pem: key.serialize_pem(),
            der,
        }
    }
}

/// The PEM text of one DER block.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Splits DER into its top-level TLVs (whole encodings).
fn elements(mut buf: &[u8]) -> Result<Vec<&[u8]>, PkiError> {
    let bad = || rcgen::Error::CouldNotParseCertificate;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let first = *buf.get(1).ok_or_else(bad)? as usize;
        let (hdr, len) = if first < 0x80 {
            (2, first)
        } else {
            let n = first & 0x7f;
            let bytes = buf.get(2..2 + n).ok_or_else(bad)?;
            (
                2 + n,
                bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize),
            )
        };
        let total = hdr + len;
        out.push(buf.get(..total).ok_or_else(bad)?);
        buf = &buf[total..];
    }
    Ok(out)
}

fn content(tlv: &[u8]) -> Result<&[u8], PkiError> {
    let first = *tlv.get(1).ok_or(rcgen::Error::CouldNotParseCertificate)? as usize;
    let hdr = if first < 0x80 { 2 } else { 2 + (first & 0x7f) };
    tlv.get(hdr..).ok_or(rcgen::Error::CouldNotParseCertificate)
}

fn encode_name(rdns: &[&[Attr<'_>]]) -> Vec<u8> {
    let mut name = Vec::new();
    for rdn in rdns {
        let mut set = Vec::new();
        for attr in *rdn {
            let (oid, value): (&[u8], &str) = match attr {
                Attr::Cn(v) => (&[0x55, 0x04, 0x03], v),
                Attr::Ou(v) => (&[0x55, 0x04, 0x0b], v),
                Attr::O(v) => (&[0x55, 0x04, 0x0a], v),
            };
            let mut atv = tlv(0x06, oid);
            atv.extend(tlv(0x0c, value.as_bytes()));
            set.extend(tlv(0x30, &atv));
        }
        name.extend(tlv(0x31, &set));
    }
    tlv(0x30, &name)
}

/// Replaces a certificate's subject and signs the new to-be-signed part with `key`.
fn with_subject(cert: &[u8], subject: &[u8], key: &KeyPair) -> Result<Vec<u8>, PkiError> {
    let outer = elements(content(cert)?)?;
    let [tbs, alg, _sig] = outer[..] else {
        return Err(rcgen::Error::CouldNotParseCertificate);
    };
    let mut fields = elements(content(tbs)?)?;
    // version [0], serial, signature, issuer, validity, subject, …
    let subject_index = if fields.first().is_some_and(|f| f[0] == 0xa0) {
        5
    } else {
        4
    };
    if fields.len() <= subject_index {
        return Err(rcgen::Error::CouldNotParseCertificate);
    }
    fields[subject_index] = subject;
    let new_tbs = tlv(0x30, &fields.concat());
    let signature = key.sign(&new_tbs)?;
    let mut bits = vec![0u8];
    bits.extend(signature);
    let mut body = new_tbs;
    body.extend_from_slice(alg);
    body.extend(tlv(0x03, &bits));
    Ok(tlv(0x30, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentityError, PeerCert};

    #[test]
    fn diego_multi_valued_rdn_gives_identity() {
        let root = Ca::root("root").unwrap();
        let ica = root.intermediate("instanceIdentityCA").unwrap();
        let leaf = ica
            .client(
                &[
                    &[Attr::Cn("inst-1")],
                    &[
                        Attr::Ou("organization:O1"),
                        Attr::Ou("space:S1"),
                        Attr::Ou("app:A"),
                    ],
                ],
                Validity::Current,
            )
            .unwrap();
        let peer = PeerCert::from_der(&leaf.der);
        let id = peer.identity.unwrap();
        assert_eq!(
            (id.app.as_str(), id.space.as_deref(), id.org.as_deref()),
            ("A", Some("S1"), Some("O1"))
        );
        assert_eq!(
            peer.envoy_subject,
            "CN=inst-1,OU=organization:O1,OU=space:S1,OU=app:A"
        );
    }

    #[test]
    fn conflicting_or_missing_ous_give_no_identity() {
        let ca = Ca::root("root").unwrap();
        let conflict = ca
            .client(
                &[&[Attr::Cn("x")], &[Attr::Ou("app:A")], &[Attr::Ou("app:B")]],
                Validity::Current,
            )
            .unwrap();
        assert_eq!(
            PeerCert::from_der(&conflict.der).identity,
            Err(IdentityError::Conflict("app"))
        );
        let none = ca
            .client(&[&[Attr::Cn("x"), Attr::O("acme")]], Validity::Current)
            .unwrap();
        assert_eq!(
            PeerCert::from_der(&none.der).identity,
            Err(IdentityError::NoApp)
        );
        let empty = ca
            .client(
                &[
                    &[Attr::Ou("app:A")],
                    &[Attr::Ou("space:")],
                    &[Attr::Ou("app:A")],
                ],
                Validity::Current,
            )
            .unwrap();
        let id = PeerCert::from_der(&empty.der).identity.unwrap();
        assert_eq!(id.space, None);
    }
}
