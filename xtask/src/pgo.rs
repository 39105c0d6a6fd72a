//! `cargo xtask build-pgo`: the release binary built again with a profile of its own run
//! (profile-guided optimisation). LLVM then lays out and inlines the request path by what it
//! actually executed: about a fifth fewer instructions per request (docs/benchmarks.md).
//!
//! 1. An instrumented build (`-Cprofile-generate`) into `target/pgo-gen`.
//! 2. Training: that binary serves the embedded demo's configuration (its PKI, an echo backend in
//!    this process, an access log file) while [`load`] sends it a fixed mix of traffic, every
//!    answer checked: mTLS HTTP/1.1 and h2 from an allowed and a denied caller, plain TLS
//!    HTTP/1.1 and h2, a request body, new connections with and without resumption, an unknown
//!    host. The mix is the gateway's work, not the benchmark's: other hosts, sizes, connection
//!    counts and clients than `benches/rivals.rs`.
//! 3. `llvm-profdata merge` (rustup's `llvm-tools`, matching rustc's LLVM).
//! 4. The final build (`-Cprofile-use`) into `target/pgo`, which then serves one short pass of
//!    the same mix before it is declared good.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{cargo, run};

/// Where the optimised binary lands, relative to the repository.
pub fn binary(host: &str) -> PathBuf {
    Path::new("target/pgo")
        .join(host)
        .join("release/portcullis")
}

/// Builds, trains and rebuilds; returns the optimised binary's path. The XDP object is built
/// first, since the binary embeds it (a no-op when it is up to date).
pub fn build() -> Result<PathBuf> {
    super::build_ebpf()?;
    let host = host_triple()?;
    let profdata = llvm_profdata(&host)?;
    let gen = std::env::current_dir()?.join("target/pgo-gen");
    let profiles = gen.join("profiles");
    let _ = std::fs::remove_dir_all(&profiles);
    // `--target`: build scripts and proc-macros are built without the flags (uninstrumented);
    // only what ends up in the binary is profiled.
    let build = |target_dir: &Path, flag: String| {
        let mut c = cargo();
        c.args([
            "build",
            "--release",
            "-p",
            "portcullis",
            "--bin",
            "portcullis",
        ])
        .args(["--target", &host])
        .arg("--target-dir")
        .arg(target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", flag);
        run(&mut c)
    };
    build(&gen, format!("-Cprofile-generate={}", profiles.display()))?;
    let instrumented = gen.join(&host).join("release/portcullis");
    let served = train(&instrumented, Mix::full())?;
    eprintln!("pgo: the instrumented gateway answered {served} requests as expected");
    let merged = gen.join("portcullis.profdata");
    run(Command::new(&profdata)
        .args(["merge", "-o"])
        .arg(&merged)
        .arg(&profiles))?;
    build(
        Path::new("target/pgo"),
        format!("-Cprofile-use={}", merged.display()),
    )?;
    let out = binary(&host);
    let served = train(&out, Mix::smoke())?;
    eprintln!(
        "pgo: {} built and checked ({served} requests answered as expected)",
        out.display()
    );
    Ok(out)
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")
}

/// `llvm-profdata` of the toolchain in use (rust-toolchain.toml), installing `llvm-tools`.
fn llvm_profdata(host: &str) -> Result<PathBuf> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let tool = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !tool.exists() {
        run(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    }
    ensure!(
        tool.exists(),
        "{} missing after installing llvm-tools",
        tool.display()
    );
    Ok(tool)
}

/// How much of each kind of traffic a pass sends.
#[derive(Clone, Copy)]
struct Mix {
    /// Requests per keep-alive connection.
    per_connection: usize,
    /// New connections per caller kind.
    handshakes: usize,
}

impl Mix {
    fn full() -> Mix {
        Mix {
            per_connection: 1_500,
            handshakes: 150,
        }
    }

    fn smoke() -> Mix {
        Mix {
            per_connection: 20,
            handshakes: 3,
        }
    }
}

/// How long a training pass may take (the full mix takes about 15 s on 2 cores).
const TRAINING_LIMIT: Duration = Duration::from_secs(600);

/// Runs `bin` on the demo's configuration, sends it `mix`, stops it with SIGTERM (the profile is
/// written as it exits) and returns the number of requests answered as expected.
fn train(bin: &Path, mix: Mix) -> Result<usize> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let https = free_port()?;
        let admin = free_port()?;
        let demo = portcullis::demo::prepare(https, admin).await?;
        let config = demo.dir.join("portcullis.yaml");
        // An access log in a file, as in production, not on standard output.
        let yaml = std::fs::read_to_string(&config)?.replace("path: \"-\"", "path: access.log");
        std::fs::write(&config, yaml)?;
        let mut gateway = Gateway(
            Command::new(bin)
                .args(["run", "--config"])
                .arg(&config)
                .env("PORTCULLIS_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?,
        );
        wait_listening(https, &mut gateway.0).await?;
        // Bounded: a gateway that stops answering fails the build instead of stalling it.
        let served = tokio::time::timeout(TRAINING_LIMIT, load(&demo.dir, https, mix))
            .await
            .unwrap_or_else(|_| bail!("training did not finish within {TRAINING_LIMIT:?}"));
        let status = gateway.stop().await?;
        let _ = std::fs::remove_dir_all(&demo.dir);
        let served = served?;
        ensure!(status.success(), "{} exited with {status}", bin.display());
        Ok(served)
    })
}

/// The gateway under training; killed if training fails before it is stopped.
struct Gateway(Child);

impl Gateway {
    /// SIGTERM, then up to 30 s for a clean exit (the instrumented binary writes its profile
    /// when it exits).
    async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the gateway did not exit within 30 s of SIGTERM")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the gateway exited with {status} before listening on {addr}");
        }
        ensure!(
            Instant::now() < deadline,
            "the gateway did not listen on {addr} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Who calls: a client certificate from the demo's directory, or none (plain TLS).
fn client(dir: &Path, who: Option<&str>, alpn: &[u8]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("server-ca.pem"))? {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut cfg = match who {
        Some(who) => {
            let chain = CertificateDer::pem_file_iter(dir.join(format!("{who}.pem")))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{who}.key")))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// One kind of traffic: who, to which host, over which protocol, what is expected.
#[derive(Clone)]
struct Flow {
    tls: TlsConnector,
    host: &'static str,
    h2: bool,
    /// Bytes of request body (a POST), or 0 for a GET.
    body: usize,
    expect: StatusCode,
}

impl Flow {
    /// `n` requests on one connection (h2: eight at a time).
    async fn keep_alive(&self, addr: SocketAddr, n: usize) -> Result<usize> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(self.host)?;
        let tls = self.tls.connect(name, tcp).await?;
        let io = TokioIo::new(tls);
        if self.h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .context("h2 handshake")?;
            tokio::spawn(conn);
            let mut done = 0;
            while done < n {
                let batch = (n - done).min(8);
                let mut streams = tokio::task::JoinSet::new();
                for _ in 0..batch {
                    let mut send = send.clone();
                    let req = self.request()?;
                    let expect = self.expect;
                    streams
                        .spawn(async move { check(send.send_request(req).await?, expect).await });
                }
                while let Some(r) = streams.join_next().await {
                    r??;
                }
                done += batch;
            }
            Ok(n)
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 handshake")?;
            tokio::spawn(conn);
            for _ in 0..n {
                send.ready().await?;
                check(send.send_request(self.request()?).await?, self.expect).await?;
            }
            Ok(n)
        }
    }

    fn request(&self) -> Result<Request<Full<Bytes>>> {
        let (method, body) = match self.body {
            0 => (Method::GET, Bytes::new()),
            n => (Method::POST, Bytes::from(vec![b'p'; n])),
        };
        let b = Request::builder().method(method);
        let b = if self.h2 {
            b.uri(format!("https://{}/train", self.host))
        } else {
            b.uri("/train").header(http::header::HOST, self.host)
        };
        Ok(b.body(Full::new(body))?)
    }
}

async fn check(resp: http::Response<hyper::body::Incoming>, expect: StatusCode) -> Result<()> {
    let status = resp.status();
    resp.into_body().collect().await?;
    ensure!(status == expect, "expected {expect}, got {status}");
    Ok(())
}

/// Sends the mix, all flows at once; the number of requests answered as expected.
async fn load(dir: &Path, addr: SocketAddr, mix: Mix) -> Result<usize> {
    let h1 = b"http/1.1".as_slice();
    // One connector per caller and protocol, shared by its flows (and its session cache with them).
    let allowed_h1 = client(dir, Some("allowed"), h1)?;
    let allowed_h2 = client(dir, Some("allowed"), b"h2")?;
    let denied_h1 = client(dir, Some("denied"), h1)?;
    let plain_h1 = client(dir, None, h1)?;
    let plain_h2 = client(dir, None, b"h2")?;
    let flow = |tls: &TlsConnector, host, h2, body, expect| Flow {
        tls: tls.clone(),
        host,
        h2,
        body,
        expect,
    };
    let (ok, forbidden, missing) = (StatusCode::OK, StatusCode::FORBIDDEN, StatusCode::NOT_FOUND);
    // (flow, connections): keep-alive traffic.
    let kept = [
        (flow(&allowed_h1, "backend.apps.identity", false, 0, ok), 6),
        (flow(&allowed_h2, "space.apps.identity", true, 0, ok), 3),
        (
            flow(&allowed_h1, "backend.apps.identity", false, 16 << 10, ok),
            1,
        ),
        (
            flow(&denied_h1, "backend.apps.identity", false, 0, forbidden),
            3,
        ),
        (flow(&denied_h1, "space.apps.identity", false, 0, ok), 1),
        (flow(&plain_h1, "open.apps.plain", false, 0, ok), 3),
        (flow(&plain_h2, "open.apps.plain", true, 0, ok), 2),
        (flow(&plain_h1, "nowhere.apps.plain", false, 0, missing), 1),
    ];
    // New connections, one request each (the connector's session cache resumes most of them).
    let fresh = [
        flow(&allowed_h1, "backend.apps.identity", false, 0, ok),
        flow(&denied_h1, "backend.apps.identity", false, 0, forbidden),
        flow(&plain_h1, "open.apps.plain", false, 0, ok),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for (f, conns) in kept {
        for _ in 0..conns {
            let f = f.clone();
            tasks.spawn(async move { f.keep_alive(addr, mix.per_connection).await });
        }
    }
    for f in fresh {
        tasks.spawn(async move {
            for _ in 0..mix.handshakes {
                f.keep_alive(addr, 1).await?;
            }
            Ok(mix.handshakes)
        });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        served += r.context("a training task panicked")??;
    }
    Ok(served)
}
