//! Registry at scale, end to end through a real nats-server: time to apply 100,000
//! registrations, resident memory per endpoint, and route lookup latency at 100,000 routes.
//!
//! `cargo bench -p portcullis --bench registry_scale` (needs `nats-server`: `cargo xtask deps`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis::config::Config;
use portcullis::gateway::Gateway;
use portcullis::pki::Ca;

const ROUTES: usize = 100_000;

/// Resident memory after returning free heap pages to the kernel, so transient buffers (payloads,
/// NATS receive buffers) do not count as registry memory.
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free memory held by glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn nats_binary() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nats-server")
}

fn registration(i: usize) -> Vec<u8> {
    format!(
        r#"{{"uris":["app-{i}.apps.identity"],"host":"10.{}.{}.{}","port":8080,"private_instance_id":"inst-{i}","tags":{{"app_id":"app-{i}","space_id":"space-{}","organization_id":"org-1"}},"options":{{"route_policy_scope":"space","route_policy_sources":"cf:app:caller-{}"}}}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255,
        i % 100,
        i % 7
    )
    .into_bytes()
}

#[tokio::main]
async fn main() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut nats = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (cargo xtask deps)");
    let url = format!("nats://127.0.0.1:{port}");
    let client = loop {
        if let Ok(c) = async_nats::connect(&url).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root("bench").unwrap();
    let server = ca.server(&["*.apps.identity"]).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.chain_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
    let yaml = format!(
        "listen: {{https: \"127.0.0.1:0\"}}\ntls: {{certificates: [{{cert_chain: server.pem, private_key: server.key}}]}}\n\
         nats: {{servers: [\"{url}\"]}}\naccess_log: {{path: access.log}}\n"
    );
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let mut starts = client.subscribe("router.start").await.unwrap();
    client.flush().await.unwrap();
    let gw = Gateway::start(Config::load(&dir.path().join("p.yaml")).unwrap())
        .await
        .unwrap();
    futures_util::StreamExt::next(&mut starts).await;
    let state = gw.state().clone();

    let payloads: Vec<bytes::Bytes> = (0..ROUTES).map(|i| registration(i).into()).collect();
    let rss_before = rss_kib();
    let started = Instant::now();
    for p in &payloads {
        client.publish("router.register", p.clone()).await.unwrap();
    }
    client.flush().await.unwrap();
    let published = started.elapsed();
    while state.registry.table().endpoint_count() < ROUTES {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "registrations not applied in 5 min"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib();

    let table = state.registry.table();
    let hosts: Vec<String> = (0..ROUTES)
        .step_by(97)
        .map(|i| format!("app-{i}.apps.identity"))
        .collect();
    let mut samples = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let mut found = 0;
        for h in &hosts {
            found += usize::from(table.lookup(h, "/some/path").is_some());
        }
        assert_eq!(found, hosts.len());
        samples.push(t.elapsed().as_nanos() as f64 / hosts.len() as f64);
    }
    samples.sort_by(f64::total_cmp);

    println!("registry scale, {ROUTES} routes with one endpoint each, through nats-server");
    println!(
        "  publish 100k messages              {:>10.2} s",
        published.as_secs_f64()
    );
    println!(
        "  apply 100k registrations (end)     {:>10.2} s  ({:.0} registrations/s)",
        applied.as_secs_f64(),
        ROUTES as f64 / applied.as_secs_f64()
    );
    println!(
        "  resident memory per endpoint       {:>10.0} B   (RSS {} → {} KiB)",
        (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / ROUTES as f64,
        rss_before,
        rss_after
    );
    println!("  route lookup at 100k routes        {:>10.1} ns  (median of 50 × {} lookups; min {:.1}, max {:.1})", samples[samples.len() / 2], hosts.len(), samples[0], samples[samples.len() - 1]);
    drop(payloads);
    let _ = nats.kill();
    let _ = nats.wait();
}
