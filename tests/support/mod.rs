//! Shared test harness: a test PKI on disk, a gateway started in-process from YAML, real
//! rustls + hyper clients, echo backends. Every wait is bounded.
#![allow(dead_code)]

pub mod client;
pub mod gateway;
pub mod kernel_tls;
pub mod nats;
pub mod netns;
pub mod packets;
pub mod pki;
pub mod process;

use std::future::Future;
use std::time::Duration;

/// Awaits `f` for at most 15 s; a hang fails the test instead of blocking CI.
pub async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(15), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within 15 s"),
    }
}
