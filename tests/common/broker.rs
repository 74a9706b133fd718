//! RabbitMQ test support: the broker and Celery-client requirements, a per-test queue and node
//! name (a "lane"), and the Python plugin used by several tests.

use super::*;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// The real Celery client's venv, created on first use.
pub fn celery_venv() -> PathBuf {
    repo().join("target/celery-venv")
}

/// Holds an exclusive lock on `target/<name>.lock` while preparing something shared by test
/// threads and test processes.
fn prepare_lock(name: &str) -> nix::fcntl::Flock<std::fs::File> {
    let dir = repo().join("target");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{name}.lock")))
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock for test preparation")
}

fn broker_up() -> bool {
    TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2)).is_ok()
}

/// RabbitMQ on 127.0.0.1:5672: started if it is installed and stopped.
fn ensure_broker(test: &str) {
    if broker_up() {
        return;
    }
    let _lock = prepare_lock("rabbitmq");
    if broker_up() {
        return;
    }
    let started = Command::new("rabbitmq-server").arg("-detached").status();
    if !started.is_ok_and(|s| s.success()) {
        panic!(
            "{test} needs RabbitMQ on 127.0.0.1:5672 and could not start it: install it \
             (apt-get install rabbitmq-server) and start it (rabbitmq-server -detached), or set \
             WORKER_TESTS_WITHOUT_BROKER=1 to skip the broker tests"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !broker_up() {
        assert!(
            std::time::Instant::now() < deadline,
            "{test}: RabbitMQ did not come up within 90 s of `rabbitmq-server -detached`"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("rabbitmqctl").arg("await_startup").status();
}

/// The venv's Python with the real Celery client, created in `target/celery-venv` if missing.
fn ensure_celery(test: &str) -> PathBuf {
    venv_with(test, &celery_venv(), "celery", "celery>=5.4,<6")
}

/// The Python of a venv with Celery 5.3.6, the oldest client the drop-in promise covers,
/// created in `target/celery536-venv` on first use.
pub fn celery_536_python(test: &str) -> PathBuf {
    ensure_broker(test);
    celery_536_venv(test)
}

/// Celery 5.3.6's Python with kombu's Redis transport (`kombu[redis]`: the redis-py and
/// `packaging` the newest kombu, which pip picks for Celery 5.3.6, needs; Celery 5.3.6's own
/// `redis` extra pins a redis-py too old for it), for the Redis broker's tests (no RabbitMQ).
pub fn celery_536_redis_python(test: &str) -> PathBuf {
    celery_536_venv(test);
    venv_with(
        test,
        &repo().join("target/celery536-venv"),
        "redis",
        "kombu[redis]",
    )
}

fn celery_536_venv(test: &str) -> PathBuf {
    let venv = repo().join("target/celery536-venv");
    venv_with(test, &venv, "celery", "celery==5.3.6")
}

/// A venv of its own with Girder Worker's package (`girder-worker`, which brings its Celery
/// and jsonpickle), created in `target/girder-venv` on first use.
pub fn girder_python(test: &str) -> PathBuf {
    ensure_broker(test);
    let venv = repo().join("target/girder-venv");
    venv_with(test, &venv, "girder_worker.app", "girder-worker==5.0.21")
}

/// The Python of the venv at `venv` with `module` importable: the venv is created and
/// `requirement` pip-installed on first use (once, across test threads and processes).
fn venv_with(test: &str, venv: &Path, module: &str, requirement: &str) -> PathBuf {
    let python = venv.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(&python) {
        return python;
    }
    let name = venv.file_name().unwrap_or_default().to_string_lossy();
    let _lock = prepare_lock(&name);
    if has(&python) {
        return python;
    }
    let fix = format!(
        "/usr/bin/python3 -m venv {v} && {v}/bin/pip install '{requirement}'",
        v = venv.display()
    );
    let created = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", requirement])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        created && has(&python),
        "{test} needs `{requirement}` and could not install it; run: {fix} (Debian's \
         python3-venv provides venv), or set WORKER_TESTS_WITHOUT_BROKER=1 to skip the broker tests"
    );
    python
}

/// The Celery venv's Python with the reference OpenMetrics parser (`prometheus_client`)
/// added on first use: `tests/celery/openmetrics.py` parses `/metrics` with it.
pub fn openmetrics_python(test: &str) -> PathBuf {
    celery_venv_with(test, "prometheus_client", "prometheus-client>=0.20")
}

/// The Celery venv's Python with the real Flower (PyPI `flower`) added on first use.
pub fn flower_python(test: &str) -> PathBuf {
    celery_venv_with(test, "flower", "flower>=2,<3")
}

/// The Celery venv's Python with kombu's Redis transport (`kombu[redis]`: redis-py, which
/// Celery's Redis backend uses too, and `packaging`, which the transport imports).
pub fn redis_python(test: &str) -> PathBuf {
    celery_venv_with(test, "kombu.transport.redis", "kombu[redis]")
}

/// The Celery venv's Python with `module` importable, pip-installing `requirement` on first use.
fn celery_venv_with(test: &str, module: &str, requirement: &str) -> PathBuf {
    ensure_celery(test);
    venv_with(test, &celery_venv(), module, requirement)
}

/// Runs a client command and returns the JSON of its last stdout line.
pub fn last_json(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("python runs");
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("client said {stdout:?}, stderr {}", text(&out.stderr)))
}

/// `rabbitmqctl list_queues` arguments whose listing [`parse_queue_counts`] reads.
pub const LIST_QUEUE_COUNTS: [&str; 6] = [
    "list_queues",
    "-q",
    "--no-table-headers",
    "name",
    "messages_ready",
    "messages_unacknowledged",
];

/// Messages ready and unacknowledged in `queue`, as `rabbitmqctl` lists them (None if the
/// broker does not list it).
pub fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let out = Command::new("rabbitmqctl")
        .args(LIST_QUEUE_COUNTS)
        .output()
        .expect("rabbitmqctl runs");
    parse_queue_counts(&text(&out.stdout), queue)
}

/// `queue`'s (ready, unacked) in a `rabbitmqctl list_queues -q --no-table-headers name
/// messages_ready messages_unacknowledged` listing.
pub fn parse_queue_counts(listing: &str, queue: &str) -> Option<(u64, u64)> {
    listing.lines().find_map(|l| {
        let mut f = l.split('\t');
        if f.next()? != queue {
            return None;
        }
        Some((
            f.next()?.trim().parse().ok()?,
            f.next()?.trim().parse().ok()?,
        ))
    })
}

/// A child's stdout lines as they come, kept, to wait on with a timeout. The child is killed
/// when this is dropped.
pub struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Watched {
    pub fn spawn(mut cmd: Command) -> Watched {
        let mut child = cmd
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("the watched command starts");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watched {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (seen before or arriving within 30 s) for which `pred` holds.
    pub fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line {what}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every broker test needs: RabbitMQ running and the Celery client's Python. Prepared on
/// first use; what cannot be prepared fails the test with the command that fixes it. (With
/// `WORKER_TESTS_WITHOUT_BROKER=1` these tests are compiled as ignored instead.)
pub fn requirements(test: &str) -> PathBuf {
    ensure_broker(test);
    ensure_celery(test)
}

/// A test's own queue and node name, so tests never see each other's messages; on RabbitMQ
/// the queue and its exchange are deleted when the test ends (a Redis broker is the test's own
/// `RedisServer`, gone with it).
pub struct Lane {
    pub queue: String,
    pub node: String,
    pub python: PathBuf,
    /// The broker of the clients and the worker: [`BROKER`] unless set (e.g. `RedisServer::url`).
    pub broker: String,
    /// The clients' `RESULT_BACKEND` (see `tests/celery/capp.py`); unset: rpc://.
    pub result_backend: Option<String>,
}

impl Lane {
    pub fn new(test: &str, python: PathBuf) -> Lane {
        let tag = format!("{test}-{:08x}", fastrand::u32(..));
        Lane {
            queue: format!("t.{tag}"),
            node: format!("{tag}@test"),
            python,
            broker: BROKER.to_string(),
            result_backend: None,
        }
    }

    pub fn client(&self, args: &[&str]) -> Command {
        self.client_on(&self.queue, args)
    }

    /// The client for `queue` rather than the lane's own.
    pub fn client_on(&self, queue: &str, args: &[&str]) -> Command {
        let mut cmd = self.script("client.py");
        cmd.arg(queue).args(args);
        cmd
    }

    /// `tests/celery/SCRIPT` under the lane's Python, broker and result backend.
    pub fn script(&self, script: &str) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo().join("tests/celery").join(script))
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", &self.broker)
            .stdin(Stdio::null());
        if let Some(b) = &self.result_backend {
            cmd.env("RESULT_BACKEND", b);
        }
        cmd
    }

    /// Runs the client and returns the JSON of its last stdout line.
    pub fn run(&self, args: &[&str]) -> Value {
        last_json(&mut self.client(args))
    }

    pub fn celery_cli(&self, args: &[&str]) -> String {
        let out = self
            .celery_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("celery cli runs");
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    pub fn worker(&self, plugins: &Path, socket: &Path) -> Daemon {
        self.worker_with(plugins, socket, &[])
    }

    /// A worker on this lane with `extra` arguments (e.g. `-E`).
    pub fn worker_with(&self, plugins: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--broker",
            &self.broker,
            "-Q",
            &self.queue,
            "-n",
            &self.node,
        ];
        args.extend_from_slice(extra);
        let mut d = Daemon::start_with(plugins, socket, &args);
        d.wait_log(self.consuming());
        d
    }

    /// The log line of a worker on this lane's broker that consumes.
    pub fn consuming(&self) -> &'static str {
        if self.on_redis() {
            "consuming from Redis"
        } else {
            "consuming Celery tasks"
        }
    }

    pub fn on_redis(&self) -> bool {
        self.broker.starts_with("redis://")
    }

    /// The `celery -A capp ARGS` command (from the client's venv), to spawn.
    pub fn celery_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.python.parent().unwrap().join("celery"));
        cmd.args(["-A", "capp"])
            .args(args)
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", &self.broker);
        cmd
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if self.on_redis() {
            return;
        }
        let script = format!(
            "from capp import app\nwith app.connection_for_write() as c:\n ch = c.channel()\n ch.queue_delete({q:?})\n ch.exchange_delete({q:?})",
            q = self.queue
        );
        let _ = Command::new(&self.python)
            .args(["-c", &script])
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", &self.broker)
            .output();
    }
}

pub fn fib_plugin(root: &Path) {
    let dir = root.join("python-fibonacci");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"python-fibonacci\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", {:?}]\nconcurrency = 4\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"fibonacci\"\n[[tasks]]\nname = \"py.noop\"\n",
        repo().join("examples/python-fibonacci/main.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string()
    );
    super::write_manifest(&dir, &text);
}

/// The Python SDK plugin whose `ctx.where` returns `ctx.queue` and `ctx.request`.
pub fn context_plugin(root: &Path) {
    let dir = root.join("context");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"context\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", {:?}]\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"ctx.where\"\n",
        repo().join("tests/plugins/context.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string()
    );
    super::write_manifest(&dir, &text);
}

/// `examples/file-checksum` with the SDK on PYTHONPATH (the example pip-installs it).
pub fn checksum_plugin(root: &Path) {
    let dir = root.join("file-checksum");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"file-checksum\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nconcurrency = 2\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"file.checksum\"\n",
        repo().join("examples/file-checksum/main.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string()
    );
    super::write_manifest(&dir, &text);
}

#[macro_export]
macro_rules! setup {
    ($test:literal) => {{
        let python = common::broker::requirements($test);
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        (common::broker::Lane::new($test, python), root, plugins)
    }};
}

/// `examples/event-log` with the SDK on PYTHONPATH (the example pip-installs it), logging to
/// `log`.
pub fn event_log_plugin(root: &Path, log: &Path) {
    let dir = root.join("event-log");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"event-log\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nevents = [\"*\"]\n[env]\nPYTHONPATH = {:?}\n[settings]\npath = {:?}\n",
        repo().join("examples/event-log/main.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string(),
        log.display().to_string()
    );
    super::write_manifest(&dir, &text);
}

/// `examples/node-file-checksum` run from the checkout, with the Node SDK found through
/// `NODE_PATH` (a `worker-plugin` link under `root`; the example npm-installs it).
pub fn node_checksum_plugin(plugins: &Path, root: &Path) {
    let modules = root.join("node_modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::os::unix::fs::symlink(
        repo().join("plugin-protocol/node"),
        modules.join("worker-plugin"),
    )
    .unwrap();
    let dir = plugins.join("node-file-checksum");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"node-file-checksum\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/node\", {:?}]\nconcurrency = 2\n[env]\nNODE_PATH = {:?}\n[[tasks]]\nname = \"node.file.checksum\"\n",
        repo().join("examples/node-file-checksum/main.js").display().to_string(),
        modules.display().to_string()
    );
    super::write_manifest(&dir, &text);
}

/// A private `redis-server` on a free port with its data in a temp dir, for one test: it can be
/// stopped (saving its data, as a restart keeps it) and started again. Killed when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut r = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis-cli -p PORT ARGS`: its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs (Debian's redis-tools)");
        text(&out.stdout).trim().to_string()
    }

    /// Starts the server (again) and waits until it answers.
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian's redis-server; .ci/run installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Each look is a redis-cli process, which paces the looks.
        while self.cli(&["ping"]) != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
        }
    }

    /// Stops the server, saving its data first (a restart loads it back).
    pub fn stop(&mut self) {
        self.cli(&["shutdown", "save"]);
        if let Some(mut c) = self.child.take() {
            c.wait().unwrap();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The JSON lines `f.note` wrote to `path`, once there are `n` (within 30 s).
pub fn notes(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} notes never came to {}",
            path.display()
        );
        // The note is written by a task the worker publishes: look again shortly.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The states after which a Celery task has its answer.
pub const FINAL_STATES: [&str; 3] = ["SUCCESS", "FAILURE", "REVOKED"];

/// Final-state messages (their JSON bodies: `status`, `result`...) seen per task id.
pub type Counts =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<serde_json::Value>>>>;

/// Consumes the reply queue `queue` at `url` (declared durable with `args`; no-ack, so nothing
/// is ever redelivered to the test) and records every final-state message; `ready` is sent once
/// it consumes. The connection is never dropped while results may come (a no-ack consumer loses
/// what the broker had sent when its connection closes, which would be the test's loss, not the
/// worker's); on `stop`, it cancels the consumer and reads what the broker had already sent.
pub async fn read_replies(
    url: String,
    queue: String,
    args: lapin::types::FieldTable,
    counts: Counts,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures_lite::StreamExt;
    use lapin::options::{BasicCancelOptions, BasicConsumeOptions, QueueDeclareOptions};
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("the reply reader connects");
    let channel = conn.create_channel().await.expect("a channel");
    let declare = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), declare, args)
        .await
        .expect("the reply queue is declared");
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "replies".into(),
            options,
            Default::default(),
        )
        .await
        .expect("the reply queue is consumed");
    if let Some(ready) = ready {
        let _ = ready.send(());
    }
    let mut cancelled = false;
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let body: serde_json::Value = serde_json::from_slice(&d.data).expect("a JSON result body");
                    let status = body["status"].as_str().unwrap_or_default();
                    if FINAL_STATES.contains(&status) {
                        let id = body["task_id"].as_str().unwrap_or_default().to_string();
                        counts.lock().unwrap().entry(id).or_default().push(body);
                    }
                }
                Some(Err(e)) => panic!("the reply reader's connection failed: {e}"),
                None if cancelled => return,
                None => panic!("the reply reader's consumer ended unasked"),
            },
            _ = stop.cancelled(), if !cancelled => {
                cancelled = true;
                let _ = channel.basic_cancel("replies".into(), BasicCancelOptions::default()).await;
            }
        }
    }
}

/// Task ids the worker logged as published on a connection that died before the confirm (the
/// one window where a result may be seen twice).
pub fn ambiguous_ids(log: &[String]) -> std::collections::HashSet<String> {
    let re = regex::Regex::new(r#"task_id="?([0-9a-f-]{36})"#).unwrap();
    log.iter()
        .filter(|l| l.contains("may receive this result twice"))
        .filter_map(|l| re.captures(l).map(|c| c[1].to_string()))
        .collect()
}

/// `GET path` on 127.0.0.1:`port` (Flower's API): the status and the body, or `None` while
/// nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `GET path` until its JSON satisfies `pred` (30 s), paced by the request itself.
pub fn wait_json(port: u16, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Some((200, body)) = http_get(port, path) {
            if let Ok(doc) = serde_json::from_str::<Value>(&body) {
                if pred(&doc) {
                    return doc;
                }
                last = Some(doc);
            }
        }
        // Flower answers at once; between polls, wait on the next thing it could learn.
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("Flower never showed {what} at {path}; last: {last:?}");
}
