//! The Redis broker's delivery promises under faults, with real processes: `worker serve
//! --broker redis://` (one, two, or one beside a real Celery 5.7 worker) on a `redis-server` of
//! the test's own, tasks sent and their results read by the real Celery client (results in the
//! Redis backend, db 1 of the same server), and every run of a task noted by the task itself
//! (`f.note_sleep` appends one line per run, with its task id), so each id is counted:
//!
//! - a worker SIGKILLed mid-task leaves its message in `unacked`; another worker restores it
//!   once its lease is `visibility_timeout` old, not sooner, and runs it;
//! - a task three times longer than `visibility_timeout` runs once (its lease is renewed);
//! - a Redis restart mid-batch loses no task and runs none twice;
//! - a graceful stop puts held eta tasks and tasks not started back in their queue, and a
//!   worker stopping beside another never touches a message again once it gave it back;
//! - a Celery worker and `worker` share a queue, and each restores what the other left;
//! - chaos: 2,000 tasks while workers are SIGKILLed and Redis restarts at random moments.
//!
//! Needs `redis-server`, `redis-cli` and the Celery venv (no RabbitMQ). Each test has a fixed
//! time budget and fails saying what it waited for.

mod common;

use common::broker::{last_json, redis_python, RedisServer, FINAL_STATES};
use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The task queue every test uses (each test has its own Redis).
const QUEUE: &str = "faults";

/// The Celery app of these tests, for the client and the Celery worker alike: the worker's
/// tasks carry the faulty plugin's names and note each run as `f.note_sleep` does, marked
/// `"by": "celery"`. Acks late and prefetches 4, so a killed Celery worker leaves messages in
/// `unacked`; restores every second (kombu's default looks every 10 s, scanning every 10th).
const APP_PY: &str = r#"
import json, os, time
from celery import Celery

app = Celery("fapp", broker=os.environ["BROKER_URL"], backend=os.environ["RESULT_BACKEND"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("VISIBILITY_TIMEOUT", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    task_acks_late=True,
    worker_prefetch_multiplier=4,
)


@app.task(name="f.note_sleep", bind=True)
def note_sleep(self, seconds, path):
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "task_id": self.request.id,
                            "args": [seconds, path], "by": "celery"}) + "\n")
    time.sleep(seconds)
    return "slept"


@app.task(name="f.ok")
def ok(*args):
    return list(args)
"#;

/// The client: `send NAME ARGS N [COUNTDOWN]` prints the ids; `send_wait NAME ARGS` the id,
/// then the outcome; `get IDS_FILE` every id's outcome (`AsyncResult.get`); `listen` every
/// state the Redis backend publishes, one line each.
const CLIENT_PY: &str = r#"
import json, os, sys, time
from fapp import app

QUEUE = os.environ["QUEUE"]
TIMEOUT = float(os.environ.get("GET_TIMEOUT", "60"))


def outcome(r):
    try:
        return {"ok": r.get(timeout=TIMEOUT)}
    except Exception as exc:
        return {"exc_type": type(exc).__name__, "message": str(exc)}


command, rest = sys.argv[1], sys.argv[2:]
if command == "send":
    countdown = float(rest[3]) if len(rest) > 3 else None
    ids = [app.send_task(rest[0], args=json.loads(rest[1]), queue=QUEUE, countdown=countdown).id
           for _ in range(int(rest[2]))]
    print(json.dumps({"ids": ids, "at": time.time()}), flush=True)
elif command == "send_wait":
    r = app.send_task(rest[0], args=json.loads(rest[1]), queue=QUEUE)
    print(json.dumps({"id": r.id}), flush=True)
    out = outcome(r)
    out["at"] = time.time()
    print(json.dumps(out), flush=True)
elif command == "get":
    ids = json.load(open(rest[0]))
    print(json.dumps({i: outcome(app.AsyncResult(i)) for i in ids}), flush=True)
elif command == "listen":
    import redis
    sub = redis.Redis.from_url(app.conf.result_backend).pubsub()
    sub.psubscribe("celery-task-meta-*")
    for m in sub.listen():
        if m["type"] == "psubscribe":
            print(json.dumps({"listening": True}), flush=True)
        elif m["type"] == "pmessage":
            meta = json.loads(m["data"])
            print(json.dumps({"id": meta["task_id"], "status": meta["status"]}), flush=True)
else:
    sys.exit("unknown command %s" % command)
"#;

/// Seconds since the epoch (the clock the worker's leases and Celery's use).
fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `pred` (a Redis listing, a notes file) until it holds, failing at `deadline`.
fn wait_until(what: &str, deadline: Instant, mut pred: impl FnMut() -> bool) {
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child (a Python client, a Celery worker) with its stdout and stderr lines as they come,
/// in a process group of its own so a kill takes its children too. Killed when dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("the Python client or Celery worker starts");
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Takes the lines that came so far, without waiting.
    fn pump(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The first line (seen or coming before `deadline`) for which `pred` holds.
    fn wait(&mut self, what: &str, deadline: Instant, pred: impl Fn(&str) -> bool) -> String {
        self.pump();
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
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

    /// The first JSON line with `key`.
    fn json_with(&mut self, key: &str, deadline: Instant) -> Value {
        let line = self.wait(&format!("with {key:?}"), deadline, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v.get(key).is_some())
        });
        serde_json::from_str(&line).unwrap()
    }

    /// SIGKILL to its whole process group (a Celery worker's pool processes too).
    fn kill(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's world: its Redis (broker on db 0, results on db 1), a temp dir with the faulty
/// plugin, the Celery app and client, and the notes file every run of a task appends to.
struct Bench {
    redis: RedisServer,
    root: tempfile::TempDir,
    plugins: PathBuf,
    python: PathBuf,
    notes: PathBuf,
}

impl Bench {
    /// `plugin`: top-level keys of the faulty plugin's manifest; `tables`: tables after it.
    fn new(test: &str, plugin: &str, tables: &str) -> Bench {
        let python = redis_python(test);
        let redis = RedisServer::start();
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        faulty_plugin(&plugins, "faulty", &[], plugin, tables);
        std::fs::write(root.path().join("fapp.py"), APP_PY).unwrap();
        std::fs::write(root.path().join("fclient.py"), CLIENT_PY).unwrap();
        let notes = root.path().join("notes.jsonl");
        Bench {
            redis,
            root,
            plugins,
            python,
            notes,
        }
    }

    fn backend(&self) -> String {
        format!("redis://127.0.0.1:{}/1", self.redis.port)
    }

    /// A Python command in the test's dir, with the Celery app's environment.
    fn python_env(&self, cmd: &mut Command) {
        cmd.current_dir(self.root.path())
            .env("PYTHONPATH", self.root.path())
            .env("BROKER_URL", self.redis.url())
            .env("RESULT_BACKEND", self.backend())
            .env("QUEUE", QUEUE)
            .stdin(Stdio::null());
    }

    fn client(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(self.root.path().join("fclient.py")).args(args);
        self.python_env(&mut cmd);
        cmd
    }

    /// Sends `n` tasks (after `countdown` seconds, if any); their ids.
    fn send(&self, task: &str, args: &Value, n: usize, countdown: Option<f64>) -> Vec<String> {
        let mut cmd = self.client(&["send", task, &args.to_string(), &n.to_string()]);
        if let Some(c) = countdown {
            cmd.arg(c.to_string());
        }
        let sent = last_json(&mut cmd);
        serde_json::from_value(sent["ids"].clone()).unwrap_or_else(|_| panic!("{sent}"))
    }

    /// Every id's outcome as the client's `AsyncResult(id).get()` returns it.
    fn get(&self, ids: &[String], timeout: u32) -> HashMap<String, Value> {
        let file = self
            .root
            .path()
            .join(format!("ids-{:08x}.json", fastrand::u32(..)));
        std::fs::write(&file, serde_json::to_vec(ids).unwrap()).unwrap();
        let mut cmd = self.client(&["get", file.to_str().unwrap()]);
        cmd.env("GET_TIMEOUT", timeout.to_string());
        serde_json::from_value(last_json(&mut cmd)).unwrap()
    }

    /// A real Celery worker on the queue, prefork with one process: it prefetches 4.
    fn celery_worker(&self, node: &str, visibility_timeout: f64) -> Proc {
        let mut celery = self.celery_starting(node, visibility_timeout);
        celery_ready(&mut celery, node);
        celery
    }

    /// The same, not waiting for it to be ready.
    fn celery_starting(&self, node: &str, visibility_timeout: f64) -> Proc {
        let mut cmd = Command::new(self.python.parent().unwrap().join("celery"));
        cmd.args([
            "-A", "fapp", "worker", "-P", "prefork", "-c", "1", "-Q", QUEUE,
        ])
        .args(["-n", node, "-l", "info"])
        .args([
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ])
        .env("VISIBILITY_TIMEOUT", visibility_timeout.to_string());
        self.python_env(&mut cmd);
        Proc::spawn(cmd)
    }

    fn args(&self, name: &str) -> Vec<String> {
        let config = self.root.path().join(format!("{name}.toml"));
        [
            "--config",
            config.to_str().unwrap(),
            "--broker",
            &self.redis.url(),
            "--result-backend",
            &self.backend(),
            "-Q",
            QUEUE,
            "-n",
            &format!("{name}@faults"),
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// `worker serve` named `name` with `settings` as its worker.toml, once it consumes.
    fn worker(&self, name: &str, settings: &str) -> Daemon {
        self.worker_of(&self.plugins, name, settings)
    }

    /// The same with the plugins of another directory.
    fn worker_of(&self, plugins: &Path, name: &str, settings: &str) -> Daemon {
        std::fs::write(self.root.path().join(format!("{name}.toml")), settings).unwrap();
        let args = self.args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let socket = self.root.path().join(format!("{name}.sock"));
        let mut d = Daemon::start_with(plugins, &socket, &args);
        d.wait_log("consuming from Redis");
        d
    }

    /// Worker `name` started again (after a SIGKILL), with what it has installed.
    fn restart(&self, name: &str) -> Daemon {
        let args = self.args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let socket = self.root.path().join(format!("{name}.sock"));
        let mut d = Daemon::serve(
            &self.plugins,
            &socket.with_extension("state"),
            &socket,
            &args,
        );
        d.wait_log("consuming from Redis");
        d
    }

    fn cli(&self, args: &[&str]) -> String {
        self.redis.cli(args)
    }

    fn count(&self, args: &[&str]) -> i64 {
        let said = self.cli(args);
        said.parse()
            .unwrap_or_else(|_| panic!("redis-cli {args:?} said {said:?}"))
    }

    /// The tags in `unacked` (taken, not settled).
    fn unacked(&self) -> Vec<String> {
        let said = self.cli(&["hkeys", "unacked"]);
        said.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The task id of unacked message `tag` (kombu's entry: `[message, exchange, key]`).
    fn unacked_id(&self, tag: &str) -> String {
        let entry: Value = serde_json::from_str(&self.cli(&["hget", "unacked", tag])).unwrap();
        entry[0]["headers"]["id"].as_str().unwrap().to_string()
    }

    /// When unacked message `tag` was taken or last renewed (its `unacked_index` score).
    fn lease(&self, tag: &str) -> f64 {
        let said = self.cli(&["zscore", "unacked_index", tag]);
        said.parse()
            .unwrap_or_else(|_| panic!("no lease for {tag}: {said:?}"))
    }

    /// Nothing taken and left unsettled, nothing waiting.
    fn assert_settled(&self) {
        assert_eq!(self.cli(&["hlen", "unacked"]), "0", "unacked");
        assert_eq!(self.cli(&["zcard", "unacked_index"]), "0", "unacked_index");
        assert_eq!(self.cli(&["llen", QUEUE]), "0", "the queue");
    }

    /// Every run noted so far (complete lines only: one may be being written).
    fn runs(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.notes).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a note {l:?}: {e}")))
            .collect()
    }

    /// The runs of each task id, in the order they were noted.
    fn runs_by_id(&self) -> HashMap<String, Vec<Value>> {
        let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
        for run in self.runs() {
            let id = run["task_id"].as_str().unwrap().to_string();
            by_id.entry(id).or_default().push(run);
        }
        by_id
    }

    /// How many runs were noted (cheap: counts lines).
    fn runs_noted(&self) -> usize {
        let bytes = std::fs::read(&self.notes).unwrap_or_default();
        bytes.iter().filter(|b| **b == b'\n').count()
    }
}

/// The runs of `id`, waiting until there are at least `n`.
fn wait_runs(bench: &Bench, id: &str, n: usize, deadline: Instant) -> Vec<Value> {
    let mut runs = Vec::new();
    wait_until(&format!("run {n} of task {id}"), deadline, || {
        runs = bench.runs_by_id().remove(id).unwrap_or_default();
        runs.len() >= n
    });
    runs
}

/// Waits until `d` logged (from line `from` on) that the results of `n` tasks wait for Redis;
/// how many.
fn wait_results_waiting(d: &mut Daemon, from: usize, n: usize, deadline: Instant) -> usize {
    let re = regex::Regex::new(r#"cannot store the result in Redis.*task_id="?([0-9a-f-]{36})"#)
        .unwrap();
    loop {
        let log = d.drain_log();
        let ids: HashSet<&str> = log
            .iter()
            .skip(from)
            .filter_map(|l| re.captures(l).map(|c| c.get(1).unwrap().as_str()))
            .collect();
        if ids.len() >= n {
            return ids.len();
        }
        assert!(
            Instant::now() < deadline,
            "the results of {n} tasks never waited for Redis; seen:\n{}",
            log[from.min(log.len())..].join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a Celery worker's "ready" line.
fn celery_ready(celery: &mut Proc, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    celery.wait("saying the Celery worker is ready", deadline, |l| {
        l.contains(&format!("{node} ready."))
    });
}

/// The unacked messages (of a worker just killed) and their leases.
fn leases_of(bench: &Bench) -> Vec<(String, f64)> {
    bench
        .unacked()
        .into_iter()
        .map(|t| {
            let lease = bench.lease(&t);
            (t, lease)
        })
        .collect()
}

/// Asserts that nobody takes any of `leases` back before it is `visibility` seconds old (a
/// restore and a new take would give it a new lease); returns once the newest is. How many
/// looks that took.
fn assert_left_alone(bench: &Bench, leases: &[(String, f64)], visibility: f64) -> usize {
    let newest = leases.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    let mut looks = 0;
    loop {
        let now = now_epoch();
        if now >= newest + visibility - 0.1 {
            return looks;
        }
        for (tag, lease) in leases {
            if now < lease + visibility - 0.1 {
                let seen = bench.cli(&["zscore", "unacked_index", tag]).parse::<f64>();
                assert_eq!(
                    seen.ok(),
                    Some(*lease),
                    "{tag} taken back before its lease was {visibility} s old"
                );
            }
        }
        looks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `restored=N` of a restore's log line.
fn restored_count(line: &str) -> &str {
    line.split_whitespace()
        .find(|w| w.starts_with("restored="))
        .unwrap_or("restored=?")
}

fn plugin_pid(run: &Value) -> u64 {
    run["pid"].as_u64().unwrap()
}

#[test]
fn redis_a_task_of_a_worker_killed_mid_run_comes_back_after_the_visibility_timeout() {
    const BUDGET: Duration = Duration::from_secs(60);
    const VISIBILITY: f64 = 3.0;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let bench = Bench::new("redis_faults_kill", "", "");
    let settings = format!("visibility_timeout = {VISIBILITY}\n");
    let mut a = bench.worker("a", &settings);

    let args = json!([2, bench.notes]).to_string();
    let mut client = Proc::spawn(bench.client(&["send_wait", "f.note_sleep", &args]));
    let id = client.json_with("id", deadline)["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A runs it (its note is written as it starts).
    let first = wait_runs(&bench, &id, 1, deadline);
    let pid_a = plugin_pid(&first[0]);
    let tags = bench.unacked();
    assert_eq!(tags.len(), 1, "one message taken: {tags:?}");
    let tag = &tags[0];
    assert_eq!(bench.unacked_id(tag), id);

    a.signal(Signal::SIGKILL);
    a.wait_exit();
    assert!(
        wait_gone_blocking(pid_a as u32, Duration::from_secs(10)),
        "the plugin dies with its worker"
    );
    let killed_at = now_epoch();
    // The message stays where the dead worker left it: unacked, its lease as last renewed.
    let lease = bench.lease(tag);
    assert_eq!(bench.cli(&["llen", QUEUE]), "0");

    let mut b = bench.worker("b", &settings);
    // Until the lease is `visibility_timeout` old, nobody takes it back (a restore and a new
    // take would move it to the list, then record it again with a new lease).
    let mut looks = 0;
    while now_epoch() < lease + VISIBILITY - 0.1 {
        assert_eq!(
            bench
                .cli(&["zscore", "unacked_index", tag])
                .parse::<f64>()
                .ok(),
            Some(lease),
            "restored before its lease was {VISIBILITY} s old"
        );
        assert_eq!(bench.cli(&["llen", QUEUE]), "0");
        assert_eq!(bench.runs().len(), 1, "run again before its lease ran out");
        looks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let runs = wait_runs(&bench, &id, 2, deadline);
    let back_after = now_epoch() - lease;
    assert_ne!(plugin_pid(&runs[1]), pid_a, "run again by B's plugin");
    let out = client.json_with("at", deadline);
    assert_eq!(out["ok"], "slept", "the client's get: {out}");
    wait_until("the message acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });
    bench.assert_settled();
    assert_eq!(bench.runs().len(), 2, "{:?}", bench.runs());
    let restored = b.wait_log("restored messages another worker took");
    assert!(restored.contains("restored=1"), "{restored}");
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "killed mid-task: the lease was {:.2} s old at the SIGKILL; still unacked at {looks} \
         looks before it was {VISIBILITY} s old; run again by B {back_after:.2} s after its \
         last renewal; the client got {}; total {total:.1?}",
        killed_at - lease,
        out["ok"]
    );
}

#[test]
fn redis_a_task_three_times_longer_than_the_visibility_timeout_runs_once() {
    const BUDGET: Duration = Duration::from_secs(60);
    const VISIBILITY: f64 = 2.0;
    const TASK_SECONDS: f64 = 6.0;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let bench = Bench::new("redis_faults_long", "", "");
    let mut listener = Proc::spawn(bench.client(&["listen"]));
    listener.json_with("listening", deadline);
    let settings = format!("visibility_timeout = {VISIBILITY}\n");
    let mut a = bench.worker("a", &settings);
    let mut b = bench.worker("b", &settings);

    let args = json!([TASK_SECONDS, bench.notes]).to_string();
    let mut client = Proc::spawn(bench.client(&["send_wait", "f.note_sleep", &args]));
    let id = client.json_with("id", deadline)["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_runs(&bench, &id, 1, deadline);
    let tags = bench.unacked();
    assert_eq!(tags.len(), 1, "{tags:?}");
    let tag = tags[0].clone();
    // While it runs: its lease moves on, it never goes back to the list, it runs once.
    let mut leases = vec![bench.lease(&tag)];
    let out = loop {
        client.pump();
        if let Some(line) = client.seen.iter().find(|l| l.contains("\"at\"")) {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no answer: {:?}", client.seen);
        if let Ok(lease) = bench.cli(&["zscore", "unacked_index", &tag]).parse::<f64>() {
            if lease != *leases.last().unwrap() {
                leases.push(lease);
            }
        }
        assert_eq!(bench.cli(&["llen", QUEUE]), "0", "restored while it ran");
        assert_eq!(bench.runs().len(), 1, "run twice: {:?}", bench.runs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(out["ok"], "slept", "{out}");
    wait_until("the message acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });
    bench.assert_settled();
    // A later task's state, published after this one's ack, comes after any state of it.
    let mut marker = Proc::spawn(bench.client(&["send_wait", "f.ok", "[1]"]));
    let marker_id = marker.json_with("id", deadline)["id"]
        .as_str()
        .unwrap()
        .to_string();
    listener.wait("the marker's SUCCESS", deadline, |l| {
        l.contains(&marker_id) && l.contains("SUCCESS")
    });
    let states: Vec<&String> = listener
        .seen
        .iter()
        .filter(|l| l.contains(&id) && FINAL_STATES.iter().any(|s| l.contains(s)))
        .collect();
    assert_eq!(states.len(), 1, "one final state: {states:?}");
    assert!(states[0].contains("SUCCESS"), "{states:?}");
    let runs = bench.runs_by_id();
    assert_eq!(runs[&id].len(), 1, "one run: {runs:?}");
    let moved = leases.last().unwrap() - leases[0];
    assert!(
        leases.len() >= 4 && moved > TASK_SECONDS - 2.0 * VISIBILITY,
        "the lease was renewed while the task ran: {leases:?}"
    );
    for (name, w) in [("a", &mut a), ("b", &mut b)] {
        let restored: Vec<String> = w
            .drain_log()
            .into_iter()
            .filter(|l| l.contains("restored messages"))
            .collect();
        assert!(restored.is_empty(), "{name} restored: {restored:?}");
    }
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "long task: f.note_sleep [{TASK_SECONDS}] with visibility_timeout {VISIBILITY} s and \
         two workers: its lease seen at {} values, moved {moved:.2} s; one run, one final \
         state ({}), nothing unacked after; total {total:.1?}",
        leases.len(),
        out["ok"]
    );
}

#[test]
fn redis_a_redis_restart_mid_batch_loses_no_task_and_runs_each_once() {
    const BUDGET: Duration = Duration::from_secs(90);
    const TASKS: usize = 300;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let mut bench = Bench::new("redis_faults_restart", "instances = 2\nconcurrency = 4", "");
    // A take whose reply the restart cuts off is left in `unacked` by a completed script; the
    // worker restores it after this (it is not among the messages it holds).
    let mut w = bench.worker("a", "visibility_timeout = 5\n");
    let args = json!([0.05, bench.notes]);
    let ids = bench.send("f.note_sleep", &args, TASKS, None);
    assert_eq!(ids.len(), TASKS);
    wait_until("a fifth of the tasks run", deadline, || {
        bench.runs_noted() >= TASKS / 5
    });
    let mark = w.drain_log().len();
    let at_stop = bench.runs_noted();
    let stopping = Instant::now();
    bench.redis.stop();
    // Down until the worker has a result it cannot store and the 8 tasks queued in its
    // plugin at the stop have run too (their results wait as well).
    let waiting = wait_results_waiting(&mut w, mark, 1, stopping + Duration::from_secs(20));
    wait_until("tasks run while Redis is away", deadline, || {
        bench.runs_noted() >= at_stop + 8
    });
    let ran_away = bench.runs_noted() - at_stop;
    bench.redis.resume();
    let down_for = stopping.elapsed();

    let outcomes = bench.get(&ids, 60);
    let failed: Vec<(&String, &Value)> = outcomes
        .iter()
        .filter(|(_, o)| o["ok"] != "slept")
        .collect();
    assert!(failed.is_empty(), "not answered: {failed:?}");
    assert_eq!(outcomes.len(), TASKS);
    let runs = bench.runs_by_id();
    let counts: Vec<(&String, usize)> = ids
        .iter()
        .map(|id| (id, runs.get(id).map_or(0, Vec::len)))
        .collect();
    let twice: Vec<&(&String, usize)> = counts.iter().filter(|(_, n)| *n > 1).collect();
    let never: Vec<&(&String, usize)> = counts.iter().filter(|(_, n)| *n == 0).collect();
    assert!(never.is_empty(), "answered but never run: {never:?}");
    assert!(twice.is_empty(), "run twice: {twice:?}");
    assert!(at_stop < TASKS, "Redis stopped with tasks still to run");

    // Still alive, still serving.
    assert!(w.child.try_wait().unwrap().is_none(), "the worker exited");
    let mut after = Proc::spawn(bench.client(&["send_wait", "f.ok", "[\"after\"]"]));
    let out = after.json_with("at", deadline);
    assert_eq!(out["ok"], json!(["after"]), "{out}");
    wait_until("every message acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });
    bench.assert_settled();
    let log = w.drain_log();
    let restored = log
        .iter()
        .filter(|l| l.contains("restored messages"))
        .count();
    let retried = log[mark..]
        .iter()
        .filter(|l| l.contains("in Redis ("))
        .count();
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "Redis restart: {TASKS} tasks, Redis stopped with {at_stop} run and down \
         {down_for:.2?}, {ran_away} tasks run meanwhile ({waiting} result(s) seen failing to \
         store first); {retried} failed writes logged, {restored} restores of cut-off takes; \
         every task answered once and run once; a new task served after; total {total:.1?}"
    );
}

#[test]
fn redis_a_graceful_stop_puts_held_and_unstarted_messages_back_in_the_queue() {
    const BUDGET: Duration = Duration::from_secs(100);
    const ETA_SECONDS: f64 = 25.0;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let bench = Bench::new(
        "redis_faults_graceful",
        "",
        "[timeouts]\nshutdown_grace = 1\n",
    );
    let settings = "visibility_timeout = 30\nprefetch_count = 8\n";
    let mut a = bench.worker("a", settings);
    // One slot, busy with a task that outlasts the stop. (Tasks queued in the plugin's pool
    // are in flight for the daemon: a graceful stop runs them if the slot frees within
    // `drain_timeout` (10 s here) and the source's 10 s wait for its handlers; they go back
    // when it does not. The eta task goes back at once.)
    let busy = bench.send("f.note_sleep", &json!([3600, bench.notes]), 1, None)[0].clone();
    let busy_run = wait_runs(&bench, &busy, 1, deadline);
    let short = json!([0.01, bench.notes]);
    // No later than the eta the client computes as it sends.
    let due = now_epoch() + ETA_SECONDS;
    let eta = bench.send("f.note_sleep", &short, 1, Some(ETA_SECONDS))[0].clone();
    let queued = bench.send("f.note_sleep", &short, 3, None);
    wait_until("A holding all five", deadline, || {
        bench.count(&["hlen", "unacked"]) == 5 && bench.count(&["llen", QUEUE]) == 0
    });

    a.signal(Signal::SIGTERM);
    let term = Instant::now();
    // The eta task goes back at once, before the drain ends.
    wait_until("the eta task back in the queue", deadline, || {
        bench.cli(&["lrange", QUEUE, "0", "-1"]).contains(&eta)
    });
    let eta_back = term.elapsed();
    let status = a.wait_exit();
    let stopped = term.elapsed();
    assert!(status.success(), "A's exit: {status}");
    let listed = bench.cli(&["lrange", QUEUE, "0", "-1"]);
    assert_eq!(bench.count(&["llen", QUEUE]), 5, "{listed}");
    for id in queued.iter().chain([&busy, &eta]) {
        assert!(listed.contains(id.as_str()), "{id} back in the queue");
    }
    assert_eq!(bench.cli(&["hlen", "unacked"]), "0");
    assert_eq!(bench.cli(&["zcard", "unacked_index"]), "0");
    assert_eq!(bench.runs().len(), 1, "A started only the busy task");
    let log = a.drain_log();
    let put_back = log
        .iter()
        .find(|l| l.contains("put the messages still held back"))
        .cloned()
        .unwrap_or_default();
    // At the end of the stop: the busy task and the 3 queued (the eta task went back first).
    assert_eq!(restored_count(&put_back), "restored=4", "{put_back}");
    assert!(
        bench.cli(&["-n", "1", "keys", "*"]).is_empty(),
        "no final state stored for a task given back"
    );

    // B has a second slot, as the busy task takes one there too.
    let two_slots = bench.root.path().join("plugins-b");
    faulty_plugin(&two_slots, "faulty", &[], "concurrency = 2", "");
    let _b = bench.worker_of(&two_slots, "b", settings);
    let waited: Vec<String> = queued.iter().chain([&eta]).cloned().collect();
    let outcomes = bench.get(&waited, 60);
    for id in &waited {
        assert_eq!(outcomes[id]["ok"], "slept", "{id}: {outcomes:?}");
    }
    assert!(now_epoch() >= due, "the eta task answered after its eta");
    let again = wait_runs(&bench, &busy, 2, deadline);
    assert_ne!(plugin_pid(&again[1]), plugin_pid(&busy_run[0]));
    let runs = bench.runs_by_id();
    for id in &waited {
        assert_eq!(runs[id].len(), 1, "{id}: {runs:?}");
    }
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "graceful stop: the eta task back {eta_back:.2?} after SIGTERM, A exited after \
         {stopped:.1?} with the busy task, the eta task and 3 queued tasks back in the list and \
         nothing unacked (the stop put back {}); B answered the 4 and started the busy one \
         again; total {total:.1?}",
        restored_count(&put_back)
    );
}

/// Who ran a noted run: the Celery worker marks its notes.
fn by_celery(run: &Value) -> bool {
    run["by"] == "celery"
}

#[test]
fn redis_side_by_side_with_a_celery_worker_each_restores_what_the_other_left() {
    const BUDGET: Duration = Duration::from_secs(150);
    const VISIBILITY: f64 = 3.0;
    const TASKS: usize = 200;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let bench = Bench::new("redis_faults_interop", "concurrency = 2", "");
    let settings = format!("visibility_timeout = {VISIBILITY}\n");

    // 1. Both on one queue: every task answered once, both ran some.
    let mut ours = bench.worker("ours", &settings);
    let mut celery = bench.celery_worker("c1@faults", VISIBILITY);
    let ids = bench.send("f.note_sleep", &json!([0.02, bench.notes]), TASKS, None);
    let outcomes = bench.get(&ids, 60);
    assert!(
        ids.iter().all(|id| outcomes[id]["ok"] == "slept"),
        "{outcomes:?}"
    );
    let runs = bench.runs_by_id();
    let mut celery_ran = 0;
    for id in &ids {
        let r = runs.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(r.len(), 1, "{id} run once: {r:?}");
        celery_ran += usize::from(by_celery(&r[0]));
    }
    assert!(
        celery_ran > 0 && celery_ran < TASKS,
        "both ran some: Celery {celery_ran} of {TASKS}"
    );
    wait_until("everything acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });

    // 2. Celery alone takes tasks and is killed holding them: ours restores and runs them.
    ours.signal(Signal::SIGTERM);
    ours.wait_exit();
    let slow = json!([0.5, bench.notes]);
    let ids2 = bench.send("f.note_sleep", &slow, 8, None);
    wait_until("Celery holding 4 and running one", deadline, || {
        bench.unacked().len() >= 4
            && bench
                .runs()
                .iter()
                .any(|r| by_celery(r) && ids2.contains(&r["task_id"].as_str().unwrap().into()))
    });
    celery.kill();
    let left = leases_of(&bench);
    let left_ids: HashSet<String> = left.iter().map(|(t, _)| bench.unacked_id(t)).collect();
    let newest = left.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    let runs_before = bench.runs_by_id();
    let mut ours = bench.restart("ours");
    let looks2 = assert_left_alone(&bench, &left, VISIBILITY);
    let outcomes = bench.get(&ids2, 60);
    assert!(
        ids2.iter().all(|id| outcomes[id]["ok"] == "slept"),
        "{outcomes:?}"
    );
    let restored_after = now_epoch() - newest;
    let runs = bench.runs_by_id();
    for id in &left_ids {
        let last = runs[id].last().unwrap();
        assert!(!by_celery(last), "{id} run last by ours: {:?}", runs[id]);
        let before = runs_before.get(id).map_or(0, Vec::len);
        assert_eq!(runs[id].len(), before + 1, "{id}: {:?}", runs[id]);
    }
    let restored = ours.wait_log("restored messages another worker took");
    wait_until("everything acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });

    // 3. Ours is killed holding tasks: a Celery worker restores and runs them.
    let ids3 = bench.send("f.note_sleep", &slow, 8, None);
    wait_until("ours holding 4 and running some", deadline, || {
        bench.unacked().len() >= 4
            && bench
                .runs()
                .iter()
                .any(|r| !by_celery(r) && ids3.contains(&r["task_id"].as_str().unwrap().into()))
    });
    ours.signal(Signal::SIGKILL);
    ours.wait_exit();
    let held = leases_of(&bench);
    let held_ids: HashSet<String> = held.iter().map(|(t, _)| bench.unacked_id(t)).collect();
    let lease = held.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    let mut celery = bench.celery_starting("c2@faults", VISIBILITY);
    let looks3 = assert_left_alone(&bench, &held, VISIBILITY);
    celery_ready(&mut celery, "c2@faults");
    let outcomes = bench.get(&ids3, 60);
    assert!(
        ids3.iter().all(|id| outcomes[id]["ok"] == "slept"),
        "{outcomes:?}"
    );
    let runs = bench.runs_by_id();
    for id in &held_ids {
        assert!(
            by_celery(runs[id].last().unwrap()),
            "{id} run last by Celery: {:?}",
            runs[id]
        );
    }
    wait_until("everything acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });
    bench.assert_settled();
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "side by side: {TASKS} tasks, Celery ran {celery_ran}, ours {}; Celery killed holding \
         {}, left alone for {looks2} looks until their leases were {VISIBILITY} s old, then \
         restored by ours ({}) and all 8 answered {restored_after:.1} s after the newest \
         lease; ours killed holding {}, left alone for {looks3} looks, then restored and run \
         by Celery, all 8 answered {:.1} s after the newest lease; total {total:.1?}",
        TASKS - celery_ran,
        left_ids.len(),
        restored_count(&restored),
        held_ids.len(),
        now_epoch() - lease
    );
}

/// A fault of the chaos test.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL worker N and start it again.
    Kill(usize),
    /// Stop Redis (saving) and start it again.
    Restart,
}

#[test]
fn redis_chaos_killed_workers_and_redis_restarts_lose_no_task() {
    const BUDGET: Duration = Duration::from_secs(90);
    const TASKS: usize = 2000;
    let began = Instant::now();
    let deadline = began + BUDGET;
    let mut bench = Bench::new("redis_faults_chaos", "instances = 2\nconcurrency = 4", "");
    let settings = "visibility_timeout = 3\n";
    let names = ["a", "b"];
    let mut workers = [bench.worker("a", settings), bench.worker("b", settings)];
    let ids = bench.send("f.note_sleep", &json!([0.1, bench.notes]), TASKS, None);
    assert_eq!(ids.len(), TASKS);

    let mut plan = vec![
        Fault::Kill(0),
        Fault::Kill(1),
        Fault::Restart,
        Fault::Kill(fastrand::usize(..2)),
        Fault::Restart,
    ];
    fastrand::shuffle(&mut plan);
    let first = (bench.runs_noted() + 50).min(TASKS / 2);
    let mut at: Vec<usize> = plan
        .iter()
        .map(|_| fastrand::usize(first..TASKS * 3 / 4))
        .collect();
    at.sort();
    // The plugin processes of killed workers: a task they ran may run again (killed after
    // running, before the ack), and only those.
    let mut killed_pids: HashSet<u64> = HashSet::new();
    let mut applied = Vec::new();
    let mut left_at_faults = Vec::new();
    let mut history = Vec::new();
    let mut logs = Vec::new();
    for (fault, when) in plan.iter().zip(&at) {
        wait_until(&format!("{when} runs before {fault:?}"), deadline, || {
            bench.runs_noted() >= *when
        });
        std::thread::sleep(Duration::from_millis(fastrand::u64(..50)));
        let noted = bench.runs_noted();
        match *fault {
            Fault::Kill(n) => {
                let pids = live_pids(&workers[n].list_json());
                workers[n].signal(Signal::SIGKILL);
                workers[n].wait_exit();
                history.push(format!(
                    "{:.3} killed {} (plugins {pids:?})",
                    now_epoch(),
                    names[n]
                ));
                logs.extend(
                    workers[n]
                        .drain_log()
                        .into_iter()
                        .map(|l| format!("{}: {l}", names[n])),
                );
                killed_pids.extend(pids.iter().map(|p| u64::from(*p)));
                applied.push(format!("{} killed at {noted} runs", names[n]));
                workers[n] = bench.restart(names[n]);
                history.push(format!("{:.3} restarted {}", now_epoch(), names[n]));
            }
            Fault::Restart => {
                // Away for less than the three renewals a lease survives (2.25 s).
                let away = Duration::from_millis(fastrand::u64(300..1500));
                bench.redis.stop();
                history.push(format!("{:.3} Redis stopped for {away:?}", now_epoch()));
                applied.push(format!("Redis away {away:?} at {noted} runs"));
                std::thread::sleep(away);
                bench.redis.resume();
                history.push(format!("{:.3} Redis resumed", now_epoch()));
            }
        }
        left_at_faults.push(noted);
    }

    // Every id gets its final state in the backend (db 1 holds only results).
    let stored = || bench.count(&["-n", "1", "dbsize"]) as usize;
    while stored() < TASKS {
        if Instant::now() > deadline {
            let keys = bench.cli(&["-n", "1", "keys", "*"]);
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !keys.contains(id.as_str()))
                .collect();
            panic!(
                "{} of {TASKS} final states stored; missing {missing:?}; faults {applied:?}; \
                 queue {}, unacked {}",
                stored(),
                bench.cli(&["llen", QUEUE]),
                bench.cli(&["hlen", "unacked"])
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let outcomes = bench.get(&ids, 20);
    let failed: Vec<(&String, &Value)> = outcomes
        .iter()
        .filter(|(_, o)| o["ok"] != "slept")
        .collect();
    assert!(failed.is_empty(), "the client's get: {failed:?}");
    assert_eq!(outcomes.len(), TASKS);
    wait_until("every message acked", deadline, || {
        bench.cli(&["hlen", "unacked"]) == "0"
    });
    bench.assert_settled();

    let runs = bench.runs_by_id();
    let mut twice = 0;
    for id in &ids {
        let r = runs.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(!r.is_empty(), "{id} answered, never run");
        if r.len() > 1 {
            twice += 1;
            // Only a run on a killed worker may be followed by another.
            let earlier = &r[..r.len() - 1];
            if !earlier
                .iter()
                .all(|run| killed_pids.contains(&plugin_pid(run)))
            {
                for (n, w) in workers.iter_mut().enumerate() {
                    logs.extend(
                        w.drain_log()
                            .into_iter()
                            .map(|l| format!("{}: {l}", names[n])),
                    );
                }
                let about: Vec<&String> = logs
                    .iter()
                    .filter(|l| {
                        l.contains(id.as_str()) || l.contains("restored") || l.contains("renew")
                    })
                    .collect();
                panic!(
                    "{id} ran again after a run on a live worker: {r:?}; killed plugin pids \
                     {killed_pids:?}; history {history:#?}; logs:\n{}",
                    about
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
    assert!(
        left_at_faults.iter().all(|noted| *noted < TASKS),
        "every fault came with tasks left: {applied:?}"
    );
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "chaos: {TASKS} tasks, two workers; faults: {}; every id answered and stored, \
         {twice} ran twice (each after a run on a killed worker); total {total:.1?}",
        applied.join(", ")
    );
}

#[test]
fn redis_a_worker_stopping_beside_another_gives_each_message_back_once() {
    const BUDGET: Duration = Duration::from_secs(90);
    let began = Instant::now();
    let deadline = began + BUDGET;
    let bench = Bench::new(
        "redis_faults_rolling",
        "",
        "[timeouts]\nshutdown_grace = 1\n",
    );
    let settings = "visibility_timeout = 30\nprefetch_count = 8\n";
    let mut a = bench.worker("a", settings);
    let busy = bench.send("f.note_sleep", &json!([3600, bench.notes]), 1, None)[0].clone();
    wait_runs(&bench, &busy, 1, deadline);
    let queued = bench.send("f.note_sleep", &json!([0.01, bench.notes]), 3, None);
    wait_until("A holding all four", deadline, || {
        bench.count(&["hlen", "unacked"]) == 4 && bench.count(&["llen", QUEUE]) == 0
    });

    // A rolling restart: B starts while A drains, and takes what A gives back at its end.
    a.signal(Signal::SIGTERM);
    let four_slots = bench.root.path().join("plugins-b");
    faulty_plugin(&four_slots, "faulty", &[], "concurrency = 4", "");
    let mut b = bench.worker_of(&four_slots, "b", settings);
    let status = a.wait_exit();
    assert!(status.success(), "A's exit: {status}");
    let outcomes = bench.get(&queued, 60);
    for id in &queued {
        assert_eq!(outcomes[id]["ok"], "slept", "{id}: {outcomes:?}");
    }
    let runs = wait_runs(&bench, &busy, 2, deadline);
    // A is gone: whatever it did to the messages it gave back is done. B holds the busy task
    // as it took it, and was never handed a copy of a task it runs.
    let copies: Vec<String> = b
        .drain_log()
        .into_iter()
        .filter(|l| l.contains("still running or being answered here"))
        .collect();
    assert!(
        copies.is_empty(),
        "a message B had taken was put back in the queue after A gave it back: {copies:?}"
    );
    assert_eq!(runs.len(), 2, "the busy task: A's run, then B's: {runs:?}");
    assert_eq!(bench.unacked().len(), 1, "B holds the busy task");
    assert_eq!(bench.cli(&["llen", QUEUE]), "0");
    let by_id = bench.runs_by_id();
    for id in &queued {
        assert_eq!(by_id[id].len(), 1, "{id}: {by_id:?}");
    }
    let total = began.elapsed();
    assert!(total < BUDGET, "took {total:.1?}");
    eprintln!(
        "rolling stop: A gave back the busy task and 3 queued ones at the end of its stop, B \
         took each once (3 answered once, the busy one run again once), no copy put back \
         after; total {total:.1?}"
    );
}
