//! Queue backend benchmark (protocol 1.5, PROTOCOL.md §4a), against the release daemon.
//!
//! 1. Throughput and CPU per task of tasks offered by a queue backend (`task.offer` over the
//!    backend's stdio), against the same tasks submitted on the control socket (`task.submit`)
//!    as the baseline: N echo tasks (`rust.echo` of the Rust example plugin, 2 instances x 16)
//!    with the same number in flight (the backend's window, 64 by default). Both clients are
//!    the same Rust loop (benches/common/offer_load.rs: one connection, requests written in
//!    batches, every line parsed): the queue backend is this bench's own binary run by the
//!    worker with `BENCH_OFFERS_CHILD=1`, the control client is this process. Rate = N / (last
//!    answer read - first request written), after a warm-up of two windows; CPU from
//!    `/proc/<pid>/stat` over the same span: the worker's process, the plugin's instances and
//!    the client. Each run has a fresh daemon; the two alternate within a round (the order
//!    flips every round), and the figures are medians over the rounds with the spread
//!    (lowest-highest) beside them, the ratios taken round by round.
//! 2. Memory under a flood: a queue backend with a window of 16 offers 200,000 tasks that
//!    sleep, ignoring the window: once as fast as its pipe takes them, once never more than 128
//!    unanswered; a second thread reads and counts the answers. The worker's VmRSS and VmHWM
//!    before and at the end, how the flood ended (every offer answered, or the backend ended by
//!    the worker), and the answers by kind (refused with -32005, run, other), from the backend
//!    and from the worker's counters. Printed, not asserted.
//!
//! Run with `benches/run-backends.sh` (builds the release worker and rust-echo first).
//! `BENCH_N` (100,000: at 40k tasks/s a run lasts 2-3 s, long enough for `/proc`'s 10 ms CPU
//! ticks), `BENCH_ROUNDS` (5), `BENCH_WINDOW` (64), `BENCH_FLOOD_N` (200,000),
//! `BENCH_FLOOD_STEPS` (100: the flooded task sleeps 100 x 100 ms), `BENCH_FLOOD_AHEAD`
//! (`0,128`: the floods to run, by the unanswered offers each allows itself, 0 for no limit)
//! and `BENCH_ONLY=throughput` or `flood` adjust a run.

#[path = "common/daemon.rs"]
#[allow(dead_code)] // each bench uses its own part
mod daemon;
#[path = "common/idle.rs"]
mod idle;
#[path = "common/offer_load.rs"]
mod offer_load;
#[path = "common/procstat.rs"]
#[allow(dead_code)] // each bench uses its own part
mod procstat;
#[path = "common/rounds.rs"]
#[allow(dead_code)] // each bench uses its own part
mod rounds;

use daemon::Daemon;
use offer_load::{Flood, Lines, Tally, ECHO};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest a backend's run may take before the bench gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn same_user() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        "user = \"root\"\n"
    } else {
        ""
    }
}

/// The Rust example plugin as the AMQP and Redis benches run it: 2 instances x 16.
fn echo_plugin(plugins: &Path) {
    let bin = repo().join("target/release/examples/rust-echo");
    let dir = plugins.join("rust-echo");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"rust-echo\"\nversion = \"0.1.0\"\ncommand = [{:?}]\n{}instances = 2\nconcurrency = 16\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n[[tasks]]\nname = \"rust.flood\"\n",
        bin.display().to_string(),
        same_user()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
}

/// This bench's binary as a queue backend in `mode` with `window`, offering `n`, reporting to
/// `out`.
fn backend_plugin(plugins: &Path, mode: &str, n: usize, window: usize, out: &Path) {
    let me = std::env::current_exe().unwrap();
    let dir = plugins.join("bench-offers");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"bench-offers\"\nversion = \"1\"\ncommand = [{:?}]\n{}provides = [\"queue_backend\"]\n[queue_backend]\nwindow = {window}\n[env]\nBENCH_OFFERS_CHILD = \"1\"\nBENCH_OFFERS_MODE = {mode:?}\nBENCH_OFFERS_N = \"{n}\"\nBENCH_OFFERS_OUT = {:?}\nBENCH_FLOOD_STEPS = \"{}\"\n",
        me.display().to_string(),
        same_user(),
        out.display().to_string(),
        env_or("BENCH_FLOOD_STEPS", 100),
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
}

/// `plugins.status` from the daemon's control socket.
fn status(d: &Daemon) -> Value {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"plugins.status\",\"params\":{}}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["result"].take()
}

/// One plugin's entry in `plugins.status`.
fn plugin(status: &Value, name: &str) -> Value {
    status["plugins"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Baseline: N echo tasks submitted on the control socket, `window` in flight on one
/// connection.
fn control_socket(n: usize, window: usize) -> Tally {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("control");
    echo_plugin(&plugins);
    let d = Daemon::start(root.path(), &plugins, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.ready_instances() < 2 {
        assert!(Instant::now() < deadline, "rust-echo was not ready in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream = UnixStream::connect(&d.socket).unwrap();
    let mut conn = Lines::new(stream.try_clone().unwrap(), stream);
    let warm = offer_load::warm_up(&mut conn, 2 * window, window, offer_load::submit);
    assert!(warm, "the worker closed the control connection");
    let tally = offer_load::measure(n, d.pid(), std::process::id(), || {
        conn.pump(n, window, |i| {
            offer_load::submit(i + 1, &format!("t-{i}"), ECHO, &format!("[{i}]"))
        })
        .expect("the worker closed the control connection")
    });
    drop(conn);
    d.stop();
    tally
}

/// Contender: the same N tasks offered by a queue backend with `window`.
fn queue_backend(n: usize, window: usize) -> Option<Tally> {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("offers");
    let out = root.path().join("offers.json");
    echo_plugin(&plugins);
    backend_plugin(&plugins, "window", n, window, &out);
    let d = Daemon::start(root.path(), &plugins, &[]);
    let tally = offer_load::wait_report(&out, RUN_LIMIT);
    d.stop();
    tally
}

/// How a flood ended, as the bench saw it.
struct FloodRun {
    /// The backend's own figures: present if it got every answer.
    done: Option<Flood>,
    /// Its figures as it began (the worker's memory before).
    before: Option<Flood>,
    /// The backend's entry in `plugins.status` at the end.
    backend: Value,
    /// The worker's VmRSS and VmHWM (KiB) at the end, read by the bench.
    end: (u64, u64),
    secs: f64,
}

/// A flood of `n` offers into `window`, `ahead` unanswered at most (0: no limit), until the
/// backend reports every answer or the worker ends it (its instance restarted).
fn flood(n: usize, window: usize, ahead: usize) -> FloodRun {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("flood");
    let out = root.path().join("flood.json");
    echo_plugin(&plugins);
    backend_plugin(&plugins, "flood", n, window, &out);
    let manifest = plugins.join("bench-offers/plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        format!("{text}BENCH_FLOOD_AHEAD = \"{ahead}\"\n"),
    )
    .unwrap();
    let d = Daemon::start(root.path(), &plugins, &[]);
    let started = out.with_extension("started");
    let deadline = Instant::now() + RUN_LIMIT;
    let mut began = None;
    let backend = loop {
        std::thread::sleep(Duration::from_millis(200));
        if began.is_none() && started.exists() {
            began = Some(Instant::now());
        }
        let backend = plugin(&status(&d), "bench-offers");
        let restarts: u64 = backend["instances"]
            .as_array()
            .map(|is| is.iter().filter_map(|i| i["restarts"].as_u64()).sum())
            .unwrap_or(0);
        if out.exists() || restarts > 0 || Instant::now() > deadline {
            break backend;
        }
    };
    let end = (
        procstat::status_kib(d.pid(), "VmRSS"),
        procstat::status_kib(d.pid(), "VmHWM"),
    );
    let read = |p: &Path| serde_json::from_slice(&std::fs::read(p).ok()?).ok();
    let run = FloodRun {
        done: read(&out),
        before: read(&started),
        backend,
        end,
        secs: began.map_or(0.0, |b| b.elapsed().as_secs_f64()),
    };
    d.stop();
    run
}

fn main() {
    if std::env::var_os("BENCH_OFFERS_CHILD").is_some() {
        return offer_load::child();
    }
    let _idle = idle::hold();
    for b in ["worker", "examples/rust-echo"] {
        let path = repo().join("target/release").join(b);
        assert!(
            path.exists(),
            "{} missing: run benches/run-backends.sh",
            path.display()
        );
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only.contains("throughput") {
        throughput();
    }
    if only.is_empty() || only.contains("flood") {
        let (n, window) = (env_or("BENCH_FLOOD_N", 200_000), 16);
        // As fast as the pipe takes them (0); then never more than 128 unanswered (8 windows,
        // half the worker's queue of lines to a plugin).
        let paces = std::env::var("BENCH_FLOOD_AHEAD").unwrap_or_else(|_| "0,128".into());
        for ahead in paces.split(',').filter_map(|a| a.trim().parse().ok()) {
            report::flood(n, window, ahead, &flood(n, window, ahead));
        }
    }
}

fn throughput() {
    let n = env_or("BENCH_N", 100_000).max(1);
    let rounds = env_or("BENCH_ROUNDS", 5).max(1);
    let window = env_or("BENCH_WINDOW", 64).max(1);
    // Interleaved, the order flipped every round: drift in the machine's speed hits both alike.
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let control_first = round % 2 == 1;
        if control_first {
            base.push(control_socket(n, window));
        }
        ours.push(queue_backend(n, window));
        if !control_first {
            base.push(control_socket(n, window));
        }
        report::round(round, &base[round - 1], ours[round - 1].as_ref());
    }
    report::throughput(n, window, rounds, &base, &ours);
}

/// The tables, from every round.
mod report {
    use super::offer_load::Tally;
    use super::rounds::spread;

    fn line(t: &Tally) -> String {
        format!(
            "{:>8.0} tasks/s  worker {:>5.1} us/task, plugins {:>5.1}, client {:>5.1}{}",
            t.rate(),
            t.per_task(t.worker_cpu),
            t.per_task(t.plugins_cpu),
            t.per_task(t.client_cpu),
            match t.failed {
                0 => String::new(),
                k => format!(
                    "  ({k} FAILED, first: {})",
                    t.first_failure.as_deref().unwrap_or("")
                ),
            }
        )
    }

    pub fn round(round: usize, base: &Tally, ours: Option<&Tally>) {
        eprintln!("round {round}: control socket {}", line(base));
        match ours {
            Some(t) => eprintln!("round {round}: queue backend  {}", line(t)),
            None => eprintln!("round {round}: queue backend  did not report"),
        }
    }

    pub fn throughput(
        n: usize,
        window: usize,
        rounds: usize,
        base: &[Tally],
        ours: &[Option<Tally>],
    ) {
        println!("\n{n} {} tasks, {window} in flight, rust-echo 2 instances x 16, fresh release daemon per run; rate from the first request written to the last answer read; median (lowest-highest) of {rounds} interleaved rounds", super::ECHO);
        let pairs: Vec<(&Tally, &Tally)> = base
            .iter()
            .zip(ours)
            .filter_map(|(b, o)| Some((b, o.as_ref()?)))
            // A failure or two is reported below; more means something else is wrong.
            .filter(|(b, o)| 100 * b.failed <= b.tasks && 100 * o.failed <= o.tasks)
            .collect();
        if pairs.len() < base.len() {
            println!(
                "({} of {} rounds left out: a run did not report, or over 1% of its tasks failed)",
                base.len() - pairs.len(),
                base.len()
            );
        }
        let sides: [(&str, Vec<&Tally>); 2] = [
            (
                "control socket (baseline)",
                pairs.iter().map(|p| p.0).collect(),
            ),
            ("queue backend", pairs.iter().map(|p| p.1).collect()),
        ];
        for (name, runs) in &sides {
            let failed: usize = runs.iter().map(|t| t.failed).sum();
            if let Some(first) = runs.iter().find_map(|t| t.first_failure.as_deref()) {
                println!(
                    "({name}: {failed} of {} requests not run, in the rounds kept; first: {first})",
                    runs.len() * n
                );
            }
        }
        println!("queue backend / control socket, per round:");
        type Figure = fn(&Tally) -> f64;
        let figures: [(&str, Figure); 4] = [
            ("tasks/s", Tally::rate),
            ("worker CPU per task", |t| t.per_task(t.worker_cpu)),
            ("plugin CPU per task", |t| t.per_task(t.plugins_cpu)),
            ("client CPU per task", |t| t.per_task(t.client_cpu)),
        ];
        for (name, f) in figures {
            let ratio = spread(pairs.iter().map(|(b, o)| f(o) / f(b)), 2);
            println!("  {name:<22} {ratio}x");
        }
        println!(
            "{:<28} {:>22} {:>22} {:>22} {:>22} {:>18}",
            "path",
            "tasks/s",
            "worker us/task",
            "plugins us/task",
            "client us/task",
            "worker RSS MiB"
        );
        for (name, side) in &sides {
            println!(
                "{name:<28} {:>22} {:>22} {:>22} {:>22} {:>18}",
                spread(side.iter().map(|t| t.rate()), 0),
                spread(side.iter().map(|t| t.per_task(t.worker_cpu)), 1),
                spread(side.iter().map(|t| t.per_task(t.plugins_cpu)), 1),
                spread(side.iter().map(|t| t.per_task(t.client_cpu)), 1),
                spread(side.iter().map(|t| t.worker_rss_kib as f64 / 1024.0), 1),
            );
        }
        println!("(CPU from /proc/<pid>/stat over the timed span, per task run: worker = the daemon's process; plugins = its rust-echo instances; client = the queue backend process, or this bench process on the control socket; worker RSS = its VmRSS after the last answer)");
    }

    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }

    fn delta(from: u64, to: u64) -> String {
        format!("{:+.1} MiB", (to as f64 - from as f64) / 1024.0)
    }

    pub fn flood(n: usize, window: usize, ahead: usize, run: &super::FloodRun) {
        let pace = match ahead {
            0 => "as fast as its pipe takes them".to_string(),
            k => format!("never more than {k} unanswered"),
        };
        println!("\nflood: a queue backend with a window of {window} offers {n} tasks that sleep (rust.count), {pace}; answers read on a second thread");
        let b = &run.backend;
        let instance = &b["instances"][0];
        let restarts: u64 = b["instances"]
            .as_array()
            .map(|is| is.iter().filter_map(|i| i["restarts"].as_u64()).sum())
            .unwrap_or(0);
        match (&run.done, restarts) {
            (Some(f), _) => println!(
                "  completed: {:.1} MiB of offers written in {:.2} s; all but {window} answered after {:.2} s ({:.0} answers/s)",
                f.bytes_written as f64 / 1048576.0,
                f.write_secs,
                f.flood_secs,
                (n - window) as f64 / f.flood_secs.max(1e-9)
            ),
            (None, r) if r > 0 => println!(
                "  ended by the worker: {}",
                instance["last_exit"].as_str().unwrap_or("?")
            ),
            (None, _) => println!("  did not finish in {:.0} s", run.secs),
        }
        let stats = &b["backends"];
        println!(
            "  the worker's counters: offers_refused {}, offers_answered {}; backend restarts {restarts}",
            stats["offers_refused"], stats["offers_answered"],
        );
        if let Some(f) = &run.done {
            println!(
                "  the backend's count: refused -32005 {}, ran (SUCCESS) {}, other {}{}",
                f.refused,
                f.succeeded,
                f.other,
                f.first_other
                    .as_deref()
                    .map(|l| format!(" (first: {l})"))
                    .unwrap_or_default(),
            );
        }
        let Some(before) = &run.before else {
            println!("  (the flood never began)");
            return;
        };
        let flooded = match &run.done {
            Some(f) => format!(
                "all but {window} answered {:.1} MiB ({}), ",
                mib(f.rss_flooded),
                delta(before.rss_before, f.rss_flooded)
            ),
            None => String::new(),
        };
        println!(
            "  worker VmRSS: before {:.1} MiB, {flooded}end {:.1} MiB ({})",
            mib(before.rss_before),
            mib(run.end.0),
            delta(before.rss_before, run.end.0)
        );
        println!(
            "  worker VmHWM (peak): before {:.1} MiB, end {:.1} MiB ({})",
            mib(before.hwm_before),
            mib(run.end.1),
            delta(before.hwm_before, run.end.1)
        );
    }
}
