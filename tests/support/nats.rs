//! A real `nats-server` (Debian package, installed by `cargo xtask deps`) on a free loopback port,
//! and a TCP relay that can cut the gateway's connection to it on demand.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn binary() -> String {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    "nats-server".to_string()
}

/// A nats-server child process, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// Extra arguments (TLS).
    args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a port it picks itself: no race with other tests' listeners for a port
    /// chosen here and released before the server binds it.
    pub fn start() -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: 0,
            args: Vec::new(),
        };
        s.spawn(-1);
        s
    }

    /// A server that requires TLS with `cert`/`key` and a client certificate chaining to
    /// `client_ca` (as Cloud Foundry's `nats-tls`), files in PEM.
    pub fn start_tls(cert: &Path, key: &Path, client_ca: &Path) -> NatsServer {
        let arg = |p: &Path| p.to_str().unwrap().to_string();
        NatsServer::start_with(&[
            "--tlsverify",
            "--tlscert",
            &arg(cert),
            "--tlskey",
            &arg(key),
            "--tlscacert",
            &arg(client_ca),
        ])
    }

    /// A server started with these extra arguments (`--user u --pass p`, …).
    pub fn start_with(args: &[&str]) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: 0,
            args: args.iter().map(ToString::to_string).collect(),
        };
        s.spawn(-1);
        s
    }

    /// Spawns on `port` (-1: any) and waits for the server's own "listening" log line, which
    /// names the port it really bound.
    fn spawn(&mut self, port: i32) {
        let mut child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server runs (install it with `cargo xtask deps`)");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Keep draining after the line we need so the server never blocks on its log.
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    let port = rest
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.trim().parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(p)) => self.port = p,
            other => panic!("nats-server did not start listening (port {port}): {other:?}"),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(i32::from(port));
        assert_eq!(self.port, port, "restarted on another port");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Relays TCP from its own port to a target; `cut` drops every relayed connection and refuses
/// new ones until `restore`.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        Relay {
            addr,
            open,
            conns,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
