//! Kernel TLS against userspace TLS: what the gateway's own threads spend on keep-alive TLS
//! connections per request with 1 KiB responses (W1's shape), per MiB with 1 MiB responses (W4's
//! shape) and per MiB of 1 MiB uploads, the same requests through two gateways that differ only
//! in `tls.ktls` (`on`, `off`), taking turns.
//!
//! It needs a kernel with kernel TLS, which the build machines do not have (`CONFIG_TLS` off):
//! `cargo xtask vm-bench` runs it in Debian's kernels under QEMU with `-icount shift=0`, where the
//! guest's clock advances by one nanosecond per instruction executed, so the CPU time the guest
//! kernel accounts to a thread (`/proc/<pid>/task/<tid>/schedstat`) counts the instructions that
//! thread executed, in userspace and in the kernel (system calls, and the loopback softirq work
//! that runs in its context). That is a count, not a time: it weighs an AES round, a `rep movsb`
//! iteration and a cache miss alike, but it is exact and repeatable, which time under software
//! emulation is not.
//!
//! The gateway runs in-process with one worker (`portcullis-w0`) and its access-log thread; the
//! client and the backend run on this process' other threads and are not counted. Every response
//! is checked for its length, and `/proc/net/tls_stat` for the kernel's records: each `on` round
//! must add one TX and one RX software kTLS context per connection, each `off` round none.
//!
//! `cargo bench -p portcullis --bench ktls_cost [-- --rounds N] [--quick]` (3 rounds of 2,000
//! small requests and 64 MiB each way; `--quick`: 1 round of 500 and 16 MiB)

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use support::gateway::TestGateway;
use support::kernel_tls::{gcm_aes_driver, stat_delta, tls_stat};
use support::pki::TestPki;

const SMALL: usize = 1024;
const LARGE: usize = 1 << 20;
/// Keep-alive connections each load runs on, one request at a time on each.
const CONNECTIONS: usize = 4;

/// The backend: `/small` answers 1 KiB, `/large` 1 MiB (HTTP/1.1, keep-alive).
async fn backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let small = Bytes::from(vec![b's'; SMALL]);
    let large = Bytes::from(vec![b'l'; LARGE]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (small, large) = (small.clone(), large.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (small, large) = (small.clone(), large.clone());
                    async move {
                        let body = match req.uri().path() {
                            "/large" => large,
                            "/upload" => {
                                let n = req.into_body().collect().await?.to_bytes().len();
                                Bytes::from(n.to_string())
                            }
                            _ => small,
                        };
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn sections(ktls: &str, backend: SocketAddr) -> String {
    format!(
        "tls:\n  certificates: [{{cert_chain: server.pem, private_key: server.key}}]\n  ktls: {ktls}\n\
         limits: {{workers: 1}}\n\
         access_log: {{path: access.log, extra_fields: [ktls]}}\n\
         domains:\n  - name: \"*.apps.identity\"\n    ca_certs: identity-ca.pem\n\
         routes:\n  - {{uris: [a.apps.identity], host: \"127.0.0.1\", port: {port}, options: {{route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"}}}}\n",
        port = backend.port(),
    )
}

/// The threads of this process whose name starts with one of `prefixes`.
fn threads(prefixes: &[&str]) -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            prefixes
                .iter()
                .any(|p| comm.trim_end().starts_with(p))
                .then_some(tid)
        })
        .collect()
}

/// The nanoseconds the kernel has accounted to `tids` on a CPU (`schedstat`: exact, user and
/// kernel time together).
fn cpu(tids: &HashSet<u32>) -> u64 {
    tids.iter()
        .map(|tid| {
            let path = format!("/proc/self/task/{tid}/schedstat");
            let schedstat = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{path}: {e} (the kernel needs CONFIG_SCHED_INFO)"));
            schedstat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("schedstat's first field")
        })
        .sum()
}

/// What a load sends and gets back, and what its figures are per.
struct Workload {
    name: &'static str,
    path: &'static str,
    requests: usize,
    upload: usize,
    response: usize,
    /// What one request stands for in the table: a request, or the MiB it moves.
    unit: &'static str,
}

struct Gateway {
    mode: &'static str,
    gw: TestGateway,
    tids: HashSet<u32>,
}

/// `requests` GETs of `path` spread over [`CONNECTIONS`] keep-alive connections (new ones, so
/// each round sets up its own kTLS contexts), every response checked for its length.
async fn load(gw: &Gateway, tls: &Arc<rustls::ClientConfig>, w: &Workload) -> rustls::CipherSuite {
    let mut tasks = Vec::new();
    let upload = Bytes::from(vec![b'u'; w.upload]);
    for c in 0..CONNECTIONS {
        let n = w.requests / CONNECTIONS + usize::from(c < w.requests % CONNECTIONS);
        let tls = tls.clone();
        let addr = gw.gw.https();
        let (path, upload, size) = (w.path, upload.clone(), w.response);
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("a.apps.identity").unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .expect("handshake");
            let suite = stream
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .unwrap()
                .suite();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            for _ in 0..n {
                let method = if upload.is_empty() { "GET" } else { "POST" };
                let req = http::Request::builder()
                    .method(method)
                    .uri(path)
                    .header("host", "a.apps.identity")
                    .body(Full::new(upload.clone()))
                    .unwrap();
                let resp = send.send_request(req).await.expect("a response");
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                if upload.is_empty() {
                    assert_eq!(body.len(), size, "{path}: a whole body");
                } else {
                    assert_eq!(body, upload.len().to_string(), "{path}: the whole upload");
                }
            }
            drop(send);
            let _ = conn.await;
            suite
        }));
    }
    let mut suite = None;
    for t in tasks {
        suite = Some(t.await.expect("a client connection"));
    }
    suite.expect("a connection")
}

/// One measurement: the gateway's CPU for the load, per unit.
struct Sample {
    suite: rustls::CipherSuite,
    /// Per request: each large request moves one MiB.
    ns_per_unit: f64,
}

async fn measure(gw: &Gateway, tls: &Arc<rustls::ClientConfig>, w: &Workload) -> Sample {
    let stat_before = tls_stat();
    let before = cpu(&gw.tids);
    let suite = load(gw, tls, w).await;
    // The access-log thread writes the batch's lines within a few milliseconds.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let after = cpu(&gw.tids);
    let stat_after = tls_stat();
    let (tx, rx) = (
        stat_delta(&stat_before, &stat_after, "TlsTxSw"),
        stat_delta(&stat_before, &stat_after, "TlsRxSw"),
    );
    let expected = if gw.mode == "on" {
        CONNECTIONS as u64
    } else {
        0
    };
    assert!(
        tx == expected && rx == expected,
        "ktls {}: tls_stat TlsTxSw +{tx}, TlsRxSw +{rx}, expected +{expected} each",
        gw.mode
    );
    Sample {
        suite,
        ns_per_unit: (after - before) as f64 / w.requests as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(if quick { 1 } else { 3 })
        .max(1);
    let (small_requests, large_requests) = if quick { (500, 16) } else { (2000, 64) };
    if !std::path::Path::new("/proc/net/tls_stat").exists() {
        eprintln!(
            "ktls_cost: this kernel has no kernel TLS (/proc/net/tls_stat is missing); \
             `cargo xtask vm-bench` runs this benchmark in a VM that has"
        );
        std::process::exit(1);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread for the client and the backend: the gateway's worker is the only other one
    // working, and on the VM's one CPU every thread takes turns anyway.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pki = TestPki::new();
        let backend = backend().await;
        let tls = support::client::tls_config(&pki.server_ca, Some(&pki.a), &[b"http/1.1"]);
        let mut gateways = Vec::new();
        for mode in ["on", "off"] {
            let known = threads(&["portcullis-w", "access-log"]);
            let gw = TestGateway::start(&pki, &sections(mode, backend)).await;
            // A thread names itself once it runs: wait (at most 5 s) for the gateway's two.
            let mut tids = HashSet::new();
            for _ in 0..500 {
                tids = threads(&["portcullis-w", "access-log"])
                    .difference(&known)
                    .copied()
                    .collect();
                if tids.len() == 2 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(tids.len(), 2, "one worker and the access-log thread");
            gateways.push(Gateway { mode, gw, tids });
        }
        let workloads = [
            Workload {
                name: "1 KiB responses",
                path: "/small",
                requests: small_requests,
                upload: 0,
                response: SMALL,
                unit: "request",
            },
            Workload {
                name: "1 MiB responses",
                path: "/large",
                requests: large_requests,
                upload: 0,
                response: LARGE,
                unit: "MiB",
            },
            Workload {
                name: "1 MiB uploads",
                path: "/upload",
                requests: large_requests,
                upload: LARGE,
                response: 0,
                unit: "MiB",
            },
        ];
        // samples[workload][gateway]
        let mut samples: Vec<Vec<Vec<Sample>>> = workloads
            .iter()
            .map(|_| gateways.iter().map(|_| Vec::new()).collect())
            .collect();
        for round in 0..rounds {
            for (w, workload) in workloads.iter().enumerate() {
                // The order turns with the round, so neither mode always goes first.
                for i in 0..gateways.len() {
                    let g = (i + round) % gateways.len();
                    let s = measure(&gateways[g], &tls, workload).await;
                    samples[w][g].push(s);
                }
            }
        }
        for g in &gateways {
            let kernel =
                g.gw.metric("portcullis_ktls_connections_total{mode=\"kernel\"}");
            let expected = if g.mode == "on" {
                (rounds * workloads.len() * CONNECTIONS) as f64
            } else {
                0.0
            };
            assert_eq!(
                kernel, expected,
                "ktls {}: connections in the kernel",
                g.mode
            );
        }
        println!(
            "\nkernel TLS against userspace TLS, the gateway's threads ({rounds} round(s), \
             {CONNECTIONS} keep-alive mTLS connections, h1; CPU ns as the kernel accounts them: \
             instructions under QEMU -icount shift=0)"
        );
        println!(
            "cipher suite {:?}; the kernel's gcm(aes): {}",
            samples[0][0][0].suite,
            gcm_aes_driver().unwrap_or_else(|| "not listed".into())
        );
        println!("| workload | ktls | CPU ns per unit (median; rounds) | on / off |");
        println!("|---|---|---|---|");
        for (w, Workload { name, unit, .. }) in workloads.iter().enumerate() {
            let medians: Vec<f64> = samples[w]
                .iter()
                .map(|s| median(s.iter().map(|s| s.ns_per_unit).collect()))
                .collect();
            for (g, gw) in gateways.iter().enumerate() {
                let rounds: Vec<String> = samples[w][g]
                    .iter()
                    .map(|s| format!("{:.0}", s.ns_per_unit))
                    .collect();
                let ratio = if gw.mode == "on" {
                    format!("{:.2}×", medians[0] / medians[1])
                } else {
                    String::new()
                };
                println!(
                    "| {name}, per {unit} | {} | {:.0} ({}) | {ratio} |",
                    gw.mode,
                    medians[g],
                    rounds.join(", "),
                );
            }
        }
    });
}
