//! The real gateway against real sockets: rustls + hyper clients, rcgen PKIs, echo backends.

mod support;

#[path = "gateway/accesslog.rs"]
mod accesslog;
#[path = "gateway/admin.rs"]
mod admin;
#[path = "gateway/backends.rs"]
mod backends;
#[path = "gateway/denials.rs"]
mod denials;
#[path = "gateway/handshake.rs"]
mod handshake;
#[path = "gateway/hardening.rs"]
mod hardening;
#[path = "gateway/idle.rs"]
mod idle;
#[path = "gateway/limits.rs"]
mod limits;
#[path = "gateway/pipeline.rs"]
mod pipeline;
#[path = "gateway/proxy_protocol.rs"]
mod proxy_protocol;
#[path = "gateway/reload.rs"]
mod reload;
#[path = "gateway/rewrite.rs"]
mod rewrite;
#[path = "gateway/route_services.rs"]
mod route_services;
#[path = "gateway/selection.rs"]
mod selection;
#[path = "gateway/websocket.rs"]
mod websocket;
#[path = "gateway/xfcc.rs"]
mod xfcc;

use std::net::SocketAddr;

/// A loopback port with nothing listening on it, for the rest of the test process: the socket
/// is bound but never listens (connecting is refused) and is kept open, so no other test's
/// listener can be given the port meanwhile (a released port can be, and then it is not dead).
pub fn dead_port() -> u16 {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = s.local_addr().unwrap().port();
    std::mem::forget(s);
    port
}

/// A TLS connection to the gateway for `host`, with `leaf`'s client certificate, offering
/// `alpn`: for requests and frames written by hand.
pub async fn raw_tls(
    gw: &support::gateway::TestGateway,
    pki: &support::pki::TestPki,
    leaf: &portcullis::pki::Leaf,
    host: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    support::client::tls_connect(gw.https(), &pki.server_ca, Some(host), Some(leaf), &[alpn])
        .await
        .unwrap()
}

/// An echo backend named `name` on a loopback port of its own.
pub async fn echo_on_loopback(name: &str) -> portcullis::echo::EchoServer {
    portcullis::echo::start(name, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

/// One route entry for an instance `id` of a test config, with more of the registration's
/// keys as YAML (`("app", guid)`, `("tags", "{space_id: s}")`, …).
pub fn instance_route(uri: &str, backend: SocketAddr, id: &str, keys: &[(&str, &str)]) -> String {
    let mut y = format!(
        "  - uris: [\"{uri}\"]\n    host: \"{}\"\n    port: {}\n    private_instance_id: {id}\n",
        backend.ip(),
        backend.port()
    );
    for (key, value) in keys {
        y += &format!("    {key}: {value}\n");
    }
    y
}

/// One route entry for a test config.
pub fn route(uri: &str, backend: SocketAddr, tags: &str, options: &str) -> String {
    format!(
        "  - uris: [\"{uri}\"]\n    host: \"{}\"\n    port: {}\n    tags: {{{tags}}}\n    options: {{{options}}}\n",
        backend.ip(),
        backend.port()
    )
}

/// The config most pipeline tests use: two mTLS domains and routes for every policy shape.
pub fn pipeline_yaml(backend: SocketAddr, extra: &str) -> String {
    let t1 = "app_id: backend, space_id: space-1, organization_id: org-1";
    let dead: SocketAddr = format!("127.0.0.1:{}", dead_port()).parse().unwrap();
    let mut y = String::from(
        "forwarded_client_cert: forward\n\
         domains:\n  - name: \"*.apps.identity\"\n    ca_certs: identity-ca.pem\n    forwarded_client_cert: forward\n\
         \x20 - name: \"*.other.identity\"\n    ca_certs: identity-ca.pem\n\
         routes:\n",
    );
    y += &route("open.apps.identity", backend, t1, "");
    y += &route(
        "any-a.apps.identity",
        backend,
        t1,
        "route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"",
    );
    y += &route(
        "space.apps.identity",
        backend,
        t1,
        "route_policy_scope: space, route_policy_sources: \"cf:any\"",
    );
    y += &route(
        "org.apps.identity",
        backend,
        t1,
        "route_policy_scope: org, route_policy_sources: \"cf:any\"",
    );
    y += &route(
        "orgless.apps.identity",
        backend,
        "app_id: backend, space_id: space-1",
        "route_policy_scope: org, route_policy_sources: \"cf:any\"",
    );
    y += &route(
        "weird.apps.identity",
        backend,
        t1,
        "route_policy_scope: galaxy, route_policy_sources: \"cf:any\"",
    );
    y += &route(
        "nosrc.apps.identity",
        backend,
        t1,
        "route_policy_scope: any",
    );
    y += &route(
        "srcspace.apps.identity",
        backend,
        t1,
        "route_policy_scope: any, route_policy_sources: \"cf:space:space-1\"",
    );
    y += &route(
        "srcorg.apps.identity",
        backend,
        t1,
        "route_policy_scope: any, route_policy_sources: \"cf:app:nobody, cf:org:org-1\"",
    );
    y += &route("x.other.identity", backend, t1, "");
    y += &route("open.apps.plain", backend, t1, "");
    y += &route(
        "enforced.apps.plain",
        backend,
        t1,
        "route_policy_scope: any, route_policy_sources: \"cf:any\"",
    );
    y += &route("half.apps.identity", dead, t1, "");
    y += &route("half.apps.identity", backend, t1, "");
    for _ in 0..3 {
        let d: SocketAddr = format!("127.0.0.1:{}", dead_port()).parse().unwrap();
        y += &route("dead.apps.identity", d, t1, "");
    }
    y + extra
}
