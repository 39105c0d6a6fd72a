//! A client network namespace joined to the host by a veth pair, torn down on drop. Addresses:
//! host side 10.(200+K).N.1, namespace side .2 and .3 (N from the process id, K per namespace so
//! tests in one process do not collide).

use std::os::fd::AsRawFd;
use std::process::Command;

pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub net: u8,
    pub k: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new(k: u8) -> Netns {
        let id = std::process::id() % 200 + 20;
        let ns = Netns {
            name: format!("pcl-client-{id}-{k}"),
            host_if: format!("pclh{id}k{k}"),
            net: id as u8,
            k,
        };
        let peer = format!("pclc{id}k{k}");
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_if])
            .output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host()),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        for a in [ns.client(2), ns.client(3)] {
            ip(&[
                "netns",
                "exec",
                &ns.name,
                "ip",
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &peer,
            ]);
        }
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn host(&self) -> String {
        format!("10.{}.{}.1", 200 + self.k, self.net)
    }

    pub fn client(&self, last: u8) -> String {
        format!("10.{}.{}.{last}", 200 + self.k, self.net)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            // SAFETY: switches only this thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
