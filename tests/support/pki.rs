//! The test PKI, written to a folder the test config points at.

use std::path::Path;

use portcullis::pki::{Attr, Ca, Leaf, Validity};

pub const ORG1: &str = "org-1";
pub const ORG2: &str = "org-2";
pub const SPACE1: &str = "space-1";
pub const SPACE2: &str = "space-2";
pub const APP_A: &str = "app-a";
pub const APP_B: &str = "app-b";
pub const APP_C: &str = "app-c";

/// Every certificate the tests use.
pub struct TestPki {
    pub server_ca: Ca,
    pub identity_root: Ca,
    pub backend_ca: Ca,
    /// app A in space 1 of org 1, Diego shape (one multi-valued RDN).
    pub a: Leaf,
    /// app C in space 1 of org 1, three separate OU RDNs.
    pub c: Leaf,
    /// app B in space 2 of org 2.
    pub b: Leaf,
    /// app A with a space but no org OU.
    pub a_orgless: Leaf,
    /// valid chain, no OU at all.
    pub no_ou: Leaf,
    /// two different app OUs.
    pub conflicting: Leaf,
    /// app A, expired.
    pub expired: Leaf,
    /// app A, issued by a CA the gateway does not trust.
    pub wrong_ca: Leaf,
}

fn diego(ca: &Ca, app: &str, space: &str, org: &str, v: Validity) -> Leaf {
    let (a, s, o) = (
        format!("app:{app}"),
        format!("space:{space}"),
        format!("organization:{org}"),
    );
    ca.client(
        &[
            &[Attr::Cn("instance")],
            &[Attr::Ou(&o), Attr::Ou(&s), Attr::Ou(&a)],
        ],
        v,
    )
    .expect("client cert")
}

impl TestPki {
    pub fn new() -> Self {
        let server_ca = Ca::root("test server CA").unwrap();
        let identity_root = Ca::root("test identity root").unwrap();
        let ica = identity_root.intermediate("instanceIdentityCA").unwrap();
        let rogue = Ca::root("rogue CA")
            .unwrap()
            .intermediate("instanceIdentityCA")
            .unwrap();
        let backend_ca = Ca::root("test backend CA").unwrap();
        TestPki {
            a: diego(&ica, APP_A, SPACE1, ORG1, Validity::Current),
            c: ica
                .client(
                    &[
                        &[Attr::Cn("instance-c")],
                        &[Attr::Ou(&format!("app:{APP_C}"))],
                        &[Attr::Ou(&format!("space:{SPACE1}"))],
                        &[Attr::Ou(&format!("organization:{ORG1}"))],
                    ],
                    Validity::Current,
                )
                .unwrap(),
            b: diego(&ica, APP_B, SPACE2, ORG2, Validity::Current),
            a_orgless: ica
                .client(
                    &[
                        &[Attr::Cn("x")],
                        &[
                            Attr::Ou(&format!("app:{APP_A}")),
                            Attr::Ou(&format!("space:{SPACE1}")),
                        ],
                    ],
                    Validity::Current,
                )
                .unwrap(),
            no_ou: ica
                .client(&[&[Attr::Cn("no-ou"), Attr::O("acme")]], Validity::Current)
                .unwrap(),
            conflicting: ica
                .client(
                    &[
                        &[Attr::Cn("x")],
                        &[Attr::Ou(&format!("app:{APP_A}"))],
                        &[Attr::Ou(&format!("app:{APP_B}"))],
                    ],
                    Validity::Current,
                )
                .unwrap(),
            expired: diego(&ica, APP_A, SPACE1, ORG1, Validity::Expired),
            wrong_ca: diego(&rogue, APP_A, SPACE1, ORG1, Validity::Current),
            server_ca,
            identity_root,
            backend_ca,
        }
    }

    /// Writes the files a config refers to: `server.pem`/`server.key`, `identity-ca.pem`,
    /// `backend-ca.pem`.
    pub fn write(&self, dir: &Path) {
        let server = self
            .server_ca
            .server(&[
                "*.apps.identity",
                "*.other.identity",
                "exact.mtls.domain",
                "*.mtls.domain",
                "*.apps.plain",
                "localhost",
                "127.0.0.1",
            ])
            .unwrap();
        std::fs::write(dir.join("server.pem"), &server.chain_pem).unwrap();
        std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
        std::fs::write(dir.join("identity-ca.pem"), &self.identity_root.cert_pem).unwrap();
        std::fs::write(dir.join("backend-ca.pem"), &self.backend_ca.cert_pem).unwrap();
    }
}

/// A rustls server config presenting `leaf` (its chain and key), without client authentication.
pub fn server_config(leaf: &Leaf) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap()
}
