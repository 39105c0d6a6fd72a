//! SPEC §8: the three XFCC modes, each with both formats, plus the global mode.

use base64::Engine as _;
use portcullis::echo;
use sha2::{Digest, Sha256};

use crate::route;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

const SPOOF: &str = "spoofed-by-caller";

async fn xfcc_seen(
    gw: &TestGateway,
    pki: &TestPki,
    host: &str,
    mtls: bool,
    incoming: Option<&str>,
) -> Option<String> {
    let cert = mtls.then_some(&pki.a);
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), cert, false)
        .await
        .unwrap();
    let headers: Vec<(&str, &str)> = incoming
        .map(|v| ("x-forwarded-client-cert", v))
        .into_iter()
        .collect();
    let req = c.build(host, "/", &headers);
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status, 200, "{host}: {}", resp.body);
    resp.echo().headers.get("x-forwarded-client-cert").cloned()
}

#[tokio::test]
async fn modes_and_formats() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let raw = base64::engine::general_purpose::STANDARD.encode(&pki.a.der);
    let envoy = format!(
        "Hash={};Subject=\"CN=instance,OU=organization:org-1,OU=space:space-1,OU=app:app-a\"",
        hex::encode(Sha256::digest(&pki.a.der))
    );
    for mode in ["sanitize_set", "forward", "always_forward"] {
        let mut y = format!(
            "forwarded_client_cert: {mode}\ndomains:\n\
             \x20 - {{name: \"*.apps.identity\", ca_certs: identity-ca.pem, forwarded_client_cert: {mode}, xfcc_format: raw}}\n\
             \x20 - {{name: \"*.other.identity\", ca_certs: identity-ca.pem, forwarded_client_cert: {mode}, xfcc_format: envoy}}\n\
             routes:\n"
        );
        for host in ["r.apps.identity", "r.other.identity", "r.apps.plain"] {
            y += &route(host, backend.addr, "app_id: x", "");
        }
        let gw = TestGateway::start(&pki, &y).await;
        let sanitize = mode == "sanitize_set";
        // mTLS, raw format, with and without an incoming header.
        let got = xfcc_seen(&gw, &pki, "r.apps.identity", true, Some(SPOOF)).await;
        assert_eq!(
            got.as_deref(),
            Some(if sanitize { raw.as_str() } else { SPOOF }),
            "{mode} raw"
        );
        let got = xfcc_seen(&gw, &pki, "r.apps.identity", true, None).await;
        assert_eq!(
            got.as_deref(),
            sanitize.then_some(raw.as_str()),
            "{mode} raw, none incoming"
        );
        // mTLS, envoy format.
        let got = xfcc_seen(&gw, &pki, "r.other.identity", true, Some(SPOOF)).await;
        assert_eq!(
            got.as_deref(),
            Some(if sanitize { envoy.as_str() } else { SPOOF }),
            "{mode} envoy"
        );
        // No client certificate: the global mode for hosts outside every mTLS domain.
        let got = xfcc_seen(&gw, &pki, "r.apps.plain", false, Some(SPOOF)).await;
        let expect = match mode {
            "always_forward" => Some(SPOOF),
            _ => None,
        };
        assert_eq!(got.as_deref(), expect, "{mode} without certificate");
    }
}
