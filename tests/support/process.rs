//! The `portcullis` binary (or a wrapper running it) as a child process, with its stderr read
//! line by line; terminated on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A child process killed on drop, with its stderr lines streamed to a channel.
pub struct Running {
    pub child: Child,
    /// Stderr lines not read yet.
    pub lines: mpsc::Receiver<String>,
    /// Stderr lines read so far.
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        Running::start_logging(args, Some("info"))
    }

    /// `log`: the `PORTCULLIS_LOG` value, or `None` for the binary's default filter.
    pub fn start_logging(args: &[&str], log: Option<&str>) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("PORTCULLIS_LOG");
        if let Some(log) = log {
            cmd.env("PORTCULLIS_LOG", log);
        }
        Running::spawn(cmd.args(args))
    }

    /// Starts with the open-files limit (RLIMIT_NOFILE) set to `soft` and `hard`.
    pub fn start_with_open_files(args: &[&str], soft: u64, hard: u64) -> Running {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(BIN);
        cmd.env("PORTCULLIS_LOG", "info").args(args);
        // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Running::spawn(&mut cmd)
    }

    /// Starts `cmd` (the binary, or a wrapper that runs it) with its stderr read line by line.
    pub fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 20 s) for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with '{needle}' in:\n{}", self.seen.join("\n"));
    }

    /// Sends `sig`; false when the process is gone.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) == 0 }
    }

    /// SIGTERM, then waits (at most 10 s) for the exit; `None` if it had to be killed.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let status = self.exited_within(Duration::from_secs(10));
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        status
    }

    /// Waits at most `limit` for the process to exit.
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The address after `key=` in the "portcullis is serving" line.
    pub fn served_addr(serving: &str, key: &str) -> std::net::SocketAddr {
        serving
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .map(|a| a.trim_start_matches("Some(").trim_end_matches(')'))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {key} address in: {serving}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Terminated, not killed, so it can clean up (the demo removes its throwaway PKI).
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}
