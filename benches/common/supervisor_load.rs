//! The supervisor bench's two ways to run no-op tasks on a plugin: over a raw pipe (the bench
//! writes the plugin's stdin and reads its stdout itself, the baseline) and through the
//! dispatcher and supervisor, each as WINDOW in flight (throughput) then one at a time
//! (latency); and the restart latency after a SIGKILL. What it measures, never what it means:
//! the rounds and the goals are `supervisor.rs`'s.

use plugin_protocol::{Frame, LineDecoder, Message};
use serde_json::json;
use std::future::Future;
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
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Where each side runs. The raw pipe as it always ran, its loop on the bench's main thread and
/// its reader on tokio's default runtime (a thread per core): a baseline comparable across
/// sessions. The raw pipe again on one thread (tokio's current-thread scheduler, as the worker
/// runs by default): no hand-off between threads, the fastest this driver goes, so the child
/// and not the driver sets its rate. The supervisor on the worker's own runtime, built as
/// `worker serve` builds it, the measurement a spawned task as the daemon's sources are.
pub struct Runtimes {
    raw: tokio::runtime::Runtime,
    raw_one_thread: tokio::runtime::Runtime,
    worker: tokio::runtime::Runtime,
}

impl Runtimes {
    pub fn new() -> Runtimes {
        let threads = worker::config::Config::default().runtime_threads;
        Runtimes {
            raw: tokio::runtime::Runtime::new().unwrap(),
            raw_one_thread: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            worker: worker::runtime::build(threads).unwrap(),
        }
    }

    /// Runs a raw-pipe measurement to its end.
    pub fn raw<T>(&self, f: impl Future<Output = T>) -> T {
        self.raw.block_on(f)
    }

    /// Runs a raw-pipe measurement to its end on one thread.
    pub fn raw_one_thread<T>(&self, f: impl Future<Output = T>) -> T {
        self.raw_one_thread.block_on(f)
    }

    /// Runs a measurement through the worker to its end.
    pub fn worker<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let spawned = async { tokio::spawn(f).await.expect("a measurement panicked") };
        self.worker.block_on(spawned)
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

/// Drives the plugin process directly: handshake, then `task.run` requests over the pipe.
pub async fn raw_pipe(m: Manifest, task: &'static str, params: Params, load: Load) -> Stats {
    let n = load.tasks;
    let mut pipe = Pipe::start(&m).await;
    let request = task_runs(task, params);
    // Throughput: keep WINDOW requests in flight.
    let start = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    while done < n {
        while sent < n && sent - done < WINDOW {
            pipe.stdin.write_all(&request(sent + 1)).await.unwrap();
            sent += 1;
        }
        pipe.stdin.flush().await.unwrap();
        pipe.responses.recv().await.unwrap();
        done += 1;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    // Latency: one request at a time.
    let mut lat = Vec::with_capacity(load.latency);
    for i in 0..load.latency {
        let t = Instant::now();
        pipe.stdin.write_all(&request(n + 1 + i)).await.unwrap();
        pipe.stdin.flush().await.unwrap();
        let end = pipe.responses.recv().await.unwrap();
        lat.push(end - t);
    }
    lat.sort();
    pipe.stop().await;
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
pub async fn via_supervisor(m: Manifest, task: &'static str, load: Load) -> Stats {
    beside(m, Vec::new(), task, load).await
}

/// The same, with other plugins running beside it (event subscribers).
pub async fn beside(m: Manifest, others: Vec<Manifest>, task: &'static str, load: Load) -> Stats {
    let n = load.tasks;
    let plugins = std::iter::once(m).chain(others).collect();
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
        let (d, next) = (dispatcher.clone(), next.clone());
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
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(load.latency);
    for _ in 0..load.latency {
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
pub async fn restart_latency(m: Manifest) -> (Duration, Duration) {
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
