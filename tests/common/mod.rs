//! Shared helpers for the integration tests: plugin fixtures in temp dirs and an in-process
//! supervisor. Every wait here is on an event with a timeout; nothing sleeps to pass.
#![allow(dead_code)]

pub mod broker;
pub mod nodes;
pub mod tls;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};
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
    "f.stderr_wait",
    "f.retry_until",
    "f.retry_bare",
    "f.where",
    "f.string_id",
    "f.bad_utf8",
    "f.huge_then_answer",
    "f.block",
    "f.stderr_flood",
    "f.garbage_flood",
    "f.request_flood",
    "f.env",
    "f.spin",
    "f.escape",
    "f.escape_clean",
    "f.write",
    "f.fs",
    "f.note",
    "f.note_sleep",
    "f.wait_file",
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

/// `user = "root"` (a manifest line) when the tests run as root, else nothing: a root worker
/// runs any other plugin as `nobody`, who cannot enter the tests' private temp dirs nor write
/// the files the fixtures report through. Tests of the switch itself name their user.
pub fn own_user() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        "user = \"root\"\n"
    } else {
        ""
    }
}

/// Writes `dir/plugin.toml`, with `own_user()` after its first line (`name = ...`) unless the
/// text names a user itself.
pub fn write_manifest(dir: &Path, text: &str) {
    let text = match text.split_once('\n') {
        Some((first, rest)) if !text.contains("\nuser =") => {
            format!("{first}\n{}{rest}", own_user())
        }
        _ => text.to_string(),
    };
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
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
    let user = if extra.contains("user =") {
        ""
    } else {
        own_user()
    };
    let text = format!(
        "name = \"{name}\"\nversion = \"0.0.1\"\ncommand = [\"/usr/bin/python3\", \"-u\", \"{}\"]\n{user}{extra}\n[env]\n{env}\n{tasks}\n{tables}\n",
        script.display()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    dir
}

/// Writes a manifest for the Rust example plugin.
/// `extra` goes before the `[[tasks]]` tables (top-level keys, or whole tables like `[[tests]]`).
pub fn rust_plugin(root: &Path, extra: &str) -> PathBuf {
    let dir = root.join("rust-echo");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"rust-echo\"\nversion = \"0.1.0\"\ncommand = [\"{}\"]\n{}{extra}\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n[[tasks]]\nname = \"rust.flood\"\n",
        rust_example_bin().display(),
        own_user()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    dir
}

pub fn options() -> PoolOptions {
    PoolOptions {
        worker_name: "test-worker".into(),
        max_line_bytes: plugin_protocol::DEFAULT_MAX_LINE_BYTES,
        queue_capacity: 1024,
        state_dir: None,
        plugin_user: None,
        events: worker::events::EventBus::new(),
        cgroups: None,
        offers: Default::default(),
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
        let mut events = Vec::new();
        let run = self
            .dispatcher
            .submit(request)
            .outcome(|ev| events.push(ev));
        let outcome = within(Duration::from_secs(60), run).await;
        (outcome, events)
    }

    /// Runs a task that must succeed; its result.
    pub async fn ok(&self, name: &str, args: Vec<Value>) -> Value {
        success(&self.run(name, args).await.0).clone()
    }

    /// Runs a task that must fail; its failure.
    pub async fn fails(&self, name: &str, args: Vec<Value>) -> worker::task::Failure {
        failure(&self.run(name, args).await.0).clone()
    }

    /// Waits until every instance of `plugin` is ready (again, after a crash or restart).
    pub async fn wait_all_ready(&self, plugin: &str) -> PluginStatus {
        self.wait_status(plugin, "every instance ready", |s| {
            s.instances
                .iter()
                .all(|i| i.state == worker::supervisor::status::InstanceState::Ready)
        })
        .await
    }

    /// Starts a task in the background.
    pub fn spawn(
        &self,
        name: &str,
        args: Vec<Value>,
    ) -> (String, tokio::task::JoinHandle<Outcome>) {
        let request = TaskRequest::new(name, args, Default::default());
        let id = request.id.to_string();
        let dispatcher = self.dispatcher.clone();
        let handle = tokio::spawn(async move { dispatcher.submit(request).outcome(|_| {}).await });
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

pub fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    for var in [
        "WORKER_CONFIG",
        "WORKER_PLUGINS",
        "WORKER_SOCKET",
        "WORKER_LOG",
    ] {
        cmd.env_remove(var);
    }
    // Never the checkout's default state dir: a developer's installs must not leak into tests.
    // Tests that install pass --state-dir, which wins over this.
    cmd.env("WORKER_STATE_DIR", empty_state_dir());
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// A state directory nothing is installed in, one per test process.
pub fn empty_state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("worker-test-empty-state-{}", std::process::id()))
}

/// `worker plugins install` of every plugin in `plugins` into `state` (no daemon on `socket`
/// yet, or the one there applies it). Returns success and stdout.
pub fn install_all(plugins: &Path, state: &Path, socket: &Path) -> (bool, String) {
    let out = output(
        worker()
            .args(["plugins", "install", "--plugins"])
            .arg(plugins)
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(socket),
    );
    (out.status.success(), text(&out.stdout) + &text(&out.stderr))
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("worker runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `worker serve` child with its log lines on a channel.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub plugins: PathBuf,
    /// The state dir: beside the socket, named after it.
    pub state: PathBuf,
    log: std_mpsc::Receiver<String>,
    pub seen: Vec<String>,
    /// Log lines taken while waiting in `&self` methods, not yet moved to `seen`.
    taken: std::cell::RefCell<Vec<String>>,
}

impl Daemon {
    pub fn start(plugins: &Path, socket: &Path) -> Daemon {
        Daemon::start_with(plugins, socket, &[])
    }

    /// Installs every plugin in `plugins`, then starts `worker serve` with extra arguments
    /// (e.g. a broker) and waits for its "serving" log line.
    pub fn start_with(plugins: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let state = socket.with_extension("state");
        let (ok, said) = install_all(plugins, &state, socket);
        if !ok {
            eprintln!("(some plugins did not install)\n{said}");
        }
        Daemon::serve(plugins, &state, socket, extra)
    }

    /// `worker serve` of what is installed in `state`, without installing anything.
    pub fn serve(plugins: &Path, state: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut child = worker()
            .args([
                "serve",
                "--log-format",
                "text",
                "--drain-timeout",
                "10",
                "--plugins",
            ])
            .arg(plugins)
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let (tx, log) = std_mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut d = Daemon {
            child,
            socket: socket.into(),
            plugins: plugins.into(),
            state: state.into(),
            log,
            seen: Vec::new(),
            taken: Default::default(),
        };
        d.wait_log("serving");
        d
    }

    pub fn wait_log(&mut self, needle: &str) -> String {
        self.wait_log_from(0, needle)
    }

    /// Waits for a line containing `needle` among the lines from the `start`-th on.
    pub fn wait_log_from(&mut self, start: usize, needle: &str) -> String {
        self.seen.append(&mut self.taken.borrow_mut());
        if let Some(l) = self.seen.iter().skip(start).find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line containing {needle:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every log line so far (including those not yet read by `wait_log`).
    pub fn drain_log(&mut self) -> Vec<String> {
        self.seen.append(&mut self.taken.borrow_mut());
        while let Ok(line) = self.log.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = worker();
        cmd.args(args)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--plugins")
            .arg(&self.plugins)
            .arg("--state-dir")
            .arg(&self.state);
        cmd
    }

    pub fn list_json(&self) -> Value {
        let out = output(&mut self.cli(&["plugins", "list", "--json"]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("list --json is JSON")
    }

    /// Polls `plugins list --json` until `pred` holds.
    pub fn wait_list(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let doc = self.list_json();
            if pred(&doc) {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {doc:#}"
            );
            // State changes log a line: wake on the next one (or look again after 50 ms)
            // rather than spawning `plugins list` back to back.
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(50)) {
                self.taken.borrow_mut().push(line);
            }
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "serve did not exit");
            // Drain logs while waiting, which also paces the loop.
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn plugin_ready(doc: &Value, name: &str) -> bool {
    doc["installed"].as_array().unwrap().iter().any(|p| {
        p["name"] == name
            && p["live"]["instances"]
                .as_array()
                .is_some_and(|i| i.iter().all(|i| i["state"] == "ready"))
    })
}

pub fn live_pids(doc: &Value) -> Vec<u32> {
    doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["live"]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// The JSON lines of a file (an event log) so far; none if it does not exist yet.
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `http://ADDR/metrics` from the daemon's log line.
pub fn metrics_addr(d: &mut Daemon) -> String {
    let line = d.wait_log("metrics at http://");
    let rest = &line[line.find("http://").unwrap() + 7..];
    rest[..rest.find('/').unwrap()].to_string()
}

/// One scrape: status line, content type and body.
pub fn scrape(addr: &str) -> (String, String, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head.lines().next().unwrap().to_string();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}
