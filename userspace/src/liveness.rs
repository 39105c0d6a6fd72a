//! Whether each event loop still runs.
//!
//! Every worker thread runs a single-threaded event loop that owns its connections to the end,
//! so a task that blocks its thread (a blocking write to a stalled log pipe, a lock never
//! released, a loop that never yields) freezes every connection that worker holds, while the
//! other workers keep accepting and `/health` would go on answering 200. To see that, each loop
//! (the workers', and the main runtime's, which serves the admin API, the registry and reloads)
//! stamps a beat every [`BEAT`]; a loop whose last beat is older than [`STALL`] is stalled. Then
//! `/health` answers 503 naming it, `portcullis_event_loops_stalled` counts it, the stall is
//! logged when seen and when it ends, and the systemd watchdog (`WatchdogSec=`) is no longer fed,
//! so systemd ends and restarts the gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often each event loop stamps its beat.
pub const BEAT: Duration = Duration::from_secs(1);

/// How old a loop's last beat may be before the loop counts as stalled: five beats, so a loop
/// busy with ready work (which still runs its timers every few dozen polls) is never taken for a
/// stalled one.
pub const STALL: Duration = Duration::from_secs(5);

/// The last beat of each event loop: one slot per worker thread, then the main runtime's.
pub struct Liveness {
    start: Instant,
    /// Milliseconds from `start` to the loop's last beat.
    beats: Box<[AtomicU64]>,
}

/// A loop that has not stamped its beat for longer than the limit asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    /// `w<index>` for worker `index` (its thread is `portcullis-w<index>`), `main` for the main
    /// runtime.
    pub name: String,
    /// Since its last beat.
    pub silent: Duration,
}

impl Liveness {
    /// Slots for `workers` worker loops and the main runtime, each counted as having beaten now.
    pub fn new(workers: usize) -> Self {
        Liveness {
            start: Instant::now(),
            beats: (0..=workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The main runtime's slot (after the workers').
    pub fn main_slot(&self) -> usize {
        self.beats.len() - 1
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Stamps `slot`'s beat.
    pub fn beat(&self, slot: usize) {
        if let Some(b) = self.beats.get(slot) {
            b.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// How long since `slot`'s last beat (zero for a slot that does not exist).
    pub fn silent(&self, slot: usize) -> Duration {
        let Some(b) = self.beats.get(slot) else {
            return Duration::ZERO;
        };
        Duration::from_millis(self.now_ms().saturating_sub(b.load(Ordering::Relaxed)))
    }

    fn name(&self, slot: usize) -> String {
        if slot == self.main_slot() {
            "main".to_string()
        } else {
            format!("w{slot}")
        }
    }

    /// The loops whose last beat is older than `limit`, in slot order.
    pub fn stalled(&self, limit: Duration) -> Vec<Stalled> {
        (0..self.beats.len())
            .filter_map(|slot| {
                let silent = self.silent(slot);
                (silent > limit).then(|| Stalled {
                    name: self.name(slot),
                    silent,
                })
            })
            .collect()
    }

    /// What `/health` says of stalled loops: `None` while every loop runs.
    pub fn health(&self) -> Option<String> {
        let stalled = self.stalled(STALL);
        if stalled.is_empty() {
            return None;
        }
        let mut text = String::from("stalled:");
        for s in &stalled {
            text.push_str(&format!(
                " event loop {} has not run for {:.1} s;",
                s.name,
                s.silent.as_secs_f64()
            ));
        }
        text.pop();
        text.push('\n');
        Some(text)
    }
}

/// Stamps `slot`'s beat every [`BEAT`] for as long as the loop it runs on lets it.
pub async fn beat(liveness: &Liveness, slot: usize) -> ! {
    let mut every = tokio::time::interval(BEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        liveness.beat(slot);
    }
}

/// Logs loops as they stall and as they run again (called once a beat from the main runtime),
/// and returns how many are stalled now. `seen` holds the names stalled at the last call.
pub fn log_changes(liveness: &Liveness, seen: &mut Vec<String>) -> usize {
    let now = liveness.stalled(STALL);
    for s in &now {
        if !seen.contains(&s.name) {
            tracing::error!(
                event_loop = %s.name,
                silent_s = s.silent.as_secs_f64(),
                "an event loop has stopped running: a task is blocking its thread, and the \
                 connections it holds wait; /health answers 503 and the systemd watchdog is no \
                 longer fed"
            );
        }
    }
    for name in seen.iter() {
        if !now.iter().any(|s| &s.name == name) {
            tracing::warn!(event_loop = %name, "a stalled event loop runs again");
        }
    }
    *seen = now.into_iter().map(|s| s.name).collect();
    seen.len()
}

/// While `alive` holds, feeds the systemd watchdog (`WATCHDOG=1`) every half of its `period`
/// (`WATCHDOG_USEC`, see [`sd_notify::watchdog_enabled`]) from a thread of its own, so a stalled
/// runtime cannot feed it. The thread ends with the process.
pub fn feed_watchdog(
    period: Duration,
    alive: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let every = (period / 2).max(Duration::from_millis(10));
    std::thread::Builder::new()
        .name("portcullis-watchdog".to_string())
        .spawn(move || loop {
            if alive() {
                // An error here (the socket gone) is not worth a log line every period: systemd
                // notices the silence either way.
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            std::thread::sleep(every);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Two real single-threaded event loops, as the workers run them: one of them blocked by a
    /// task that sleeps on its thread is stalled, the other is not, and both run once it ends.
    #[test]
    fn a_loop_blocked_by_a_task_is_stalled_and_the_others_are_not() {
        let live = Arc::new(Liveness::new(2));
        let limit = Duration::from_millis(300);
        let mut loops = Vec::new();
        let (stop, _) = tokio::sync::watch::channel(false);
        for slot in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (live, mut stop) = (live.clone(), stop.subscribe());
            loops.push(std::thread::spawn(move || {
                rt.block_on(async move {
                    let every = Duration::from_millis(50);
                    let beats = async {
                        loop {
                            live.beat(slot);
                            tokio::time::sleep(every).await;
                        }
                    };
                    let blocker = async {
                        if slot == 1 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            // What a blocking call does to the loop.
                            std::thread::sleep(Duration::from_millis(1_000));
                        }
                        std::future::pending::<()>().await;
                    };
                    tokio::select! {
                        _ = beats => {}
                        _ = blocker => {}
                        _ = stop.changed() => {}
                    }
                });
            }));
        }
        // The main slot, beaten by this thread.
        let main = live.main_slot();
        let deadline = Instant::now() + Duration::from_millis(700);
        while Instant::now() < deadline {
            live.beat(main);
            std::thread::sleep(Duration::from_millis(50));
        }
        let stalled = live.stalled(limit);
        assert_eq!(
            stalled.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["w1"],
            "{stalled:?}"
        );
        assert!(stalled[0].silent > limit && stalled[0].silent < Duration::from_secs(1));
        // Once the blocking call returns, the loop beats again.
        let deadline = Instant::now() + Duration::from_millis(900);
        while Instant::now() < deadline {
            live.beat(main);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(live.stalled(limit), []);
        let _ = stop.send(true);
        for l in loops {
            l.join().unwrap();
        }
    }

    #[test]
    fn health_names_each_stalled_loop_and_log_changes_tracks_them() {
        let live = Liveness {
            start: Instant::now() - Duration::from_secs(20),
            beats: [12_000, 20_000, 9_000].map(AtomicU64::new).into(),
        };
        // w0 silent about 8 s, w1 beat now, main silent about 11 s.
        let text = live.health().unwrap();
        assert!(
            text.starts_with("stalled: event loop w0 has not run for 8.")
                && text.contains("; event loop main has not run for 11.")
                && text.ends_with(" s\n"),
            "{text:?}"
        );
        let mut seen = Vec::new();
        assert_eq!(log_changes(&live, &mut seen), 2);
        assert_eq!(seen, ["w0", "main"]);
        live.beat(0);
        assert_eq!(log_changes(&live, &mut seen), 1);
        assert_eq!(seen, ["main"]);
        live.beat(2);
        assert_eq!(log_changes(&live, &mut seen), 0);
        assert_eq!(live.health(), None);
    }
}
