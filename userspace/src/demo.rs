//! `portcullis run` with no config: a self-contained demo on loopback.
//!
//! It makes a throwaway PKI, starts an echo backend, writes a real config file next to the PKI
//! (so the operator can read and copy it) and loads it through the normal config path.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{Config, ConfigError};
use crate::echo::{self, EchoServer};
use crate::pki::{Attr, Ca, PkiError, Validity};

/// Guids of the demo's two callers and its backend app.
pub const ALLOWED_APP: &str = "a11owed0-0000-4000-8000-000000000001";
pub const DENIED_APP: &str = "de11ed00-0000-4000-8000-000000000002";
pub const BACKEND_APP: &str = "backend0-0000-4000-8000-000000000003";
const SPACE: &str = "5pace000-0000-4000-8000-000000000004";
const ORG: &str = "0rg00000-0000-4000-8000-000000000005";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("demo files in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("demo backend: {0}")]
    Backend(std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A prepared demo: its files, its config and its backend.
pub struct Demo {
    pub dir: PathBuf,
    pub config: Config,
    pub backend: EchoServer,
}

/// Makes the PKI and config in a fresh temporary folder and starts the backend.
pub async fn prepare(https: SocketAddr, admin: SocketAddr) -> Result<Demo, DemoError> {
    let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
    let io = |source| DemoError::Io {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;

    let server_ca = Ca::root("portcullis demo server CA")?;
    let server =
        server_ca.server(&["*.apps.identity", "*.apps.plain", "localhost", "127.0.0.1"])?;
    let identity_root = Ca::root("portcullis demo identity root")?;
    let identity_ca = identity_root.intermediate("instanceIdentityCA")?;
    let caller = |app: &str, cn: &str| {
        let (ou_app, ou_space, ou_org) = (
            format!("app:{app}"),
            format!("space:{SPACE}"),
            format!("organization:{ORG}"),
        );
        identity_ca.client(
            &[
                &[Attr::Cn(cn)],
                &[Attr::Ou(&ou_org), Attr::Ou(&ou_space), Attr::Ou(&ou_app)],
            ],
            Validity::Current,
        )
    };
    let allowed = caller(ALLOWED_APP, "allowed-instance")?;
    let denied = caller(DENIED_APP, "denied-instance")?;

    let backend = echo::start("demo-backend", ([127, 0, 0, 1], 0).into())
        .await
        .map_err(DemoError::Backend)?;
    let files = [
        ("server-ca.pem", server_ca.cert_pem.clone()),
        ("server.pem", server.chain_pem.clone()),
        ("server.key", server.key_pem.clone()),
        ("identity-ca.pem", identity_root.cert_pem.clone()),
        ("allowed.pem", allowed.chain_pem.clone()),
        ("allowed.key", allowed.key_pem.clone()),
        ("denied.pem", denied.chain_pem.clone()),
        ("denied.key", denied.key_pem.clone()),
        ("portcullis.yaml", config_yaml(https, admin, backend.addr)),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).map_err(io)?;
    }
    let config = Config::load(&dir.join("portcullis.yaml"))?;
    Ok(Demo {
        dir,
        config,
        backend,
    })
}

fn config_yaml(https: SocketAddr, admin: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"# portcullis demo configuration (generated; safe to copy and edit)
listen:
  https: "{https}"
admin:
  listen: "{admin}"
tls:
  certificates:
    - cert_chain: server.pem
      private_key: server.key
domains:
  - name: "*.apps.identity"
    ca_certs: identity-ca.pem
    forwarded_client_cert: sanitize_set
    xfcc_format: envoy
access_log:
  path: "-"
routes:
  # Only the allowed app may call this route.
  - uris: ["backend.apps.identity"]
    host: "{ip}"
    port: {port}
    app: "{BACKEND_APP}"
    private_instance_id: demo-instance-0
    private_instance_index: "0"
    tags: {{app_id: "{BACKEND_APP}", space_id: "{SPACE}", organization_id: "{ORG}"}}
    options: {{route_policy_scope: any, route_policy_sources: "cf:app:{ALLOWED_APP}"}}
  # Any app in the same space may call this one.
  - uris: ["space.apps.identity"]
    host: "{ip}"
    port: {port}
    tags: {{app_id: "{BACKEND_APP}", space_id: "{SPACE}", organization_id: "{ORG}"}}
    options: {{route_policy_scope: space, route_policy_sources: "cf:any"}}
  # A plain TLS route without identity.
  - uris: ["open.apps.plain"]
    host: "{ip}"
    port: {port}
"#,
        ip = backend.ip(),
        port = backend.port(),
    )
}

/// The ready-to-paste commands for a gateway listening on `https`.
pub fn instructions(dir: &std::path::Path, https: SocketAddr, admin: Option<SocketAddr>) -> String {
    let d = dir.display();
    let port = https.port();
    let ip = https.ip();
    let curl = |who: &str, host: &str| {
        format!(
            "curl -sS -i --cacert {d}/server-ca.pem --cert {d}/{who}.pem --key {d}/{who}.key \
             --resolve {host}:{port}:{ip} https://{host}:{port}/"
        )
    };
    let mut out = format!(
        "portcullis demo is running (config and throwaway PKI in {d}).\n\n\
         Allowed caller (app {ALLOWED_APP}), expect 200:\n  {}\n\n\
         Denied caller (app {DENIED_APP}), expect 403:\n  {}\n\n\
         Same-space route, both callers allowed:\n  {}\n\n\
         Who may reach the route:\n  portcullis explain --config {d}/portcullis.yaml --host backend.apps.identity --caller-cert {d}/denied.pem\n",
        curl("allowed", "backend.apps.identity"),
        curl("denied", "backend.apps.identity"),
        curl("denied", "space.apps.identity"),
    );
    if let Some(a) = admin {
        out.push_str(&format!(
            "\nAdmin API:\n  curl http://{a}/routes\n  curl http://{a}/metrics\n"
        ));
    }
    out
}
