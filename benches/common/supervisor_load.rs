//! The supervisor bench's two ways to run no-op tasks on a plugin: over a raw pipe (the bench
//! writes the plugin's stdin and reads its stdout itself, the baseline) and through the
//! dispatcher and supervisor, each as WINDOW in flight (throughput) then one at a time
//! (latency), alone or paired with another side in alternating slices; and the restart latency
//! after a SIGKILL. What it measures, never what it means: the rounds and the goals are
//! `supervisor.rs`'s.

use plugin_protocol::{Frame, LineDecoder, Message};
use serde_json::json;
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

/// Tasks in flight in a throughput run (and each plugin's concurrency).
pub const WINDOW: usize = 16;
/// SIGKILLs per restart-latency measurement.
pub const N_RESTARTS: usize = 50;

/// How many tasks one run pushes: `tasks` with WINDOW in flight, then `latency` one at a time.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub tasks: usize,
    pub latency: usize,
}

/// What one run measured: throughput with WINDOW in flight, latency one at a time.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Time on a CPU per task in the throughput runs, in µs: this process (the bench's driver,
    /// and for a supervised side the worker), and the side's own processes (plugins and their
    /// children).
    pub cpu_own: f64,
    pub cpu_kids: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Where a side runs. The raw pipe as it always ran, its loop on the bench's main thread and its
/// reader on tokio's default runtime (a thread per core): a baseline comparable across
/// sessions. The raw pipe again on one thread (tokio's current-thread scheduler, as the worker
/// runs by default): no hand-off between threads, the fastest this driver goes, so the child
/// and not the driver sets its rate. The supervisor on the worker's own runtime, built as
/// `worker serve` builds it, its load driven from spawned tasks as the daemon's sources are.
/// Each side has a runtime of its own: while the other side of a pair runs, a current-thread
/// runtime is not polled at all, so a paused side does no work.
#[derive(Debug, Clone, Copy)]
pub enum RawOn {
    DefaultRuntime,
    OneThread,
}

fn runtime(on: Option<RawOn>) -> tokio::runtime::Runtime {
    match on {
        Some(RawOn::DefaultRuntime) => tokio::runtime::Runtime::new().unwrap(),
        Some(RawOn::OneThread) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        None => worker::runtime::build(worker::config::Config::default().runtime_threads).unwrap(),
    }
}

/// One side of a measurement: a plugin started once, then driven for as many slices of tasks
/// as asked, on its own runtime.
pub struct Side {
    rt: tokio::runtime::Runtime,
    driver: Driver,
    /// The processes it started (the plugins and their children).
    pids: Vec<u32>,
    /// Time on a CPU over its throughput runs (this process's threads, all of them: the other
    /// side's are idle meanwhile; and each of `pids`).
    cpu: super::procstat::CpuTally,
}

enum Driver {
    Raw {
        pipe: Box<Pipe>,
        request: Box<dyn Fn(usize) -> Vec<u8>>,
        /// The next request's id.
        next: usize,
    },
    Supervised {
        supervisor: Arc<Supervisor>,
        dispatcher: Arc<Dispatcher>,
        task: &'static str,
    },
}

impl Side {
    /// `m`'s command driven over its pipes by the bench.
    pub fn raw(on: RawOn, m: Manifest, task: &'static str, params: Params) -> Side {
        let rt = runtime(Some(on));
        let before = children();
        let pipe = Box::new(rt.block_on(Pipe::start(&m)));
        let request = task_runs(task, params);
        let pids = started_since(&before);
        Side {
            rt,
            driver: Driver::Raw {
                pipe,
                request,
                next: 1,
            },
            cpu: super::procstat::CpuTally::new(&pids),
            pids,
        }
    }

    /// `m` (with `others` beside it, e.g. event subscribers) under the supervisor, its tasks
    /// submitted through the dispatcher.
    pub fn supervised(m: Manifest, others: Vec<Manifest>, task: &'static str) -> Side {
        let rt = runtime(None);
        let before = children();
        let plugins = std::iter::once(m).chain(others).collect();
        let (supervisor, dispatcher) = rt.block_on(async {
            let supervisor = Arc::new(Supervisor::start(plugins, options()));
            let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
            assert!(supervisor
                .wait_ready(Duration::from_secs(20))
                .await
                .is_empty());
            (supervisor, dispatcher)
        });
        let pids = started_since(&before);
        Side {
            rt,
            driver: Driver::Supervised {
                supervisor,
                dispatcher,
                task,
            },
            cpu: super::procstat::CpuTally::new(&pids),
            pids,
        }
    }

    /// Runs `n` tasks with WINDOW in flight; how long they took.
    pub fn throughput(&mut self, n: usize) -> Duration {
        let mark = self.cpu.mark();
        let took = self.drive(n, false)[0];
        self.cpu.add(mark, n);
        took
    }

    /// Time on a CPU per task of its throughput runs (µs): this process, then the side's
    /// processes by name, e.g. `this process 2.90, rust-echo 3.10, python3 0.60`.
    pub fn cpu_detail(&self) -> String {
        let parts: Vec<String> = (self.cpu.per_task().iter())
            .map(|(name, us)| format!("{name} {us:.2}"))
            .collect();
        parts.join(", ")
    }

    /// This process's and the side's processes' time on a CPU per task (µs).
    fn cpu_per_task(&self) -> (f64, f64) {
        let per_task = self.cpu.per_task();
        let kids = per_task.iter().skip(1).map(|(_, us)| us).sum();
        (per_task.first().map_or(0.0, |(_, us)| *us), kids)
    }

    /// Runs `n` tasks one at a time; each one's latency.
    pub fn latencies(&mut self, n: usize) -> Vec<Duration> {
        self.drive(n, true)
    }

    /// `n` tasks, one at a time (each latency) or WINDOW in flight (the time they all took).
    fn drive(&mut self, n: usize, one_at_a_time: bool) -> Vec<Duration> {
        match &mut self.driver {
            Driver::Raw {
                pipe,
                request,
                next,
            } => {
                let first = *next;
                *next += n;
                self.rt.block_on(async {
                    if one_at_a_time {
                        raw_latencies(pipe, request, first, n).await
                    } else {
                        vec![raw_throughput(pipe, request, first, n).await]
                    }
                })
            }
            Driver::Supervised {
                dispatcher, task, ..
            } => {
                let (d, task) = (dispatcher.clone(), *task);
                self.rt.block_on(async move {
                    if one_at_a_time {
                        supervised_latencies(d, task, n).await
                    } else {
                        vec![supervised_throughput(d, task, n).await]
                    }
                })
            }
        }
    }

    /// Waits (up to [`SETTLE`]) until none of its processes' threads is running or waiting
    /// for a CPU: what a turn left behind (an event subscriber's backlog, say) is done before
    /// the other side's turn starts, and is not charged to it.
    /// Returns how long that took, and whether it ran out of time.
    pub fn settle(&self) -> (Duration, bool) {
        let start = Instant::now();
        while self.pids.iter().any(|&p| super::procstat::running(p)) {
            if start.elapsed() >= SETTLE {
                return (start.elapsed(), true);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        (start.elapsed(), false)
    }

    pub fn stop(self) {
        match self.driver {
            Driver::Raw { pipe, .. } => self.rt.block_on((*pipe).stop()),
            Driver::Supervised { supervisor, .. } => self.rt.block_on(supervisor.stop(None)),
        }
    }

    /// One whole measurement: `load.tasks` with WINDOW in flight, then `load.latency` one at a
    /// time; then the side is stopped.
    pub fn measure(mut self, load: Load) -> Stats {
        let took = self.throughput(load.tasks);
        let mut lat = self.latencies(load.latency);
        let cpu = self.cpu_per_task();
        self.stop();
        Stats::of(load.tasks, took, &mut lat, cpu)
    }
}

impl Stats {
    fn of(tasks: usize, took: Duration, lat: &mut [Duration], cpu: (f64, f64)) -> Stats {
        lat.sort();
        Stats {
            per_sec: tasks as f64 / took.as_secs_f64(),
            p50: percentile(lat, 0.5),
            p99: percentile(lat, 0.99),
            cpu_own: cpu.0,
            cpu_kids: cpu.1,
        }
    }
}

/// The longest a side's processes are waited for to go quiet after its turn.
pub const SETTLE: Duration = Duration::from_millis(500);

/// This process's descendants now.
fn children() -> Vec<u32> {
    super::procstat::descendants(std::process::id())
}

/// Descendants of this process that were not among `before`.
fn started_since(before: &[u32]) -> Vec<u32> {
    children()
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect()
}

/// Measures `a` and `b` in turns: `slices` slices of a `load`'s tasks each (and of its
/// latency runs), alternating which goes first (`a b b a a b ...`, starting with `b` when
/// `b_first`), so that a change in the machine's speed lasting longer than a slice hits both
/// alike. Each side's rate is its tasks over the time its own slices took; after each turn
/// the side's processes are let go quiet ([`Side::settle`]) before the other's turn.
pub fn paired(
    a: &mut Side,
    b: &mut Side,
    load: Load,
    slices: usize,
    b_first: bool,
) -> (Stats, Stats, Settled) {
    let slices = slices.clamp(1, load.tasks.min(load.latency).max(1));
    let mut took = [Duration::ZERO; 2];
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut settled = Settled::default();
    for s in 0..slices {
        let part = |total: usize| total / slices + usize::from(s < total % slices);
        let order = if (s % 2 == 1) != b_first {
            [1, 0]
        } else {
            [0, 1]
        };
        for i in order {
            let side = if i == 0 { &mut *a } else { &mut *b };
            took[i] += side.throughput(part(load.tasks));
            settled.add(side.settle());
        }
        for i in order {
            let side = if i == 0 { &mut *a } else { &mut *b };
            lat[i].extend(side.latencies(part(load.latency)));
            settled.add(side.settle());
        }
    }
    let [la, lb] = &mut lat;
    (
        Stats::of(load.tasks, took[0], la, a.cpu_per_task()),
        Stats::of(load.tasks, took[1], lb, b.cpu_per_task()),
        settled,
    )
}

/// What the waits between turns took ([`Side::settle`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Settled {
    pub turns: usize,
    pub total: Duration,
    /// Turns after which a side was still running when the wait ran out.
    pub timed_out: usize,
}

impl Settled {
    fn add(&mut self, (took, timed_out): (Duration, bool)) {
        self.turns += 1;
        self.total += took;
        self.timed_out += usize::from(timed_out);
    }
}

/// A plugin process past its handshake, driven over its pipes by the bench.
struct Pipe {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    /// When each response line was read.
    responses: mpsc::UnboundedReceiver<Instant>,
    reader: tokio::task::JoinHandle<()>,
}

impl Pipe {
    /// Spawns `m`'s command and does the handshake (`initialize`, then `initialized`).
    async fn start(m: &Manifest) -> Pipe {
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
        Pipe {
            child,
            stdin,
            responses,
            reader,
        }
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = self.child.kill().await;
        self.reader.abort();
    }
}

/// What a raw pipe's `task.run` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    /// Only what protocol 1.0 requires (`task_id`, `task`, `args`, `kwargs`, `attempt`): the
    /// baseline as it always ran.
    Minimal,
    /// Every field the worker writes for a task from the control socket (`time_limit`,
    /// `delivery_info`, `request`, and a 36-character id like its UUIDs), so that the child
    /// parses the same line from either side. Written from a template made once, so the
    /// driver spends no more per line than the worker's own writer does.
    AsTheWorker,
}

/// Makes the `task.run` lines of `task`, by request id.
fn task_runs(task: &'static str, params: Params) -> Box<dyn Fn(usize) -> Vec<u8>> {
    match params {
        Params::Minimal => Box::new(move |id| {
            let params = json!({"task_id": format!("t{id}"), "task": task, "args": [], "kwargs": {}, "attempt": 1});
            let r = json!({"jsonrpc": "2.0", "id": id, "method": "task.run", "params": params});
            format!("{r}\n").into_bytes()
        }),
        Params::AsTheWorker => {
            let (before, after) = worker_params(task);
            Box::new(move |id| {
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"task.run\",\"params\":{before}{id:036}{after}}}\n"
                )
                .into_bytes()
            })
        }
    }
}

/// `task.run`'s params as the worker writes them for `task`, split where its id goes.
fn worker_params(task: &str) -> (String, String) {
    const ID: &str = "TASK-ID";
    let params = serde_json::to_string(&plugin_protocol::TaskRunParams {
        task_id: ID.into(),
        task: task.into(),
        args: Vec::new(),
        kwargs: Default::default(),
        attempt: 1,
        time_limit: Default::default(),
        delivery_info: Some(Default::default()),
        request: Some(plugin_protocol::RequestInfo {
            hostname: Some("bench".into()),
            ..Default::default()
        }),
    })
    .unwrap();
    let (before, after) = params.split_once(ID).unwrap();
    (before.to_string(), after.to_string())
}

/// `n` requests from id `first` over the pipe, WINDOW in flight; how long until the last answer.
async fn raw_throughput(
    pipe: &mut Pipe,
    request: &dyn Fn(usize) -> Vec<u8>,
    first: usize,
    n: usize,
) -> Duration {
    let start = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    while done < n {
        while sent < n && sent - done < WINDOW {
            pipe.stdin.write_all(&request(first + sent)).await.unwrap();
            sent += 1;
        }
        pipe.stdin.flush().await.unwrap();
        pipe.responses.recv().await.unwrap();
        done += 1;
    }
    start.elapsed()
}

/// `n` requests from id `first`, one at a time; each one's latency.
async fn raw_latencies(
    pipe: &mut Pipe,
    request: &dyn Fn(usize) -> Vec<u8>,
    first: usize,
    n: usize,
) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        pipe.stdin.write_all(&request(first + i)).await.unwrap();
        pipe.stdin.flush().await.unwrap();
        let end = pipe.responses.recv().await.unwrap();
        lat.push(end - t);
    }
    lat
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

/// `n` tasks through the dispatcher from WINDOW spawned submitters; how long they took.
async fn supervised_throughput(d: Arc<Dispatcher>, task: &'static str, n: usize) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WINDOW {
        let (d, next) = (d.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let outcome = d
                    .submit(TaskRequest::new(task, vec![], Default::default()))
                    .outcome(|_| {})
                    .await;
                assert!(outcome.is_success(), "{outcome:?}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    start.elapsed()
}

/// `n` tasks one at a time from a spawned submitter; each one's latency.
async fn supervised_latencies(d: Arc<Dispatcher>, task: &'static str, n: usize) -> Vec<Duration> {
    let submitter = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let outcome = d
                .submit(TaskRequest::new(task, vec![], Default::default()))
                .outcome(|_| {})
                .await;
            lat.push(t.elapsed());
            assert!(outcome.is_success());
        }
        lat
    });
    submitter.await.expect("a measurement panicked")
}

/// SIGKILL the instance, time until the pool reports it ready again.
pub fn restart_latency(m: Manifest) -> (Duration, Duration) {
    let rt = runtime(None);
    rt.block_on(async { tokio::spawn(restart_times(m)).await.unwrap() })
}

async fn restart_times(m: Manifest) -> (Duration, Duration) {
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
