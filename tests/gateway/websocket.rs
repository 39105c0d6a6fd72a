//! WebSocket upgrades are proxied after authorization, and denied before the backend sees them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::route;
use crate::support::bounded;
use crate::support::client::tls_connect;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

/// A WebSocket echo server; counts accepted upgrades.
async fn ws_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let upgrades = Arc::new(AtomicUsize::new(0));
    let count = upgrades.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, upgrades)
}

#[tokio::test]
async fn upgrade_allowed_and_denied() {
    let pki = TestPki::new();
    let (addr, upgrades) = ws_backend().await;
    let mut y = String::from(
        "domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n",
    );
    y += &route(
        "ws.apps.identity",
        addr,
        "app_id: w",
        "route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"",
    );
    let gw = TestGateway::start(&pki, &y).await;

    let tls = tls_connect(
        gw.https(),
        &pki.server_ca,
        Some("ws.apps.identity"),
        Some(&pki.a),
        &[b"http/1.1"],
    )
    .await
    .unwrap();
    let (mut ws, resp) = bounded(
        "ws handshake",
        tokio_tungstenite::client_async("wss://ws.apps.identity/chat", tls),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through the gate"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = bounded("ws echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();

    let tls = tls_connect(
        gw.https(),
        &pki.server_ca,
        Some("ws.apps.identity"),
        Some(&pki.b),
        &[b"http/1.1"],
    )
    .await
    .unwrap();
    let err = bounded(
        "ws denied",
        tokio_tungstenite::client_async("wss://ws.apps.identity/chat", tls),
    )
    .await
    .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    assert_eq!(upgrades.load(Ordering::SeqCst), 1);
}
