//! Shared helpers for the integration tests: plugin fixtures in temp dirs and an in-process
//! supervisor. Every wait here is on an event with a timeout; nothing sleeps to pass.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use worker::dispatch::Dispatcher;
use worker::manifest::Manifest;
use worker::supervisor::pool::PoolOptions;
use worker::supervisor::status::PluginStatus;
use worker::supervisor::Supervisor;
use worker::task::{Outcome, TaskEvent, TaskRequest};

pub const FAULTY_TASKS: &[&str] = &[
    "f.ok",
    "f.pid",
    "f.sleep",
    "f.sleep_nocancel",
    "f.crash",
    "f.crash_once",
    "f.exit",
    "f.huge",
    "f.garbage",
    "f.raise",
    "f.progress",
    "f.stderr",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Rust example plugin, which `cargo test` builds as an example target.
pub fn rust_example_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("examples").join("rust-echo");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it (or run `cargo build --example rust-echo`)",
        bin.display()
    );
    bin
}

/// Writes `<root>/<name>/plugin.toml` for the fault-injection plugin. `extra` is appended to
/// the top-level table (before any sub-table), `tables` after it.
pub fn faulty_plugin(
    root: &Path,
    name: &str,
    env: &[(&str, &str)],
    extra: &str,
    tables: &str,
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let script = repo().join("tests/plugins/faulty.py");
    let tasks: String = FAULTY_TASKS
        .iter()
        .map(|t| format!("[[tasks]]\nname = \"{t}\"\n"))
        .collect();
    let env: String = env
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let text = format!(
        "name = \"{name}\"\nversion = \"0.0.1\"\ncommand = [\"/usr/bin/python3\", \"-u\", \"{}\"]\n{extra}\n[env]\n{env}\n{tasks}\n{tables}\n",
        script.display()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    dir
}

/// Writes a manifest for the Rust example plugin.
pub fn rust_plugin(root: &Path, extra: &str) -> PathBuf {
    let dir = root.join("rust-echo");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"rust-echo\"\nversion = \"0.1.0\"\ncommand = [\"{}\"]\n{extra}\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n",
        rust_example_bin().display()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    dir
}

pub fn options() -> PoolOptions {
    PoolOptions {
        worker_name: "test-worker".into(),
        max_line_bytes: plugin_protocol::DEFAULT_MAX_LINE_BYTES,
        queue_capacity: 1024,
    }
}

pub struct Harness {
    pub supervisor: Arc<Supervisor>,
    pub dispatcher: Arc<Dispatcher>,
}

impl Harness {
    pub fn start(dirs: &[PathBuf]) -> Harness {
        Harness::start_with(dirs, options())
    }

    pub fn start_with(dirs: &[PathBuf], options: PoolOptions) -> Harness {
        let manifests: Vec<Manifest> = dirs
            .iter()
            .map(|d| Manifest::load(d).expect("valid manifest"))
            .collect();
        let supervisor = Arc::new(Supervisor::start(manifests, options));
        let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
        Harness {
            supervisor,
            dispatcher,
        }
    }

    pub async fn ready(&self) {
        let not_ready = self.supervisor.wait_ready(Duration::from_secs(20)).await;
        assert!(not_ready.is_empty(), "plugins not ready: {not_ready:?}");
    }

    /// Runs a task to its outcome, collecting its events.
    pub async fn run(&self, name: &str, args: Vec<Value>) -> (Outcome, Vec<TaskEvent>) {
        self.run_request(TaskRequest::new(name, args, Default::default()))
            .await
    }

    pub async fn run_request(&self, request: TaskRequest) -> (Outcome, Vec<TaskEvent>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let outcome = within(Duration::from_secs(60), self.dispatcher.submit(request, tx)).await;
        let mut events = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        (outcome, events)
    }

    /// Starts a task in the background.
    pub fn spawn(
        &self,
        name: &str,
        args: Vec<Value>,
    ) -> (String, tokio::task::JoinHandle<Outcome>) {
        let request = TaskRequest::new(name, args, Default::default());
        let id = request.id.clone();
        let dispatcher = self.dispatcher.clone();
        let handle = tokio::spawn(async move {
            let (tx, _rx) = mpsc::unbounded_channel();
            dispatcher.submit(request, tx).await
        });
        (id, handle)
    }

    pub async fn status(&self, plugin: &str) -> PluginStatus {
        self.supervisor
            .plugin(plugin)
            .expect("plugin exists")
            .status()
            .await
            .expect("pool answers")
    }

    /// Polls the plugin's status until `pred` holds (status changes are events of the pool
    /// actor; polling its answer with a deadline is waiting on them).
    pub async fn wait_status(
        &self,
        plugin: &str,
        what: &str,
        pred: impl Fn(&PluginStatus) -> bool,
    ) -> PluginStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(plugin).await;
            if pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last status: {s:#?}"
            );
            let mut view = self.supervisor.plugin(plugin).unwrap().view();
            let _ = tokio::time::timeout(Duration::from_millis(20), view.changed()).await;
        }
    }

    pub async fn stop(&self) {
        within(Duration::from_secs(30), self.supervisor.stop(None)).await;
    }
}

pub async fn within<F: std::future::Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut).await.expect("timed out")
}

pub fn success(outcome: &Outcome) -> &Value {
    match outcome {
        Outcome::Success(v) => v,
        Outcome::Failure(f) => panic!("expected success, got {f:?}"),
    }
}

pub fn failure(outcome: &Outcome) -> &worker::task::Failure {
    match outcome {
        Outcome::Failure(f) => f,
        Outcome::Success(v) => panic!("expected failure, got {v}"),
    }
}

/// True if `pid` no longer runs (gone, or a zombie nobody has reaped yet).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .map(|s| s.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// Waits for a process to be gone, up to `limit`, by watching /proc.
pub async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if process_gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    process_gone(pid)
}

/// Blocking form of [`wait_gone`] for tests that drive the binary without a runtime.
pub fn wait_gone_blocking(pid: u32, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !process_gone(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    process_gone(pid)
}
