//! Scale bench: how the supervisor's cost grows with the number of plugins and
//! with the number of queued tasks. Plugins are the protocol-only child in
//! `benches/common/minimal.rs` (this binary run with `BENCH_MINIMAL_CHILD=1`), so what is
//! measured is the worker's side. Run with `cargo bench --bench scale`.
//!
//! - 50 plugins x 2 instances: time from start until every instance is ready, this process's
//!   RSS growth (the supervisor's own memory, children apart), and one plugin's one-at-a-time
//!   p99 latency while another plugin is replaced by a reload, against the same without it.
//! - One plugin, one instance, concurrency 1: N tasks submitted at once, the RSS growth per
//!   queued task and the drain rate, which should stay flat as N grows. N = 1k and 100k in
//!   rounds (`benches/common/rounds.rs`), each round 20 drains of 1k, half before its drain of
//!   100k and half after, for the goal: drain rate with 100k queued / with 1k >= 0.8x, taken
//!   round by round and met only when the whole spread (lowest-highest) clears it; then
//!   N = 10k once. Before each drain the allocator hands its free memory back (jemalloc's
//!   `arena.<all>.purge`), so a run's RSS growth is its own, not a larger run's leftovers
//!   reused.
//! - The real daemon: `worker serve` (release build, no broker) with the same 50 plugins x 2
//!   installed: time until it tells systemd READY=1 and until all 100 instances are ready,
//!   and its idle RSS (goal: < 30 MiB).
//! - The AMQP source's memories at their limits and at 10x: answered task ids (result_memory,
//!   default 10,000) and revoked ids (Celery's 50,000): RSS per id, insert cost once full
//!   (pruning), lookup cost (hit and miss). Each in a fresh process, so RSS is its own.
//!
//! Knobs (environment): `BENCH_ROUNDS`, the queued-drain rounds (default 5; fewer only when set
//! so, and then the goal is not met); `BENCH_DRAIN_ONLY=<n>x<times>` (e.g. `100000x1`): only
//! that drain, to profile it (`perf stat`, `perf record`).

#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/idle.rs"]
mod idle;
#[path = "common/minimal.rs"]
mod minimal;
#[path = "common/procstat.rs"]
#[allow(dead_code)] // each bench uses its own part
mod procstat;
#[path = "common/rounds.rs"]
#[allow(dead_code)] // each bench uses its own part
mod rounds;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::dispatch::Dispatcher;
use worker::manifest::Manifest;
use worker::supervisor::pool::{PoolHandle, PoolOptions};
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
        offers: Default::default(),
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

/// `m` with health pings off: a bench stops its process (SIGSTOP) for seconds at a time.
fn without_pings(m: Manifest) -> Manifest {
    let path = m.dir.join("plugin.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text + "[timeouts]\nping_interval = 3600\n").unwrap();
    Manifest::load(&m.dir).unwrap()
}

/// This process's resident memory, KiB.
fn rss_kib() -> u64 {
    procstat::rss_kib(std::process::id())
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

/// Hands the allocator's free memory back to the kernel: the worker's allocator is jemalloc
/// (`src/allocator.rs`), and purging every arena returns its dirty and muzzy pages at once
/// instead of after their decay time.
fn release_free_memory() {
    // MALLCTL_ARENAS_ALL: every arena.
    let purge = c"arena.4096.purge";
    // SAFETY: a void mallctl (no old or new value); it releases free pages, none in use.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            purge.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(failed, 0, "jemalloc refused arena.4096.purge");
}

/// The queued drains: one instance with one slot, its plugin stopped (SIGSTOP) while the tasks
/// are submitted, so all but one wait in the pool's queue; then it goes on (SIGCONT).
struct Queue {
    dispatcher: Arc<Dispatcher>,
    pool: PoolHandle,
    pid: u32,
}

/// One drain (or several of the same size, taken together): how many tasks were queued at
/// once, how fast they drained, how much this process grew while they waited.
#[derive(Debug, Clone, Copy)]
struct Drain {
    n: usize,
    /// Tasks drained in all (n times the drains taken together).
    tasks: usize,
    per_sec: f64,
    rss_kib: u64,
}

impl Drain {
    /// Two sets of drains of the same size taken together: their tasks over their summed
    /// times, and the larger growth.
    fn with(&self, other: &Drain) -> Drain {
        let (a, b) = (self.tasks as f64, other.tasks as f64);
        Drain {
            n: self.n,
            tasks: self.tasks + other.tasks,
            per_sec: (a + b) / (a / self.per_sec + b / other.per_sec),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }

    fn kib_per_task(&self) -> f64 {
        self.rss_kib as f64 / self.n as f64
    }

    fn print(&self, label: &str) {
        println!(
            "  {label}: N = {:>6}: {:>7.0} tasks/s drained; RSS +{:.1} MiB while queued ({:.2} KiB per task)",
            self.n,
            self.per_sec,
            self.rss_kib as f64 / 1024.0,
            self.kib_per_task()
        );
    }
}

impl Queue {
    fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), s).unwrap();
    }

    /// `times` drains (at least one) of `n` queued tasks, taken together ([`Drain::with`]).
    async fn drains(&self, n: usize, times: usize) -> Drain {
        let mut all = self.drain(n).await;
        for _ in 1..times {
            all = all.with(&self.drain(n).await);
        }
        all
    }

    async fn drain(&self, n: usize) -> Drain {
        // What the last drain freed goes back to the kernel first, or a run after a larger
        // one would grow into memory the process already holds.
        release_free_memory();
        let before = rss_kib();
        // Stopped, the plugin holds one task and every other one waits in the pool's queue.
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let runs: Vec<_> = (0..n)
            .map(|_| {
                let d = self.dispatcher.clone();
                tokio::spawn(async move {
                    d.submit(TaskRequest::new("queue.noop", vec![], Default::default()))
                        .outcome(|_| {})
                        .await
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.pool.status().await.unwrap().queued < n - 1 {
            assert!(
                Instant::now() < deadline,
                "not every task reached the queue"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let peak = rss_kib();
        let resumed = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGCONT);
        for r in runs {
            assert!(r.await.unwrap().is_success());
        }
        Drain {
            n,
            tasks: n,
            per_sec: n as f64 / resumed.elapsed().as_secs_f64(),
            rss_kib: peak.saturating_sub(before),
        }
    }
}

/// Queued tasks in rounds: each round drains SMALL and LARGE (the order flipped every round),
/// for the goal that the drain rate stays flat as the queue grows; MIDDLE once after them.
async fn queued(root: &Path) {
    const SMALL: usize = 1_000;
    const MIDDLE: usize = 10_000;
    const LARGE: usize = 100_000;
    /// Drains of SMALL per round: 20,000 tasks, about a third of a second.
    const SMALL_DRAINS: usize = 20;
    let m = without_pings(plugin(root, "queue", "1", 1, 1));
    let supervisor = Arc::new(Supervisor::start(vec![m], options()));
    assert!(supervisor
        .wait_ready(Duration::from_secs(20))
        .await
        .is_empty());
    let pool = supervisor.plugin("queue").unwrap();
    let queue = Queue {
        dispatcher: Arc::new(Dispatcher::new(supervisor.clone())),
        pid: pool.status().await.unwrap().instances[0].pid.unwrap(),
        pool,
    };
    // BENCH_DRAIN_ONLY=<n>x<times>: only that drain (e.g. 100000x1), to profile it.
    if let Some((n, times)) = std::env::var("BENCH_DRAIN_ONLY").ok().and_then(|spec| {
        let (n, times) = spec.split_once('x')?;
        Some((n.parse().ok()?, times.parse().ok()?))
    }) {
        queue.drains(n, times).await.print("only");
        supervisor.stop(None).await;
        return;
    }
    let rounds = rounds::from_env();
    println!("one instance, concurrency 1, N tasks submitted at once in-process, queued while the plugin is stopped; {rounds} rounds of {SMALL_DRAINS} drains of N = {SMALL}, half before one of N = {LARGE} and half after it:");
    let mut drains: Vec<(Drain, Drain)> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        // A drain of 1,000 takes about 16 ms, and this host's speed wanders by half for
        // longer than that (`BENCH_PROFILE_HOST` in the supervisor bench): one such drain drew
        // 46k-90k tasks/s from round to round. So each round drains 1,000 queued tasks
        // SMALL_DRAINS times, half before the large drain and half after it, and takes their
        // tasks over their summed times (the queue refilled and the memory released before
        // each, as for the large one).
        let before = queue.drains(SMALL, SMALL_DRAINS / 2).await;
        let large = queue.drain(LARGE).await;
        let after = queue.drains(SMALL, SMALL_DRAINS - SMALL_DRAINS / 2).await;
        let small = before.with(&after);
        small.print(&format!("round {round}, {SMALL_DRAINS} drains"));
        large.print(&format!("round {round}"));
        drains.push((small, large));
    }
    queue.drain(MIDDLE).await.print("single run");
    supervisor.stop(None).await;
    println!(
        "  drained, median (lowest-highest) over the rounds: N = {SMALL}: {} tasks/s; N = {LARGE}: {} tasks/s",
        rounds::spread(drains.iter().map(|d| d.0.per_sec), 0),
        rounds::spread(drains.iter().map(|d| d.1.per_sec), 0),
    );
    println!(
        "  RSS per queued task, N = {LARGE}: {} KiB (the first round's: {:.2} KiB)",
        rounds::spread(drains.iter().map(|d| d.1.kib_per_task()), 2),
        drains[0].1.kib_per_task()
    );
    rounds::goals_header();
    rounds::goal(
        "drain rate with 100,000 queued / with 1,000 queued",
        &drains
            .iter()
            .map(|(small, large)| Some(large.per_sec / small.per_sec))
            .collect::<Vec<_>>(),
        rounds::Want::AtLeast(0.8),
        rounds::Unit::Ratio,
    );
}

/// The id memories at `limit`, in this (fresh) process: prints one line.
fn id_memory(kind: &str, limit: usize) {
    use worker::source::engine::{ledger::Ledger, revoked::Revoked};
    // Celery task ids are UUIDs: 36 characters.
    let id = |i: usize| format!("{:08x}-0000-4000-8000-{:012x}", i >> 16, i);
    let mut ledger: Ledger<(), ()> = Ledger::new(limit);
    let mut revoked = Revoked::with_limit(limit);
    let mut remember = |i: usize| match kind {
        "answered" => {
            // One id shared by both calls, as a delivery's task id is.
            let task_id = worker::task::TaskId::from(id(i));
            ledger.arrive(&task_id, (), ());
            ledger.answered(&task_id);
        }
        _ => revoked.insert(&id(i)),
    };
    let before = procstat::rss_kib(std::process::id());
    (0..limit).for_each(&mut remember);
    let full = procstat::rss_kib(std::process::id()).saturating_sub(before);
    // Once full, every insert also forgets the oldest id.
    let started = Instant::now();
    (limit..2 * limit).for_each(&mut remember);
    let insert = started.elapsed() / limit as u32;
    // Alternately a remembered id and one never seen, made before the clock starts.
    let probes: Vec<String> = (0..100_000)
        .map(|i| {
            if i % 2 == 0 {
                id(limit + i % limit)
            } else {
                id(3 * limit + i)
            }
        })
        .collect();
    let lookups = 10 * probes.len();
    let started = Instant::now();
    let mut hits = 0;
    for probe in probes.iter().cycle().take(lookups) {
        let hit = match kind {
            "answered" => ledger.is_answered(probe),
            _ => revoked.contains(probe),
        };
        hits += usize::from(hit);
    }
    assert_eq!(hits, lookups / 2, "every remembered id is found, no other");
    let lookup = started.elapsed() / lookups as u32;
    println!(
        "  {kind:<8} ids, limit {limit:>7}: RSS +{:>6.1} MiB when full ({:>3.0} B per id); insert at the limit {:>5.0?} (making the id included); lookup {:>5.0?}",
        full as f64 / 1024.0,
        full as f64 * 1024.0 / limit as f64,
        insert,
        lookup
    );
}

/// Runs [`id_memory`] for each limit in a fresh copy of this process.
fn id_memories() {
    println!("AMQP source id memories (answered: result_memory, default 10,000; revoked: 50,000 as Celery):");
    for (kind, limit) in [
        ("answered", 10_000),
        ("answered", 100_000),
        ("revoked", 50_000),
        ("revoked", 500_000),
    ] {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env("BENCH_ID_MEMORY", format!("{kind}:{limit}"))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn main() {
    if std::env::var_os("BENCH_MINIMAL_CHILD").is_some() {
        return minimal::child();
    }
    if let Ok(spec) = std::env::var("BENCH_ID_MEMORY") {
        let (kind, limit) = spec.split_once(':').unwrap();
        return id_memory(kind, limit.parse().unwrap());
    }
    let _idle = idle::hold();
    let root = tempfile::tempdir().unwrap();
    // The worker's own runtime, as `worker serve` builds it; the work a spawned task, as the
    // daemon's sources are.
    let rt = worker::runtime::build(worker::config::Config::default().runtime_threads).unwrap();
    let dir = root.path().to_path_buf();
    rt.block_on(async {
        let work = async move {
            if std::env::var_os("BENCH_DRAIN_ONLY").is_none() {
                many_plugins(&dir).await;
            }
            queued(&dir).await;
        };
        tokio::spawn(work).await.unwrap();
    });
    if std::env::var_os("BENCH_DRAIN_ONLY").is_some() {
        return;
    }
    serve::idle(root.path());
    serve::queued_on_socket(root.path());
    id_memories();
}

/// The real daemon, as an operator runs it: `worker serve` (release build, no broker).
mod serve {
    use super::daemon::Daemon;
    use super::{plugin, procstat, without_pings, PLUGINS};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// 50 installed plugins x 2 instances: ready times and idle RSS.
    pub fn idle(root: &Path) {
        let dir = root.join("serve-plugins");
        for i in 0..PLUGINS {
            plugin(&dir, &format!("s{i:02}"), "1", 2, 4);
        }
        let daemon = Daemon::start(root, &dir, &[]);
        let started = Instant::now() - daemon.ready_after;
        let deadline = Instant::now() + Duration::from_secs(60);
        while daemon.ready_instances() < 2 * PLUGINS {
            assert!(Instant::now() < deadline, "not every instance became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        let all_ready = started.elapsed();
        // Idle: nothing submitted; the largest of a few samples over two seconds.
        let rss = (0..10)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                procstat::rss_kib(daemon.pid())
            })
            .max()
            .unwrap_or(0);
        let children = procstat::descendants(daemon.pid()).len();
        let mib = rss as f64 / 1024.0;
        let verdict = if mib < 30.0 { "met" } else { "NOT met" };
        println!(
            "worker serve, {PLUGINS} installed plugins x 2 instances ({children} children): READY=1 after {:.0?}, all instances ready after {all_ready:.0?}; idle RSS {mib:.1} MiB (goal < 30 MiB: {verdict})",
            daemon.ready_after
        );
        daemon.stop();
    }

    /// Tasks queued on the control socket with one slot: while the plugin is stopped
    /// (SIGSTOP), N submits are sent, at most 250 per connection (the daemon serves 256
    /// requests per connection and 256 connections, so at most 65,536 tasks can wait on the
    /// socket; 100,000 is measured in-process above), and all are accepted; the daemon's RSS
    /// growth over N is the memory per queued task. Then the plugin goes on (SIGCONT) and the
    /// drain rate is N over the time to the last result.
    pub fn queued_on_socket(root: &Path) {
        const PER_CONNECTION: usize = 250;
        let dir = root.join("queue-plugins");
        without_pings(plugin(&dir, "q", "1", 1, 1));
        let daemon = Daemon::start(root, &dir, &["--queue-capacity", "1000000"]);
        let plugin_pid = procstat::descendants(daemon.pid())[0];
        let signal =
            |s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(plugin_pid as i32), s).unwrap();
        println!("worker serve, one instance with one slot, N tasks queued on the control socket ({PER_CONNECTION} per connection):");
        for n in [1_000usize, 10_000, 60_000] {
            let before = procstat::rss_kib(daemon.pid());
            signal(nix::sys::signal::Signal::SIGSTOP);
            let mut connections = Vec::new();
            for first in (0..n).step_by(PER_CONNECTION) {
                let count = PER_CONNECTION.min(n - first);
                let mut conn = UnixStream::connect(&daemon.socket).unwrap();
                let mut batch = String::new();
                for i in first..first + count {
                    batch.push_str(&format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"task.submit\",\"params\":{{\"name\":\"q.noop\"}}}}\n"));
                }
                conn.write_all(batch.as_bytes()).unwrap();
                let mut lines = BufReader::new(conn).lines();
                let mut accepted = 0;
                while accepted < count {
                    let line = lines.next().unwrap().unwrap();
                    accepted += usize::from(line.contains("task.accepted"));
                }
                connections.push((lines, count));
            }
            let queued = procstat::rss_kib(daemon.pid()).saturating_sub(before);
            let resumed = Instant::now();
            signal(nix::sys::signal::Signal::SIGCONT);
            for (lines, count) in &mut connections {
                let mut done = 0;
                while done < *count {
                    let line = lines.next().unwrap().unwrap();
                    assert!(!line.contains("\"error\""), "{line}");
                    done += usize::from(!line.contains("\"method\""));
                }
            }
            let took = resumed.elapsed();
            println!(
                "  N = {n:>6}: {:>7.0} tasks/s drained; daemon RSS +{:.1} MiB while queued ({:.2} KiB per task)",
                n as f64 / took.as_secs_f64(),
                queued as f64 / 1024.0,
                queued as f64 / n as f64
            );
        }
        daemon.stop();
    }
}
