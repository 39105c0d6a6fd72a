//! A client network namespace joined to the host by a veth pair, torn down on drop. Addresses:
//! host side 10.(200+K).N.1, namespace side .2 and .3 (N from the process id, K per namespace so
//! tests in one process do not collide).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

pub struct Netns {
    pub name: String,
    pub host_if: String,
    /// The veth end inside the namespace.
    pub peer_if: String,
    pub net: u8,
    pub k: u8,
    /// The XDP_PASS program on the namespace's veth end, attached while this is open.
    link: Option<OwnedFd>,
}

/// Loads a two-instruction XDP program that passes every frame and attaches it to `dev` (in
/// the calling thread's namespace) with a BPF link, which detaches when the fd is closed.
fn xdp_pass_link(dev: &str) -> OwnedFd {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    // r0 = XDP_PASS; exit.
    let insns: [u64; 2] = [0xb7 | (2u64 << 32), 0x95];
    let license = c"GPL";
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128], what: &str| -> OwnedFd {
        // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the pointers in it
        // outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd the kernel just returned, owned from here on.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    };
    let mut load = [0u8; 128];
    load[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    load[4..8].copy_from_slice(&2u32.to_ne_bytes());
    load[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    load[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    let prog = bpf(BPF_PROG_LOAD, &mut load, "load the XDP_PASS program");
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {dev}");
    let mut link = [0u8; 128];
    link[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    link[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    link[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut link, "attach the XDP_PASS program")
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
        let peer = format!("pclc{id}k{k}");
        let mut ns = Netns {
            name: format!("pcl-client-{id}-{k}"),
            host_if: format!("pclh{id}k{k}"),
            peer_if: peer.clone(),
            net: id as u8,
            k,
            link: None,
        };
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
        for a in (2..=5).map(|last| ns.client(last)) {
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
        // What an XDP program on the host end sends back (`XDP_TX`: the gate's RST answering a
        // rejected flow) is only taken by a veth end that runs an XDP program itself; a
        // physical NIC's driver needs nothing of the kind.
        ns.link = Some(ns.run(move || xdp_pass_link(&peer)));
        ns
    }

    /// Takes the namespace's end of the link down (or up again): what the host sends there is
    /// dropped without a word, as when a machine vanishes.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.peer_if,
            state,
        ]);
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

    /// Runs the future `f` makes on a current-thread runtime, on a thread inside the namespace.
    pub fn block_on<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T>,
    {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.link.take();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
