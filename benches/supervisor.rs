//! Supervisor benchmark: noop-task throughput and latency through the supervisor, against a
//! raw pipe baseline (the same plugin binary driven directly over its stdin/stdout, measured
//! the same way, in the same run), plus restart latency and the daemon's idle RSS. The
//! supervisor's throughput goal takes the strictest raw pipe: driven on one current-thread
//! runtime, as the worker runs, and sending the `task.run` line the worker writes.
//!
//! Run with `benches/run.sh` (it builds the release example plugin first). Figures are
//! printed as ratios to the baseline; absolute numbers depend on the machine.
//!
//! The goals come from interleaved rounds (`benches/common/rounds.rs`): every round measures
//! each pair (baseline and contender) once, in the listed order in odd rounds and in reverse in
//! even ones, and each goal's ratio is taken round by round; its median and spread
//! (lowest-highest) are over the rounds, and it is met only when the whole spread clears it.
//! Within a round the two sides of a pair run in turns, `BENCH_SLICES` slices each (a b b a
//! ...), both started first: this host's own speed wanders by half for seconds at a time (a
//! fixed piece of work timed over and over, `BENCH_PROFILE_HOST`, took 36-213 ms, p10 37, p90
//! 67, with at most 1 % steal time; `docs/src/benchmarks.md`), so one side run whole after the
//! other drew a different machine.
//! Each round also prints every side's time on a CPU per task of its throughput turns (this
//! process, which holds the driver and for a supervised side the worker, and each of the side's
//! processes by name, from `/proc/*/task/*/schedstat`), and the report their medians: where a
//! ratio's difference goes, e.g. how much the event subscriber took and how much more the
//! plugin beside it did.
//! The other rows (the Rust and Python SDK plugins through the supervisor, a stalled event
//! subscriber, restart latency, idle RSS) are single runs after the rounds.
//!
//! Knobs (environment):
//! - `BENCH_ROUNDS`: rounds (default 5; fewer only when set so, and then no goal is met).
//! - `BENCH_IDLE=halt`: measure with the machine's own idle; by default idle CPUs poll for the
//!   run (`benches/common/idle.rs`).
//! - `BENCH_N`: tasks per throughput run with a Rust child (default 400,000).
//! - `BENCH_N_PY`: the same with a Python child (default 100,000).
//! - `BENCH_N_LATENCY`: one-at-a-time tasks per run, for p50 and p99 (default 5,000).
//! - `BENCH_SLICES`: the turns each side of a pair takes per round (default 10).
//! - `BENCH_PROFILE_SUPERVISOR=N`: only the minimal Rust child through the supervisor, N tasks;
//!   `BENCH_PROFILE_RAW=N` and `BENCH_PROFILE_RAW_ONE_THREAD=N`: only one of its raw-pipe
//!   baselines; `BENCH_PROFILE_RAW_SDK=N`: only the Rust SDK plugin over a raw pipe;
//!   `BENCH_PROFILE_ALONE=N` and
//!   `BENCH_PROFILE_EVENTS=N`: only the Rust SDK plugin through the supervisor, alone or beside
//!   the event-log subscriber.
//! - `BENCH_PROFILE_HOST=N`: only time N chunks of the same work on one thread (about 35 ms
//!   each here) and print their spread: how steady the machine itself is just now.
//!
//! The single-run bench this replaced pushed 50,000 and 10,000 tasks per run: a tenth of a
//! second for a Python child, too short for a per-round ratio on a shared machine; so were
//! 100,000 and 30,000 (eight runs of 100,000 tasks through the supervisor ranged 215-290k
//! tasks/s, of 400,000 230-256k). At the defaults above the whole bench takes 67-72 s on
//! this 2-core machine (it must stay under 6 minutes); `BENCH_N=5000 BENCH_N_PY=2000
//! BENCH_N_LATENCY=500` is a quick smoke run.

#[path = "common/daemon.rs"]
#[allow(dead_code)] // each bench uses its own part
mod daemon;
#[path = "common/drift.rs"]
mod drift;
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
#[path = "common/supervisor_load.rs"]
mod supervisor_load;

use rounds::{Unit, Want};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use supervisor_load::{
    paired, restart_latency, Load, Params, RawOn, Side, Stats, N_RESTARTS, SETTLE, WINDOW,
};

/// The `task.run` every raw pipe but the throughput goal's baseline sends.
const MINIMAL: Params = Params::Minimal;
use worker::manifest::Manifest;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// The loads for the Rust and the Python children, from the environment.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    rust: Load,
    python: Load,
}

impl Sizes {
    fn from_env() -> Sizes {
        let latency = env_or("BENCH_N_LATENCY", 5_000);
        Sizes {
            rust: Load {
                tasks: env_or("BENCH_N", 400_000),
                latency,
            },
            python: Load {
                tasks: env_or("BENCH_N_PY", 100_000),
                latency,
            },
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_bin() -> PathBuf {
    let bin = repo().join("target/release/examples/rust-echo");
    assert!(
        bin.exists(),
        "build it first: cargo build --release --example rust-echo (benches/run.sh does)"
    );
    bin
}

/// `user = "root"` when the bench runs as root (a root worker runs other plugins as `nobody`,
/// who could not write the bench's files), so the plugins run as the raw-pipe baseline does.
fn same_user() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        "user = \"root\"\n"
    } else {
        ""
    }
}

/// A plugin dir in `root` running `command` with the given tasks.
fn manifest(root: &Path, name: &str, command: &[String], env: &str, tasks: &[&str]) -> Manifest {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let command: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
    let tasks: String = tasks
        .iter()
        .map(|t| format!("[[tasks]]\nname = \"{t}\"\n"))
        .collect();
    let text = format!(
        "name = \"{name}\"\nversion = \"1\"\ncommand = [{}]\nconcurrency = {WINDOW}\n{}{env}\n{tasks}\n[restart]\nmax_restarts = 1000\nstable_after = 0\n",
        command.join(", "),
        same_user()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    Manifest::load(&dir).unwrap()
}

/// Starts the release daemon on the plugins in `root` and reads its RSS once every instance
/// is ready.
fn idle_rss_kib(root: &Path) -> Option<u64> {
    if !repo().join("target/release/worker").exists() {
        return None;
    }
    let instances: usize = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| Manifest::load(&e.path()).ok())
        .map(|m| m.instances as usize)
        .sum();
    let state = tempfile::tempdir().ok()?;
    let daemon = daemon::Daemon::start(state.path(), root, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.ready_instances() < instances && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss = procstat::rss_kib(daemon.pid());
    daemon.stop();
    Some(rss)
}

/// A Python SDK subscriber to `task.*` and `instance.*`, logging to a file under `root`.
fn subscriber(root: &Path, name: &str, script: &str, env: &str) -> Manifest {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let log = root.join(format!("{name}.jsonl"));
    let text = format!(
        "name = {name:?}\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\n{}events = [\"task.*\", \"instance.*\"]\n[timeouts]\nping_interval = 3600\nshutdown_grace = 0.5\n[env]\nPYTHONPATH = {:?}\nSUBSCRIBER_LOG = {:?}\n{env}[settings]\npath = {:?}\n",
        repo().join(script).display().to_string(),
        same_user(),
        repo().join("plugin-protocol/python").display().to_string(),
        log.display().to_string(),
        log.display().to_string(),
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    Manifest::load(&dir).unwrap()
}

fn row(name: &str, s: &Stats, base: &Stats) {
    println!(
        "{name:<44} {:>10.0}/s ({:>5.2}x)   p50 {:>8.1?} ({:>5.2}x)   p99 {:>8.1?}",
        s.per_sec,
        s.per_sec / base.per_sec,
        s.p50,
        s.p50.as_secs_f64() / base.p50.as_secs_f64(),
        s.p99
    );
}

/// The plugins the bench drives: the example plugins (with the SDKs), the minimal children
/// (no SDK) and two event subscribers.
struct Plugins {
    rust: Manifest,
    py: Manifest,
    min_rust: Manifest,
    min_py: Manifest,
    /// `examples/event-log`, writing every event to `event_log_file`.
    event_log: Manifest,
    event_log_file: PathBuf,
    /// A subscriber that stops reading at its first event.
    stalled: Manifest,
}

impl Plugins {
    /// The example plugins and subscribers in `root` (the idle RSS run installs them), the
    /// minimal children in `minimal_root`.
    fn create(root: &Path, minimal_root: &Path) -> Plugins {
        let py_path = repo().join("plugin-protocol/python").display().to_string();
        let rust = manifest(
            root,
            "rust-echo",
            &[rust_bin().display().to_string()],
            "",
            &["rust.noop", "rust.echo", "rust.count", "rust.flood"],
        );
        let py_main = repo().join("examples/python-fibonacci/main.py");
        let py = manifest(
            root,
            "python-fibonacci",
            &["/usr/bin/python3".into(), py_main.display().to_string()],
            &format!("[env]\nPYTHONPATH = {py_path:?}"),
            &["fibonacci", "py.noop"],
        );
        let event_log = subscriber(root, "event-log", "examples/event-log/main.py", "");
        let stalled = subscriber(
            root,
            "subscriber",
            "tests/plugins/subscriber.py",
            "SUBSCRIBER_STALL = \"1\"\n",
        );
        let me = std::env::current_exe().unwrap().display().to_string();
        let min_rust = manifest(
            minimal_root,
            "minimal-rust",
            &[me],
            "[env]\nBENCH_MINIMAL_CHILD = \"1\"",
            &["min.noop"],
        );
        let min_py_main = repo().join("benches/minimal_child.py");
        let min_py = manifest(
            minimal_root,
            "minimal-python",
            &["/usr/bin/python3".into(), min_py_main.display().to_string()],
            "",
            &["minpy.noop"],
        );
        Plugins {
            rust,
            py,
            min_rust,
            min_py,
            event_log,
            event_log_file: root.join("event-log.jsonl"),
            stalled,
        }
    }
}

/// One measurement of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    RawMin,
    RawMinOneThread,
    SupMin,
    RawSdk,
    RawMinPy,
    RawSdkPy,
    Alone,
    WithLog,
}

impl Measure {
    /// A round's measurements, each baseline listed before its contender(s): odd rounds run
    /// them in this order, even rounds in reverse.
    const ALL: [Measure; 8] = [
        Measure::RawMin,
        Measure::RawMinOneThread,
        Measure::SupMin,
        Measure::RawSdk,
        Measure::RawMinPy,
        Measure::RawSdkPy,
        Measure::Alone,
        Measure::WithLog,
    ];

    fn label(self) -> &'static str {
        match self {
            Measure::RawMin => "minimal rust child, raw pipe",
            Measure::RawMinOneThread => "minimal rust child, raw, worker's line",
            Measure::SupMin => "minimal rust child, via supervisor",
            Measure::RawSdk => "rust SDK plugin, raw pipe",
            Measure::RawMinPy => "minimal python child, raw pipe",
            Measure::RawSdkPy => "python SDK plugin, raw pipe",
            Measure::Alone => "rust SDK plugin, via supervisor",
            Measure::WithLog => "rust SDK plugin + event-log subscriber",
        }
    }

    /// Starts this measurement's side: its plugin, past the handshake.
    fn start(self, p: &Plugins) -> Side {
        let raw = |on, m: &Manifest, task| Side::raw(on, m.clone(), task, MINIMAL);
        let default = RawOn::DefaultRuntime;
        match self {
            Measure::RawMin => raw(default, &p.min_rust, "min.noop"),
            Measure::RawMinOneThread => Side::raw(
                RawOn::OneThread,
                p.min_rust.clone(),
                "min.noop",
                Params::AsTheWorker,
            ),
            Measure::SupMin => Side::supervised(p.min_rust.clone(), Vec::new(), "min.noop"),
            Measure::RawSdk => raw(default, &p.rust, "rust.noop"),
            Measure::RawMinPy => raw(default, &p.min_py, "minpy.noop"),
            Measure::RawSdkPy => raw(default, &p.py, "py.noop"),
            Measure::Alone => Side::supervised(p.rust.clone(), Vec::new(), "rust.noop"),
            Measure::WithLog => {
                // The log is appended to; each run starts it empty.
                let _ = std::fs::remove_file(&p.event_log_file);
                Side::supervised(p.rust.clone(), vec![p.event_log.clone()], "rust.noop")
            }
        }
    }

    /// The load this measurement runs (a Python child's is smaller).
    fn load(self, sizes: Sizes) -> Load {
        match self {
            Measure::RawMinPy | Measure::RawSdkPy => sizes.python,
            _ => sizes.rust,
        }
    }
}

/// The pairs a round measures, baseline first: each goal's two sides run in turns.
const PAIRS: [(Measure, Measure); 4] = [
    (Measure::RawMinOneThread, Measure::SupMin),
    (Measure::RawMin, Measure::RawSdk),
    (Measure::RawMinPy, Measure::RawSdkPy),
    (Measure::Alone, Measure::WithLog),
];

fn slices() -> usize {
    env_or("BENCH_SLICES", 10)
}

/// One round's figures, one per [`Measure`].
struct Round([Stats; Measure::ALL.len()]);

impl Round {
    fn get(&self, m: Measure) -> &Stats {
        &self.0[m as usize]
    }
}

/// Runs `rounds` rounds, printing each measurement as its pair ends (to stderr).
fn run_rounds(p: &Plugins, sizes: Sizes, rounds: usize) -> Vec<Round> {
    let mut all = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut got = [None; Measure::ALL.len()];
        for (base, contender) in rounds::in_order(round, &PAIRS) {
            let host = procstat::HostCpu::now();
            let (mut a, mut b) = (base.start(p), contender.start(p));
            let load = base.load(sizes);
            let (sa, sb, settled) = paired(&mut a, &mut b, load, slices(), round % 2 == 0);
            let cpu = [a.cpu_detail(), b.cpu_detail()];
            a.stop();
            b.stop();
            let host = host.until(&procstat::HostCpu::now()).show();
            eprintln!(
                "round {round}: between the {} turns: {:.1?} waiting for the side to go quiet, {} still running after {SETTLE:?}",
                settled.turns, settled.total, settled.timed_out
            );
            for ((m, s), cpu) in [(base, sa), (contender, sb)].into_iter().zip(cpu) {
                eprintln!(
                    "round {round}: {:<40} {:>9.0}/s   p50 {:>8.1?}   p99 {:>8.1?}   host {host}; on a CPU, µs per task: {cpu}",
                    m.label(),
                    s.per_sec,
                    s.p50,
                    s.p99,
                );
                got[m as usize] = Some(s);
            }
        }
        all.push(Round(got.map(|s| s.expect("a round runs every measure"))));
    }
    all
}

/// Contender / baseline throughput, round by round.
fn throughput_ratio(all: &[Round], base: Measure, contender: Measure) -> Vec<Option<f64>> {
    all.iter()
        .map(|r| Some(r.get(contender).per_sec / r.get(base).per_sec))
        .collect()
}

/// The medians of every measurement, then the goals, from the rounds.
fn report(all: &[Round], sizes: Sizes) {
    println!(
        "\n{} rounds, window {WINDOW} in flight ({} tasks with a Rust child, {} with a Python one), then {} one at a time for the latency; median (lowest-highest) over the rounds:",
        all.len(),
        sizes.rust.tasks,
        sizes.python.tasks,
        sizes.rust.latency
    );
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    for m in Measure::ALL {
        let stats = || all.iter().map(|r| r.get(m));
        println!(
            "{:<40} {:>26}/s   p50 {:>20} µs   p99 {:>20} µs",
            m.label(),
            rounds::spread(stats().map(|s| s.per_sec), 0),
            rounds::spread(stats().map(|s| micros(s.p50)), 1),
            rounds::spread(stats().map(|s| micros(s.p99)), 1),
        );
    }
    println!("\ntime on a CPU per task of the throughput runs (µs; from schedstat), median (lowest-highest): this process (the driver, and for a supervised side the worker) and the side's own processes (plugins, subscriber):");
    for m in Measure::ALL {
        let stats = || all.iter().map(|r| r.get(m));
        println!(
            "{:<40} this process {:>20}   its processes {:>20}",
            m.label(),
            rounds::spread(stats().map(|s| s.cpu_own), 2),
            rounds::spread(stats().map(|s| s.cpu_kids), 2),
        );
    }
    rounds::ratio(
        "rust SDK plugin via supervisor / raw pipe (no goal)",
        &throughput_ratio(all, Measure::RawSdk, Measure::Alone),
        Unit::Ratio,
    );
    rounds::ratio(
        "minimal Rust child via supervisor / raw pipe on tokio's default runtime (no goal; the baseline of the figures before 2026-12-06)",
        &throughput_ratio(all, Measure::RawMin, Measure::SupMin),
        Unit::Ratio,
    );
    let overhead: Vec<Option<f64>> = all
        .iter()
        .map(|r| {
            let base = r.get(Measure::RawMinOneThread).p50;
            Some(micros(r.get(Measure::SupMin).p50) - micros(base))
        })
        .collect();
    rounds::goals_header();
    rounds::goal(
        "supervisor throughput, minimal Rust child via supervisor / raw pipe on 1 thread with the worker's task.run",
        &throughput_ratio(all, Measure::RawMinOneThread, Measure::SupMin),
        Want::AtLeast(0.8),
        Unit::Ratio,
    );
    rounds::goal(
        "supervisor p50 overhead, one task at a time",
        &overhead,
        Want::AtMost(30.0),
        Unit::Micros,
    );
    rounds::goal(
        "Python SDK / minimal Python child, raw pipe",
        &throughput_ratio(all, Measure::RawMinPy, Measure::RawSdkPy),
        Want::AtLeast(0.7),
        Unit::Ratio,
    );
    rounds::goal(
        "events on / off (rust plugin + event-log / alone, via supervisor)",
        &throughput_ratio(all, Measure::Alone, Measure::WithLog),
        Want::AtLeast(0.9),
        Unit::Ratio,
    );
    rounds::goal(
        "rust SDK / minimal child, raw pipe",
        &throughput_ratio(all, Measure::RawMin, Measure::RawSdk),
        Want::AtLeast(0.5),
        Unit::Ratio,
    );
}

/// The rows measured once, after the rounds: each against a baseline run just before it.
fn single_runs(p: &Plugins, sizes: Sizes) {
    println!("\nsingle runs (not in rounds; one run each, the baseline just before its contender), window {WINDOW} in flight:");
    let (rust, py) = (sizes.rust, sizes.python);
    let default = RawOn::DefaultRuntime;
    let raw_rust = Side::raw(default, p.rust.clone(), "rust.noop", MINIMAL).measure(rust);
    let sup_rust = Side::supervised(p.rust.clone(), Vec::new(), "rust.noop").measure(rust);
    row("rust plugin, raw pipe (baseline)", &raw_rust, &raw_rust);
    row("rust plugin, via supervisor", &sup_rust, &raw_rust);
    let raw_py = Side::raw(default, p.py.clone(), "py.noop", MINIMAL).measure(py);
    let sup_py = Side::supervised(p.py.clone(), Vec::new(), "py.noop").measure(py);
    row("python SDK, raw pipe (baseline)", &raw_py, &raw_py);
    row("python SDK, via supervisor", &sup_py, &raw_py);
    let alone = Side::supervised(p.rust.clone(), Vec::new(), "rust.noop").measure(rust);
    let others = vec![p.stalled.clone()];
    let with_stalled = Side::supervised(p.rust.clone(), others, "rust.noop").measure(rust);
    row("rust plugin, no subscriber (baseline)", &alone, &alone);
    row("+ a subscriber that stopped reading", &with_stalled, &alone);
    let (p50, p99) = restart_latency(p.rust.clone());
    println!("restart latency, rust plugin (SIGKILL -> ready, {N_RESTARTS} runs): p50 {p50:.1?}, p99 {p99:.1?}");
    let (p50, p99) = restart_latency(p.py.clone());
    println!("restart latency, python SDK  (SIGKILL -> ready, {N_RESTARTS} runs): p50 {p50:.1?}, p99 {p99:.1?}");
}

fn main() {
    if std::env::var_os("BENCH_MINIMAL_CHILD").is_some() {
        return minimal::child();
    }
    let _idle = idle::hold();
    let root = tempfile::tempdir().unwrap();
    // Apart from `root`, whose plugins the idle RSS measurement installs.
    let minimal_root = tempfile::tempdir().unwrap();
    let plugins = Plugins::create(root.path(), minimal_root.path());
    let sizes = Sizes::from_env();
    // BENCH_PROFILE_HOST=N: how steady the host is, N chunks of the same work (no plugin).
    if let Some(n) = std::env::var("BENCH_PROFILE_HOST")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return drift::report(&drift::probe(n));
    }
    // BENCH_PROFILE_*=N: one measurement alone, N tasks (long enough to attach `perf record -p`
    // to this process, or to count its instructions under callgrind).
    for (knob, m) in [
        ("BENCH_PROFILE_SUPERVISOR", Measure::SupMin),
        ("BENCH_PROFILE_RAW", Measure::RawMin),
        ("BENCH_PROFILE_RAW_ONE_THREAD", Measure::RawMinOneThread),
        ("BENCH_PROFILE_RAW_SDK", Measure::RawSdk),
        ("BENCH_PROFILE_ALONE", Measure::Alone),
        ("BENCH_PROFILE_EVENTS", Measure::WithLog),
    ] {
        let Some(n) = std::env::var(knob).ok().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let load = Load {
            tasks: n,
            ..sizes.rust
        };
        let s = m.start(&plugins).measure(load);
        println!(
            "{}: {:.0}/s, p50 {:.1?}; on a CPU per task: this process {:.2} µs, its processes {:.2} µs",
            m.label(),
            s.per_sec,
            s.p50,
            s.cpu_own,
            s.cpu_kids
        );
        if m == Measure::WithLog {
            let logged = std::fs::read(&plugins.event_log_file).unwrap_or_default();
            let lines = logged.iter().filter(|&&b| b == b'\n').count();
            println!("events the subscriber logged: {lines}");
        }
        return;
    }
    let rounds = rounds::from_env();
    println!("{rounds} interleaved rounds: minimal children (no SDK) and the SDK plugins over a raw pipe and through the supervisor, and the rust plugin beside an event-log subscriber of every task.* and instance.* event");
    let all = run_rounds(&plugins, sizes, rounds);
    report(&all, sizes);
    single_runs(&plugins, sizes);
    match idle_rss_kib(root.path()) {
        Some(kib) => println!(
            "worker serve idle RSS with both plugins running: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("worker serve idle RSS: skipped (build target/release/worker first)"),
    }
}
