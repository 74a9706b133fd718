//! Supervisor benchmark: noop-task throughput and latency through the supervisor, against a
//! raw pipe baseline (the same plugin binary driven directly over its stdin/stdout, measured
//! the same way, in the same run), plus restart latency and the daemon's idle RSS.
//!
//! Run with `benches/run.sh` (it builds the release example plugin first). Figures are
//! printed as ratios to the baseline; absolute numbers depend on the machine.

#[path = "common/daemon.rs"]
#[allow(dead_code)] // each bench uses its own part
mod daemon;
#[path = "common/minimal.rs"]
mod minimal;
#[path = "common/procstat.rs"]
#[allow(dead_code)] // each bench uses its own part
mod procstat;

use plugin_protocol::{Frame, LineDecoder, Message};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use worker::dispatch::Dispatcher;
use worker::manifest::Manifest;
use worker::supervisor::pool::PoolOptions;
use worker::supervisor::Supervisor;
use worker::task::TaskRequest;

const N_THROUGHPUT: usize = 50_000;
const N_THROUGHPUT_PY: usize = 10_000;
const N_LATENCY: usize = 5_000;
const N_RESTARTS: usize = 50;
const WINDOW: usize = 16;

struct Stats {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
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

/// Drives the plugin process directly: handshake, then `task.run` requests over the pipe.
async fn raw_pipe(m: &Manifest, task: &str, n: usize) -> Stats {
    let mut child = tokio::process::Command::new(m.program())
        .args(&m.command[1..])
        .current_dir(&m.dir)
        .envs(&m.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocol_version":"1.0","worker":{"name":"bench","version":"0"},
        "plugin":{"name":m.name,"instance":0},"settings":{},
        "limits":{"max_line_bytes":16777216,"concurrency":WINDOW}}});
    stdin
        .write_all(format!("{init}\n").as_bytes())
        .await
        .unwrap();
    let (tx, mut responses) = mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut dec = LineDecoder::new(1 << 24);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = stdout.read(&mut buf).await.unwrap();
            if k == 0 {
                return;
            }
            dec.extend(&buf[..k]);
            while let Some(Frame::Line(l)) = dec.next_frame() {
                if let Ok(Message::Response(_)) = Message::parse(&l) {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    responses.recv().await.unwrap();
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"initialized\"}\n")
        .await
        .unwrap();
    let request = |id: usize| {
        let r = json!({"jsonrpc":"2.0","id":id,"method":"task.run","params":{"task_id":format!("t{id}"),"task":task,"args":[],"kwargs":{},"attempt":1}});
        format!("{r}\n").into_bytes()
    };
    // Throughput: keep WINDOW requests in flight.
    let start = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    while done < n {
        while sent < n && sent - done < WINDOW {
            stdin.write_all(&request(sent + 1)).await.unwrap();
            sent += 1;
        }
        stdin.flush().await.unwrap();
        responses.recv().await.unwrap();
        done += 1;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    // Latency: one request at a time.
    let mut lat = Vec::with_capacity(N_LATENCY);
    for i in 0..N_LATENCY {
        let t = Instant::now();
        stdin.write_all(&request(n + 1 + i)).await.unwrap();
        stdin.flush().await.unwrap();
        let end = responses.recv().await.unwrap();
        lat.push(end - t);
    }
    lat.sort();
    drop(stdin);
    let _ = child.kill().await;
    reader.abort();
    Stats {
        per_sec,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

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

/// The same work submitted through the dispatcher and supervisor.
async fn via_supervisor(m: &Manifest, task: &str, n: usize) -> Stats {
    beside(m, &[], task, n).await
}

/// The same, with other plugins running beside it (event subscribers).
async fn beside(m: &Manifest, others: &[Manifest], task: &str, n: usize) -> Stats {
    let plugins = std::iter::once(m).chain(others).cloned().collect();
    let supervisor = Arc::new(Supervisor::start(plugins, options()));
    let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
    assert!(supervisor
        .wait_ready(Duration::from_secs(20))
        .await
        .is_empty());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WINDOW {
        let (d, next, task) = (dispatcher.clone(), next.clone(), task.to_string());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let outcome = d
                    .submit(TaskRequest::new(&task, vec![], Default::default()))
                    .outcome(|_| {})
                    .await;
                assert!(outcome.is_success(), "{outcome:?}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(N_LATENCY);
    for _ in 0..N_LATENCY {
        let t = Instant::now();
        let outcome = dispatcher
            .submit(TaskRequest::new(task, vec![], Default::default()))
            .outcome(|_| {})
            .await;
        lat.push(t.elapsed());
        assert!(outcome.is_success());
    }
    lat.sort();
    supervisor.stop(None).await;
    Stats {
        per_sec,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

/// SIGKILL the instance, time until the pool reports it ready again.
async fn restart_latency(m: &Manifest) -> (Duration, Duration) {
    let supervisor = Supervisor::start(vec![m.clone()], options());
    assert!(supervisor
        .wait_ready(Duration::from_secs(20))
        .await
        .is_empty());
    let pool = supervisor.plugin(&m.name).unwrap();
    let mut view = pool.view();
    let mut times = Vec::new();
    for _ in 0..N_RESTARTS {
        let pid = pool.status().await.unwrap().instances[0].pid.unwrap();
        let restarts = view.borrow().restarts;
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        view.wait_for(|v| v.restarts > restarts && v.ready == 1)
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    supervisor.stop(None).await;
    (percentile(&times, 0.5), percentile(&times, 0.99))
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
        "{name:<34} {:>10.0}/s ({:>5.2}x)   p50 {:>8.1?} ({:>5.2}x)   p99 {:>8.1?}",
        s.per_sec,
        s.per_sec / base.per_sec,
        s.p50,
        s.p50.as_secs_f64() / base.p50.as_secs_f64(),
        s.p99
    );
}

/// `name`: `got` against `goal` (`higher` is better or not), and whether it is met.
fn goal(name: &str, got: f64, goal: f64, higher: bool, unit: &str) {
    let met = if higher { got >= goal } else { got <= goal };
    let sign = if higher { ">=" } else { "<=" };
    let verdict = if met { "met" } else { "NOT met" };
    println!("goal {name}: {got:.2}{unit} (goal {sign} {goal}{unit}): {verdict}");
}

fn main() {
    if std::env::var_os("BENCH_MINIMAL_CHILD").is_some() {
        return minimal::child();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let rust = manifest(
        root.path(),
        "rust-echo",
        &[rust_bin().display().to_string()],
        "",
        &["rust.noop", "rust.echo", "rust.count", "rust.flood"],
    );
    let py = manifest(
        root.path(),
        "python-fibonacci",
        &[
            "/usr/bin/python3".into(),
            repo()
                .join("examples/python-fibonacci/main.py")
                .display()
                .to_string(),
        ],
        &format!(
            "[env]\nPYTHONPATH = {:?}",
            repo().join("plugin-protocol/python").display().to_string()
        ),
        &["fibonacci", "py.noop"],
    );
    let me = std::env::current_exe().unwrap().display().to_string();
    // Apart from `root`, whose plugins the idle RSS measurement installs.
    let minimal_root = tempfile::tempdir().unwrap();
    let min_rust = manifest(
        minimal_root.path(),
        "minimal-rust",
        &[me],
        "[env]\nBENCH_MINIMAL_CHILD = \"1\"",
        &["min.noop"],
    );
    let min_py = manifest(
        minimal_root.path(),
        "minimal-python",
        &[
            "/usr/bin/python3".into(),
            repo()
                .join("benches/minimal_child.py")
                .display()
                .to_string(),
        ],
        "",
        &["minpy.noop"],
    );
    // BENCH_PROFILE_SUPERVISOR=N: only the minimal Rust child through the supervisor, N tasks
    // (long enough to attach `perf record -p` to this process).
    if let Some(n) = std::env::var("BENCH_PROFILE_SUPERVISOR")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        let s = rt.block_on(via_supervisor(&min_rust, "min.noop", n));
        println!(
            "minimal rust child via supervisor: {:.0}/s, p50 {:.1?}",
            s.per_sec, s.p50
        );
        return;
    }
    rt.block_on(async {
        println!("minimal children (no SDK), window {WINDOW} in flight; latency = one task at a time");
        let raw_min = raw_pipe(&min_rust, "min.noop", N_THROUGHPUT).await;
        let sup_min = via_supervisor(&min_rust, "min.noop", N_THROUGHPUT).await;
        let raw_min_py = raw_pipe(&min_py, "minpy.noop", N_THROUGHPUT_PY).await;
        let raw_sdk = raw_pipe(&rust, "rust.noop", N_THROUGHPUT).await;
        let raw_sdk_py = raw_pipe(&py, "py.noop", N_THROUGHPUT_PY).await;
        row("minimal rust child, raw pipe (baseline)", &raw_min, &raw_min);
        row("minimal rust child, via supervisor", &sup_min, &raw_min);
        row("rust SDK plugin, raw pipe", &raw_sdk, &raw_min);
        row("minimal python child, raw pipe (baseline)", &raw_min_py, &raw_min_py);
        row("python SDK plugin, raw pipe", &raw_sdk_py, &raw_min_py);
        let overhead = sup_min.p50.saturating_sub(raw_min.p50).as_secs_f64() * 1e6;
        goal("supervisor throughput, x raw pipe", sup_min.per_sec / raw_min.per_sec, 0.6, true, "x");
        goal("supervisor p50 overhead one at a time", overhead, 30.0, false, " µs");
        goal("rust SDK, x minimal child", raw_sdk.per_sec / raw_min.per_sec, 0.5, true, "x");
        goal("python SDK, x minimal python child", raw_sdk_py.per_sec / raw_min_py.per_sec, 0.7, true, "x");
        println!("noop tasks, window {WINDOW} in flight, 1 plugin process; latency = one task at a time");
        let raw_rust = raw_pipe(&rust, "rust.noop", N_THROUGHPUT).await;
        let sup_rust = via_supervisor(&rust, "rust.noop", N_THROUGHPUT).await;
        let raw_py = raw_pipe(&py, "py.noop", N_THROUGHPUT_PY).await;
        let sup_py = via_supervisor(&py, "py.noop", N_THROUGHPUT_PY).await;
        row("rust plugin, raw pipe (baseline)", &raw_rust, &raw_rust);
        row("rust plugin, via supervisor", &sup_rust, &raw_rust);
        row("python SDK, raw pipe (baseline)", &raw_py, &raw_py);
        row("python SDK, via supervisor", &sup_py, &raw_py);
        println!("event subscribers beside the rust plugin (every task.* and instance.* event):");
        let reading = subscriber(root.path(), "event-log", "examples/event-log/main.py", "");
        let stalled = subscriber(
            root.path(),
            "subscriber",
            "tests/plugins/subscriber.py",
            "SUBSCRIBER_STALL = \"1\"\n",
        );
        let alone = via_supervisor(&rust, "rust.noop", N_THROUGHPUT).await;
        let with_log = beside(&rust, &[reading], "rust.noop", N_THROUGHPUT).await;
        let with_stalled = beside(&rust, &[stalled], "rust.noop", N_THROUGHPUT).await;
        row("no subscriber (baseline)", &alone, &alone);
        row("+ event-log writing every event", &with_log, &alone);
        row("+ a subscriber that stopped reading", &with_stalled, &alone);
        let (p50, p99) = restart_latency(&rust).await;
        println!("restart latency, rust plugin (SIGKILL -> ready, {N_RESTARTS} runs): p50 {p50:.1?}, p99 {p99:.1?}");
        let (p50, p99) = restart_latency(&py).await;
        println!("restart latency, python SDK  (SIGKILL -> ready, {N_RESTARTS} runs): p50 {p50:.1?}, p99 {p99:.1?}");
    });
    match idle_rss_kib(root.path()) {
        Some(kib) => println!(
            "worker serve idle RSS with both plugins running: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("worker serve idle RSS: skipped (build target/release/worker first)"),
    }
}
