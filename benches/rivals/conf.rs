//! nginx and HAProxy configured as BENCH.md's rivals (verify the client certificate against the
//! identity CA, let only app `app-a`'s Subject OU through, 403 otherwise, keep-alive to the
//! backend), shared by the side-by-side bench (`rivals.rs`) and W5's flood (`flood.rs`).
//!
//! The folder `d` holds `server.pem`, `server.key` and `identity-ca.pem`; callers present their
//! intermediate in their chain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// nginx with `conf` as its configuration, its prefix (pid file, logs) in `d/nginx-<name>`, in
/// the foreground.
pub fn nginx(name: &str, d: &Path, conf: &str) -> Command {
    let prefix = d.join(format!("nginx-{name}"));
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"]);
    c
}

/// nginx in front of `backend` on `listen`: mTLS for `a.apps.identity`, server-only TLS for
/// `a.apps.plain` (same port, by SNI). `counted`: it will run under callgrind, whose control pipe
/// a worker can only open if it keeps root's identity.
pub fn nginx_front(listen: SocketAddr, backend: SocketAddr, d: &Path, counted: bool) -> Command {
    let dd = d.display();
    let conf = format!(
        "{user}worker_processes 2;\nerror_log stderr error;\npid front.pid;\nevents {{ worker_connections 16384; }}\n\
         http {{ access_log {dd}/nginx-access.log; keepalive_requests 1000000;\n  \
         upstream backend {{ server {backend}; keepalive 64; }}\n  \
         map $ssl_client_s_dn $denied {{ ~OU=app:app-a(,|\\+|$) 0; default 1; }}\n  \
         ssl_certificate {dd}/server.pem; ssl_certificate_key {dd}/server.key; ssl_session_tickets off; ssl_session_cache off;\n  \
         server {{ listen {listen} ssl http2; server_name a.apps.identity;\n    \
         ssl_client_certificate {dd}/identity-ca.pem; ssl_verify_client on; ssl_verify_depth 3;\n    \
         location / {{ if ($denied) {{ return 403; }} proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n  \
         server {{ listen {listen} ssl http2 default_server; server_name a.apps.plain;\n    \
         location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        user = if counted { "user root root;\n" } else { "" },
    );
    nginx("front", d, &conf)
}

/// HAProxy in front of `backend` on `listen`, the same job as [`nginx_front`], in the
/// foreground; its configuration written to `d/haproxy.cfg`.
pub fn haproxy(listen: SocketAddr, backend: SocketAddr, d: &Path) -> Command {
    let dd = d.display();
    // HAProxy wants two descriptors per connection and refuses to start when the limit cannot
    // hold its maxconn.
    let maxconn = nofile().rlim_cur.saturating_sub(200) / 2;
    // HAProxy takes its certificate chain and key from one file.
    let pem = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    std::fs::write(
        d.join("server-combined.pem"),
        pem("server.pem") + &pem("server.key"),
    )
    .unwrap();
    let conf = format!(
        "global\n  nbthread 2\n  maxconn {maxconn}\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  log stdout format raw local0 info\n  option httplog\n\
         frontend fe\n  bind {listen} ssl crt {dd}/server-combined.pem ca-file {dd}/identity-ca.pem verify optional alpn h2,http/1.1 no-tls-tickets\n  \
         http-request deny deny_status 403 if {{ ssl_fc_sni -i a.apps.identity }} !{{ ssl_c_used }}\n  \
         http-request deny deny_status 403 if {{ ssl_fc_sni -i a.apps.identity }} !{{ ssl_c_s_dn -m reg OU=app:app-a(,|\\+|/|$) }}\n  \
         default_backend be\n\
         backend be\n  http-reuse always\n  server b {backend}\n"
    );
    let path = d.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let mut c = Command::new("haproxy");
    c.arg("-f").arg(path).arg("-db");
    c
}

/// Lets this process (and the proxies it starts) hold many connections: the soft descriptor
/// limit up to the hard one.
pub fn raise_fd_limit() {
    let mut want = nofile();
    want.rlim_cur = want.rlim_max;
    // SAFETY: plain setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        eprintln!(
            "cannot raise RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// This process's descriptor limits (inherited by the proxies it starts).
pub fn nofile() -> libc::rlimit {
    let mut have = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut have) };
    have
}

/// `pid` and its descendants that are alive now (a proxy's master and workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pids[i]))
            .unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        i += 1;
    }
    pids
}

/// Where `tool` is on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.exists())
    })
}
