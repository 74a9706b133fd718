//! Redis benchmark: drain rate of N no-op Celery tasks preloaded in the `celery` list of a
//! private `redis-server`, results to the Redis result backend (db 1), for `worker` with the
//! Rust SDK plugin and for the Celery 5 worker (prefork -c 2 and threads -c 8) on the same
//! Redis. Also each contender's memory, and the CPU time per task of the contender, of its
//! children (plugins, pool processes) and of redis-server, from `/proc/<pid>/stat`.
//! Run with `benches/run-redis.sh` (builds first; needs `redis-server` and the Celery venv in
//! `target/celery-venv` with redis-py, which the Redis broker tests create).
//!
//! Every contender drains the same load: N messages pushed here in kombu's envelope with
//! Celery's protocol v2 headers, as the Python client pushes them. Each final state is SET
//! and PUBLISHed on `celery-task-meta-<id>` by the result backend; this program counts the
//! `SUCCESS` ones with one PSUBSCRIBE. Rate = states / (time of the last - time of the
//! first), so start-up is excluded; CPU is read at the first and the last, over the same
//! window. Rounds are interleaved (every contender once per round); the figures are medians
//! over the rounds, with the spread (lowest to highest) beside them.

#[path = "common/idle.rs"]
mod idle;
#[path = "common/procstat.rs"]
#[allow(dead_code)] // each bench uses its own part
mod procstat;
#[path = "common/redis_load.rs"]
mod redis_load;
#[path = "common/rounds.rs"]
#[allow(dead_code)] // each bench uses its own part
mod rounds;

use redis_load::{Server, Span};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const QUEUE: &str = "celery";

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the release binaries are: `target/release`, or BENCH_BIN_DIR (another build).
fn bin_dir() -> PathBuf {
    std::env::var_os("BENCH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release"))
}

struct Contender {
    name: &'static str,
    task: &'static str,
    /// Starts the contender on the broker (db 0) and result backend (db 1) of `server`.
    start: Box<dyn Fn(&Server) -> Child>,
}

/// One drain's figures.
#[derive(Debug, Clone)]
struct Run {
    span: Option<Span>,
    /// CPU used from the first to the last completion: the contender itself, its children,
    /// redis-server.
    cpu: (Duration, Duration, Duration),
    /// RSS (KiB) of the contender and of its children, at the half-way completion.
    rss: (u64, u64),
}

impl Run {
    fn rate(&self) -> f64 {
        self.span.map(|s| s.rate()).unwrap_or(0.0)
    }

    /// CPU µs per task of (the contender, its children, redis-server).
    fn cpu_per_task(&self) -> (f64, f64, f64) {
        let n = self.span.map_or(2, |s| s.count.max(2)) - 1;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        (per(self.cpu.0), per(self.cpu.1), per(self.cpu.2))
    }
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    for _ in 0..100 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU so far of (the contender, its children, redis-server).
fn cpu_now(pid: u32, redis: u32) -> (Duration, Duration, Duration) {
    let (own, kids) = procstat::tree_cpu(pid);
    (own, kids, procstat::cpu(redis))
}

/// One drain: empty Redis, preload, start the contender, count its results, stop it.
fn run_once(server: &Server, c: &Contender, n: usize) -> Run {
    server.flush();
    server.preload(c.task, QUEUE, n);
    let redis = server.pid();
    let mut at_first = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut rss = (0, 0);
    let (child, span) = redis_load::drain(
        server,
        n,
        Duration::from_secs(300),
        || (c.start)(server),
        |child: &Child, k| {
            if k == 1 {
                at_first = cpu_now(child.id(), redis);
            } else {
                rss = procstat::tree_rss_kib(child.id());
            }
        },
    );
    let at_last = cpu_now(child.id(), redis);
    stop(child);
    let left = server.left(QUEUE);
    if span.is_some() && left != (n, 0, 0) {
        eprintln!(
            "  {}: {} results stored, {} messages left in the queue, {} unacked (expected {n}, 0, 0)",
            c.name, left.0, left.1, left.2
        );
    }
    let (a, b) = (at_first, at_last);
    let cpu = (
        b.0.saturating_sub(a.0),
        b.1.saturating_sub(a.1),
        b.2.saturating_sub(a.2),
    );
    Run { span, cpu, rss }
}

fn celery(pool: &'static str, concurrency: &'static str) -> Box<dyn Fn(&Server) -> Child> {
    let venv = repo().join("target/celery-venv/bin");
    Box::new(move |server: &Server| {
        Command::new(venv.join("celery"))
            .args(["-A", "benchapp", "worker", "-P", pool, "-c", concurrency])
            .args(["-Q", QUEUE, "-l", "warning", "--without-gossip"])
            .args(["--without-mingle", "--without-heartbeat", "-n"])
            .arg(format!("celery-bench-{pool}@%h"))
            .current_dir(repo().join("benches/celery"))
            .env("BROKER_URL", server.url(0))
            .env("RESULT_BACKEND", server.url(1))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    })
}

/// `worker serve` on the Redis broker with the Rust example plugin (2 instances x 16, as in
/// the AMQP bench) installed in a state directory of its own under `root`.
fn ours(root: &Path) -> Box<dyn Fn(&Server) -> Child> {
    let bin = bin_dir().join("worker");
    let plugins = root.join("plugins");
    let dir = plugins.join("rust-echo");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = format!(
        "name = \"rust-echo\"\nversion = \"1\"\ncommand = [{:?}]\ninstances = 2\nconcurrency = 16\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n[[tasks]]\nname = \"rust.flood\"\n",
        bin_dir().join("examples/rust-echo").display().to_string()
    );
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    let state = root.join("state");
    let socket = root.join("worker.sock");
    let installed = Command::new(&bin)
        .args(["plugins", "install", "--plugins"])
        .arg(&plugins)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "plugins install failed: {}",
        String::from_utf8_lossy(&installed.stdout)
    );
    Box::new(move |server: &Server| {
        Command::new(&bin)
            .args(["serve", "--log-level", "warn", "--broker", &server.url(0)])
            .args(["--result-backend", &server.url(1), "-Q", QUEUE])
            .args(["-n", "worker-bench@host", "--plugins"])
            .arg(&plugins)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    })
}

fn main() {
    let _idle = idle::hold();
    let n = env_or("BENCH_N", 20_000).max(2);
    let rounds = env_or("BENCH_ROUNDS", 5).max(1);
    let venv = repo().join("target/celery-venv/bin");
    let has_redis_py = Command::new(venv.join("python"))
        .args(["-c", "import celery, redis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_redis_py,
        "needs the Celery venv with redis-py in target/celery-venv: the Redis broker tests create it (or: /usr/bin/python3 -m venv target/celery-venv && target/celery-venv/bin/pip install 'celery>=5.4,<6' 'redis>=4.5')"
    );
    for b in ["worker", "examples/rust-echo"] {
        let path = bin_dir().join(b);
        assert!(
            path.exists(),
            "{} missing: run benches/run-redis.sh",
            path.display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let all = [
        Contender {
            name: "celery prefork -c 2",
            task: "bench.noop",
            start: celery("prefork", "2"),
        },
        Contender {
            name: "celery threads -c 8",
            task: "bench.noop",
            start: celery("threads", "8"),
        },
        Contender {
            name: "worker + rust plugin",
            task: "rust.noop",
            start: ours(tmp.path()),
        },
    ];
    // BENCH_ONLY=worker,prefork (substrings of contenders' names) runs just the matching ones.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let selected: Vec<&Contender> = all
        .iter()
        .filter(|c| only.split(',').any(|o| c.name.contains(o)))
        .collect();
    let server = Server::start();
    // Interleaved: drift in the machine's speed hits every contender alike.
    let mut samples: Vec<Vec<Run>> = vec![Vec::new(); selected.len()];
    for round in 1..=rounds {
        for (i, c) in selected.iter().enumerate() {
            let run = run_once(&server, c, n);
            match run.span {
                Some(_) => eprintln!(
                    "round {round}: {:<22} {:>8.0} tasks/s  {:>7.1} + {:>6.1} us/task, redis {:>5.1}",
                    c.name,
                    run.rate(),
                    run.cpu_per_task().0,
                    run.cpu_per_task().1,
                    run.cpu_per_task().2
                ),
                None => eprintln!("round {round}: {:<22} did not finish", c.name),
            }
            samples[i].push(run);
        }
    }
    drop(server);
    report::print(n, rounds, &selected, &samples);
}

/// The table and the ratios, from every round.
mod report {
    use super::rounds::{spread, Spread};
    use super::{Contender, Run};

    /// The median of `values` (NaN when there is none).
    fn median(values: impl IntoIterator<Item = f64>) -> f64 {
        Spread::of(values).map_or(f64::NAN, |s| s.median)
    }

    fn total_cpu(r: &Run) -> f64 {
        let (own, kids, _) = r.cpu_per_task();
        own + kids
    }

    pub fn print(n: usize, rounds: usize, contenders: &[&Contender], samples: &[Vec<Run>]) {
        println!("\n{n} no-op tasks preloaded in the `celery` list, results to the Redis backend (db 1); rate from the first to the last SUCCESS; median (lowest-highest) of {rounds} interleaved rounds");
        println!(
            "{:<22} {:>22} {:>20} {:>20} {:>20} {:>9} {:>9}",
            "contender",
            "tasks/s",
            "CPU us/task",
            "kids us/task",
            "redis us/task",
            "RSS MiB",
            "kids MiB"
        );
        for (c, runs) in contenders.iter().zip(samples) {
            let done: Vec<&Run> = runs.iter().filter(|r| r.span.is_some()).collect();
            let rate = spread(done.iter().map(|r| r.rate()), 0);
            let own = spread(done.iter().map(|r| r.cpu_per_task().0), 1);
            let kids = spread(done.iter().map(|r| r.cpu_per_task().1), 1);
            let redis = spread(done.iter().map(|r| r.cpu_per_task().2), 1);
            let rss = median(done.iter().map(|r| r.rss.0 as f64 / 1024.0));
            let kids_rss = median(done.iter().map(|r| r.rss.1 as f64 / 1024.0));
            println!(
                "{:<22} {:>22} {:>20} {:>20} {:>20} {:>9.1} {:>9.1}",
                c.name, rate, own, kids, redis, rss, kids_rss
            );
            if done.len() < runs.len() {
                println!(
                    "  ({} of {} rounds did not finish)",
                    runs.len() - done.len(),
                    runs.len()
                );
            }
        }
        println!("(CPU us/task: CPU time of the contender's own process per task, from /proc/<pid>/stat, over the same window as the rate; kids: its children (the plugin, Celery's pool processes); redis: redis-server's; RSS sampled at the half-way result)");
        ratios(contenders, samples);
    }

    /// worker / each Celery contender, round by round (the two ran minutes apart at most).
    fn ratios(contenders: &[&Contender], samples: &[Vec<Run>]) {
        let Some(ours) = contenders.iter().position(|c| c.name.starts_with("worker")) else {
            return;
        };
        println!("\nworker + rust plugin / Celery, per round: median (lowest-highest)");
        for (i, c) in contenders.iter().enumerate() {
            if !c.name.starts_with("celery") {
                continue;
            }
            let pairs: Vec<(&Run, &Run)> = samples[ours]
                .iter()
                .zip(&samples[i])
                .filter(|(a, b)| a.span.is_some() && b.span.is_some())
                .collect();
            let ratio = |f: &dyn Fn(&Run) -> f64| spread(pairs.iter().map(|(a, b)| f(a) / f(b)), 2);
            println!(
                "  vs {:<20} rate {}x; CPU/task: own {}x, with children {}x, redis-server {}x",
                c.name,
                ratio(&|r| r.rate()),
                ratio(&|r| r.cpu_per_task().0),
                ratio(&total_cpu),
                ratio(&|r| r.cpu_per_task().2)
            );
        }
    }
}
