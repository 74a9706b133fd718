//! Scale bench (issue 16): how the supervisor's cost grows with the number of plugins and
//! with the number of queued tasks. Plugins are the protocol-only child in
//! `benches/common/minimal.rs` (this binary run with `BENCH_MINIMAL_CHILD=1`), so what is
//! measured is the worker's side. Run with `cargo bench --bench scale`.
//!
//! - 50 plugins x 2 instances: time from start until every instance is ready, this process's
//!   RSS growth (the supervisor's own memory, children apart), and one plugin's one-at-a-time
//!   p99 latency while another plugin is replaced by a reload, against the same without it.
//! - One plugin, one instance, concurrency 1: N tasks submitted at once (1k, 10k, 100k), the
//!   RSS growth per queued task and the drain rate, which should stay flat as N grows.

#[path = "common/minimal.rs"]
mod minimal;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::dispatch::Dispatcher;
use worker::manifest::Manifest;
use worker::supervisor::pool::PoolOptions;
use worker::supervisor::Supervisor;
use worker::task::TaskRequest;

const PLUGINS: usize = 50;
const LATENCY_SAMPLES: usize = 2_000;

fn options() -> PoolOptions {
    PoolOptions {
        worker_name: "bench".into(),
        max_line_bytes: 1 << 24,
        queue_capacity: 1 << 20,
        state_dir: None,
        plugin_user: None,
        events: worker::events::EventBus::new(),
        cgroups: None,
    }
}

/// A minimal child plugin `name` serving `<name>.noop`.
fn plugin(root: &Path, name: &str, version: &str, instances: u32, concurrency: u32) -> Manifest {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let me = std::env::current_exe().unwrap().display().to_string();
    let user = if nix::unistd::geteuid().is_root() {
        "user = \"root\"\n"
    } else {
        ""
    };
    let text = format!(
        "name = {name:?}\nversion = {version:?}\ncommand = [{me:?}]\n{user}instances = {instances}\nconcurrency = {concurrency}\n[env]\nBENCH_MINIMAL_CHILD = \"1\"\nBENCH_TASK = \"{name}.noop\"\nBENCH_NAME = {name:?}\n[[tasks]]\nname = \"{name}.noop\"\n"
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    Manifest::load(&dir).unwrap()
}

/// This process's resident memory, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One-at-a-time latencies of `task`, `n` of them.
async fn latencies(d: &Dispatcher, task: &str, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let outcome = d
            .submit(TaskRequest::new(task, vec![], Default::default()))
            .outcome(|_| {})
            .await;
        assert!(outcome.is_success(), "{outcome:?}");
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

async fn many_plugins(root: &Path) {
    let manifests: Vec<Manifest> = (0..PLUGINS)
        .map(|i| plugin(root, &format!("p{i:02}"), "1", 2, 4))
        .collect();
    let before = rss_kib();
    let started = Instant::now();
    let supervisor = Arc::new(Supervisor::start(manifests.clone(), options()));
    let not_ready = supervisor.wait_ready(Duration::from_secs(60)).await;
    assert!(not_ready.is_empty(), "{not_ready:?}");
    // wait_ready means one ready instance each; wait for both.
    for p in supervisor.plugins() {
        let mut view = p.view();
        let _ = view.wait_for(|v| v.ready == 2).await;
    }
    let ready_in = started.elapsed();
    let grew = rss_kib().saturating_sub(before);
    println!(
        "{PLUGINS} plugins x 2 instances: all ready in {ready_in:.1?}; supervisor RSS +{:.1} MiB ({:.0} KiB per instance)",
        grew as f64 / 1024.0,
        grew as f64 / (2 * PLUGINS) as f64
    );
    let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
    let quiet = latencies(&dispatcher, "p01.noop", LATENCY_SAMPLES).await;
    // The same while p00 is replaced (a new version) by a reload.
    let mut next = manifests.clone();
    next[0] = plugin(&root.join("v2"), "p00", "2", 2, 4);
    let reloading = {
        let s = supervisor.clone();
        tokio::spawn(async move { s.reload(next, Duration::from_secs(5), true).await })
    };
    // Sampled for as long as the reload runs (and at least as many as when quiet).
    let mut during = Vec::new();
    while during.len() < LATENCY_SAMPLES || !reloading.is_finished() {
        during.extend(latencies(&dispatcher, "p01.noop", 100).await);
    }
    during.sort();
    let report = reloading.await.unwrap();
    assert_eq!(report.replaced, vec!["p00".to_string()], "{report:?}");
    println!(
        "p01 one at a time, p50 / p99: {:.1?} / {:.1?} quiet; {:.1?} / {:.1?} over {} tasks while p00 is replaced by a reload ({:.2}x p99)",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len(),
        percentile(&during, 0.99).as_secs_f64() / percentile(&quiet, 0.99).as_secs_f64()
    );
    supervisor.stop(None).await;
}

async fn queued(root: &Path) {
    let m = plugin(root, "queue", "1", 1, 1);
    let supervisor = Arc::new(Supervisor::start(vec![m], options()));
    assert!(supervisor
        .wait_ready(Duration::from_secs(20))
        .await
        .is_empty());
    let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
    println!("one instance, concurrency 1, N tasks submitted at once:");
    for n in [1_000usize, 10_000, 100_000] {
        let before = rss_kib();
        let started = Instant::now();
        let runs: Vec<_> = (0..n)
            .map(|_| {
                let d = dispatcher.clone();
                tokio::spawn(async move {
                    d.submit(TaskRequest::new("queue.noop", vec![], Default::default()))
                        .outcome(|_| {})
                        .await
                })
            })
            .collect();
        // Let every submission reach the pool's queue before sampling the memory it holds.
        tokio::task::yield_now().await;
        let peak = rss_kib();
        for r in runs {
            assert!(r.await.unwrap().is_success());
        }
        let took = started.elapsed();
        println!(
            "  N = {n:>6}: {:>7.0} tasks/s drained; RSS +{:.1} MiB while queued ({:.2} KiB per task)",
            n as f64 / took.as_secs_f64(),
            peak.saturating_sub(before) as f64 / 1024.0,
            peak.saturating_sub(before) as f64 / n as f64
        );
    }
    supervisor.stop(None).await;
}

fn main() {
    if std::env::var_os("BENCH_MINIMAL_CHILD").is_some() {
        return minimal::child();
    }
    let root = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        many_plugins(root.path()).await;
        queued(root.path()).await;
    });
}
