//! A plugin starved of CPU is not taken for a hung one. Its health pings take it 0.15 s of
//! its own CPU time to answer, within its 0.3 s `ping_timeout`; while threads at its own
//! priority keep every CPU busy, those 0.15 s take it far longer than 0.3 s, and it is not
//! restarted, since the time it waited for a CPU is not its own. The idle-CPU policy of a
//! watcher (`[limits] idle_cpu`) is checked in tests/events.rs.

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::supervisor::process::cpu_wait;

/// Threads that keep every CPU busy until dropped.
struct Hogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    fn start() -> Hogs {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..6 * cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Hogs { stop, threads }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_starved_of_cpu_is_not_restarted_for_missed_pings() {
    const PING_TIMEOUT: Duration = Duration::from_millis(300);
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[("FAULT_PING", "burn:0.15")],
        "",
        "[timeouts]\nping_interval = 0.05\nping_timeout = 0.3\n",
    )]);
    h.ready().await;
    let pid = h.status("faulty").await.instances[0].pid.unwrap();
    let before = cpu_wait(pid).expect("this kernel keeps scheduler statistics");

    // Starve it: the hogs run until it has waited for a CPU several ping timeouts in all
    // (the wait is read from the kernel, not slept).
    let starved = tokio::task::spawn_blocking(move || {
        let hogs = Hogs::start();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut waited = Duration::ZERO;
        while waited < 5 * PING_TIMEOUT && Instant::now() < deadline {
            std::thread::yield_now();
            // Gone: it was ended (the assertions below say why).
            let Some(now) = cpu_wait(pid) else { break };
            waited = now.saturating_sub(before);
        }
        drop(hogs);
        waited
    })
    .await
    .unwrap();

    // Free CPUs: it serves, and was never restarted.
    assert_eq!(h.ok("f.ok", vec![json!(1)]).await, json!([1]));
    let s = h.status("faulty").await;
    assert_eq!(
        s.instances[0].restarts, 0,
        "restarted: {:?}",
        s.instances[0].last_exit
    );
    assert_eq!(s.instances[0].pid, Some(pid));
    assert!(
        starved >= 5 * PING_TIMEOUT,
        "the plugin waited only {starved:?} for a CPU under the hogs"
    );
    h.stop().await;
}
