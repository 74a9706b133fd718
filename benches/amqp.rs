//! AMQP benchmark: drain rate of N no-op Celery tasks preloaded in a queue, with rpc results,
//! for the Celery worker (prefork -c 2 and threads), `worker` with the Rust SDK plugin (task
//! events off and on) and with the Python SDK plugin, and a raw lapin consume-reply-ack loop
//! (the ceiling the goals compare against), again on one channel instead of two (whether fewer
//! channels would pay) and acking with one multiple ack per 32 deliveries (the broker's
//! ceiling with multiple-ack, shown beside it); then `worker`
//! consuming 10 queues at once and two `worker`s sharing one queue. Also each contender's memory, and the CPU time per task of the contender, of its
//! children (plugins, pool processes) and of RabbitMQ, from `/proc/<pid>/stat`.
//! Run with `benches/run-amqp.sh` (builds first; needs RabbitMQ and the Celery venv in
//! `target/celery-venv`, which the broker tests create).
//!
//! Every contender consumes the same messages, published here in Celery's protocol v2 exactly
//! as the Python client does, with reply_to = a queue this program counts SUCCESS replies on.
//! Rate = replies / (time of last reply - time of first reply), so start-up is excluded; CPU
//! is read at the first and the last reply, over the same window.
//!
//! Rounds (`benches/common/rounds.rs`): every contender drains once per round, in the listed
//! order in odd rounds and in reverse in even ones. The goals are ratios taken round by round
//! (the two contenders of a ratio from the same round), printed as their median and spread
//! (lowest-highest) and met only when the whole spread clears the goal over >= 5 rounds; a round
//! in which either contender did not finish is left out of the ratios that need it.
//!
//! Knobs (environment): `BENCH_N` (tasks per drain, default 60,000), `BENCH_ROUNDS` (default 5;
//! fewer only when set so, and then no goal is met), `BENCH_ONLY=rust,raw` (substrings of the
//! contenders' names), `BENCH_PREFETCH`, `BENCH_BIN_DIR`, `BENCH_RUST_INSTANCES` (default 2),
//! `BENCH_RUST_CONCURRENCY` (default 16).

#[path = "common/amqp_load.rs"]
mod amqp_load;
#[path = "common/idle.rs"]
mod idle;
#[path = "common/procstat.rs"]
#[allow(dead_code)] // each bench uses its own part
mod procstat;
#[path = "common/amqp_report.rs"]
mod report;
#[path = "common/rounds.rs"]
#[allow(dead_code)] // each bench uses its own part
mod rounds;

use amqp_load::Replies;
use lapin::{Connection, ConnectionProperties};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";
const QUEUE: &str = "bench.tasks";

fn n_tasks() -> usize {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60_000)
}

/// BENCH_PREFETCH sets the prefetch of `worker` and of the raw loop (default: theirs).
fn prefetch() -> Option<u32> {
    std::env::var("BENCH_PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn env_or(key: &str, default: u32) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the release binaries are: `target/release`, or BENCH_BIN_DIR (a build with debug
/// symbols, for profiling the worker under the same load with `perf record`).
fn bin_dir() -> PathBuf {
    std::env::var_os("BENCH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release"))
}

/// How one process of a contender is started.
struct Launch {
    /// Which of the contender's processes this is (0 or 1 when two share a queue).
    copy: usize,
    queues: Vec<String>,
    /// Where `worker` serves its metrics (the bench reads each one's acked count there).
    metrics_port: u16,
}

struct Contender {
    name: &'static str,
    task: &'static str,
    /// Task queues the load is spread over (named `bench.tasks`, or `bench.tasks.<i>`).
    queues: usize,
    /// Processes started, all consuming every queue.
    copies: usize,
    start: Box<dyn Fn(&Launch) -> Child>,
}

impl Contender {
    fn queue_names(&self) -> Vec<String> {
        match self.queues {
            1 => vec![QUEUE.to_string()],
            k => (0..k).map(|i| format!("{QUEUE}.{i}")).collect(),
        }
    }
}

/// CPU time used in the measuring window: each process and its children, and RabbitMQ.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    per_copy: Vec<(Duration, Duration)>,
    rabbit: Duration,
    host: procstat::HostCpu,
}

/// One drain's figures.
#[derive(Debug, Clone)]
struct Run {
    replies: Option<Replies>,
    /// RSS (KiB) of the first process and of its children, sampled mid-drain.
    rss: (u64, u64),
    cpu: CpuUse,
    /// Deliveries each `worker` process acked (from its metrics; 0 for other contenders).
    acked: Vec<u64>,
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// `worker_broker_deliveries_total{outcome="acked"}` from a worker's metrics endpoint.
fn acked(port: u16) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with("worker_broker_deliveries_total{outcome=\"acked\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

/// The CPU counters of the contender's processes and of RabbitMQ, now.
fn cpu_now(pids: &[u32], rabbit: Option<u32>) -> CpuUse {
    CpuUse {
        per_copy: pids.iter().map(|&p| procstat::tree_cpu(p)).collect(),
        rabbit: rabbit.map(procstat::cpu).unwrap_or_default(),
        host: procstat::HostCpu::now(),
    }
}

fn cpu_between(a: &CpuUse, b: &CpuUse) -> CpuUse {
    CpuUse {
        per_copy: a
            .per_copy
            .iter()
            .zip(&b.per_copy)
            .map(|(x, y)| (y.0.saturating_sub(x.0), y.1.saturating_sub(x.1)))
            .collect(),
        rabbit: b.rabbit.saturating_sub(a.rabbit),
        host: a.host.until(&b.host),
    }
}

/// One drain: preload, start the contender, count replies, read its counters, stop it.
async fn run_once(c: &Contender, n: usize) -> Run {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queues = c.queue_names();
    amqp_load::declare(&ch, &queues).await;
    amqp_load::preload(&ch, c.task, &queues, n).await;
    let counter = conn.create_channel().await.unwrap();
    let launches: Vec<Launch> = (0..c.copies)
        .map(|copy| Launch {
            copy,
            queues: queues.clone(),
            metrics_port: free_port(),
        })
        .collect();
    let children: Vec<Child> = launches.iter().map(|l| (c.start)(l)).collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let rabbit = procstat::find_process("beam.smp");
    // Sample memory once the drain is under way.
    let first = pids[0];
    let sampler = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        procstat::tree_rss_kib(first)
    });
    let mut at_first = CpuUse::default();
    let replies =
        amqp_load::count_replies(&counter, n, queues.len(), Duration::from_secs(600), || {
            at_first = cpu_now(&pids, rabbit)
        })
        .await;
    let cpu = cpu_between(&at_first, &cpu_now(&pids, rabbit));
    let acked = launches.iter().map(|l| acked(l.metrics_port)).collect();
    let rss = sampler.await.unwrap();
    children.into_iter().for_each(stop);
    let _ = conn.close(200, "bench done".into()).await;
    Run {
        replies,
        rss,
        cpu,
        acked,
    }
}

fn plugin_dir(root: &std::path::Path, name: &str, manifest: String) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    root.to_path_buf()
}

fn celery(pool: &'static str, c: &'static str) -> Box<dyn Fn(&Launch) -> Child> {
    let venv = repo().join("target/celery-venv/bin");
    Box::new(move |l: &Launch| {
        Command::new(venv.join("celery"))
            .args(["-A", "benchapp", "worker", "-P", pool, "-c", c, "-Q"])
            .arg(l.queues.join(","))
            .args(["-l", "warning", "--without-gossip", "--without-mingle"])
            .args(["--without-heartbeat", "-n"])
            .arg(format!("celery-bench-{pool}-{}@%h", l.copy))
            .current_dir(repo().join("benches/celery"))
            .env("BROKER_URL", BROKER)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    })
}

/// `worker serve` on the broker with the plugins in `dir` installed (each copy has its own
/// state directory and control socket).
fn ours(
    dir: PathBuf,
    tag: &'static str,
    extra: &'static [&'static str],
) -> Box<dyn Fn(&Launch) -> Child> {
    let bin = bin_dir().join("worker");
    Box::new(move |l: &Launch| {
        let state = dir.with_file_name(format!("{tag}-state-{}", l.copy));
        let socket = dir.with_file_name(format!("{tag}-{}.sock", l.copy));
        let installed = Command::new(&bin)
            .args(["plugins", "install", "--plugins"])
            .arg(&dir)
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
        Command::new(&bin)
            .args(["serve", "--log-level", "warn", "--broker", BROKER, "-Q"])
            .arg(l.queues.join(","))
            .arg("-n")
            .arg(format!("worker-bench-{tag}-{}@host", l.copy))
            .arg("--plugins")
            .arg(&dir)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", l.metrics_port))
            .args(extra)
            .args(
                prefetch()
                    .map(|p| vec!["--prefetch-count".to_string(), p.to_string()])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    })
}

/// `examples/amqp-ceiling`, acking each delivery on its own (`ack_every` 1) or with one
/// multiple ack per `ack_every` deliveries, replying on a channel of its own (`channels` 2) or
/// on the consuming one (1).
fn raw_loop(ack_every: u32, channels: u8) -> Box<dyn Fn(&Launch) -> Child> {
    let bin = bin_dir().join("examples/amqp-ceiling");
    Box::new(move |l: &Launch| {
        Command::new(&bin)
            .arg(BROKER)
            .arg(&l.queues[0])
            .arg(prefetch().unwrap_or(64).to_string())
            .arg(ack_every.to_string())
            .arg(channels.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    })
}

fn contenders(root: &std::path::Path) -> Vec<Contender> {
    let rust_plugin = bin_dir().join("examples/rust-echo");
    let rust_dir = plugin_dir(
        &root.join("rust"),
        "rust-echo",
        format!("name = \"rust-echo\"\nversion = \"1\"\ncommand = [{:?}]\ninstances = {}\nconcurrency = {}\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n[[tasks]]\nname = \"rust.flood\"\n", rust_plugin.display().to_string(), env_or("BENCH_RUST_INSTANCES", 2), env_or("BENCH_RUST_CONCURRENCY", 16)),
    );
    let py_dir = plugin_dir(
        &root.join("py"),
        "python-fibonacci",
        format!(
            "name = \"python-fibonacci\"\nversion = \"1\"\ncommand = [\"/usr/bin/python3\", {:?}]\ninstances = 2\nconcurrency = 8\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"fibonacci\"\n[[tasks]]\nname = \"py.noop\"\n",
            repo().join("examples/python-fibonacci/main.py").display().to_string(),
            repo().join("plugin-protocol/python").display().to_string()
        ),
    );
    let one = |name, task, start| Contender {
        name,
        task,
        queues: 1,
        copies: 1,
        start,
    };
    vec![
        one("celery prefork -c 2", "bench.noop", celery("prefork", "2")),
        one("celery threads -c 8", "bench.noop", celery("threads", "8")),
        // Each goal's two contenders run next to each other (the per-message loop, the
        // worker, the worker with events), so drift within a round barely touches a ratio.
        // The per-message loop on one channel, next to the same on two: whether fewer
        // channels would pay.
        one("raw loop, one channel", "bench.noop", raw_loop(1, 1)),
        one("raw lapin consume-reply-ack", "bench.noop", raw_loop(1, 2)),
        one(
            "worker + rust plugin",
            "rust.noop",
            ours(rust_dir.clone(), "rust", &[]),
        ),
        // Celery's task events on (`-E`): every task also publishes received, started and
        // succeeded to `celeryev`.
        one(
            "worker + rust, events on",
            "rust.noop",
            ours(rust_dir.clone(), "rust-events", &["-E"]),
        ),
        one("raw loop, multiple-ack", "bench.noop", raw_loop(32, 2)),
        one(
            "worker + python SDK plugin",
            "py.noop",
            ours(py_dir, "py", &[]),
        ),
        Contender {
            name: "worker + rust, 10 queues",
            task: "rust.noop",
            queues: 10,
            copies: 1,
            start: ours(rust_dir.clone(), "rust-10q", &[]),
        },
        Contender {
            name: "2 workers + rust, 1 queue",
            task: "rust.noop",
            queues: 1,
            copies: 2,
            start: ours(rust_dir, "rust-2w", &[]),
        },
    ]
}

fn main() {
    let _idle = idle::hold();
    let n = n_tasks();
    let venv = repo().join("target/celery-venv/bin");
    assert!(
        venv.join("celery").exists(),
        "needs the Celery venv in target/celery-venv: `cargo test --test amqp` creates it (or: /usr/bin/python3 -m venv target/celery-venv && target/celery-venv/bin/pip install 'celery>=5.4,<6')"
    );
    for b in ["worker", "examples/rust-echo", "examples/amqp-ceiling"] {
        let path = bin_dir().join(b);
        assert!(
            path.exists(),
            "{} missing: run benches/run-amqp.sh",
            path.display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let all = contenders(tmp.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // BENCH_ONLY=rust,raw (substrings of contenders' names) runs just the matching ones.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let selected: Vec<&Contender> = all
        .iter()
        .filter(|c| only.split(',').any(|o| c.name.contains(o)))
        .collect();
    let rounds = rounds::from_env();
    // Interleaved: every contender once per round, the order reversed every other round, so
    // drift in the broker's speed hits all of them alike; ratios are taken round by round.
    let mut samples: Vec<Vec<Run>> = vec![Vec::new(); selected.len()];
    let indices: Vec<usize> = (0..selected.len()).collect();
    for round in 1..=rounds {
        for i in rounds::in_order(round, &indices) {
            let c = selected[i];
            let run = rt.block_on(run_once(c, n));
            match &run.replies {
                Some(r) => {
                    let (own, kids, rabbit) = report::cpu_per_task(&run, n);
                    eprintln!(
                        "round {round}: {:<30} {:>9.0} tasks/s; CPU us/t {own:.1} + kids {kids:.1} + rabbit {rabbit:.1}; host {}",
                        c.name,
                        r.all.rate(),
                        run.cpu.host.show()
                    )
                }
                None => eprintln!("round {round}: {:<30} did not finish", c.name),
            }
            samples[i].push(run);
        }
    }
    report::print(n, rounds, &selected, &samples);
}
