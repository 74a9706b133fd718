//! Girder Worker's own client (the registry's `girder-worker` package, in a venv the test
//! makes) against this worker: its `girder_io` envelope (jsonpickle under application/json),
//! its headers, and the job contract — every update the worker sends is recorded by a small
//! HTTP server of the test's own standing in for Girder. The same tasks from plain Celery
//! clients (5.7 and 5.3.6) still work. Needs RabbitMQ, like `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One request the stand-in Girder received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    token: Option<String>,
    form: HashMap<String, String>,
}

#[derive(Default)]
struct Jobs {
    requests: Vec<Recorded>,
    /// Each job's status as the server keeps it; a job set CANCELING refuses every status
    /// but CANCELED and ERROR, as Girder does.
    status: HashMap<String, i64>,
}

/// A stand-in Girder: answers every job request with the job document (`status`), records it.
#[derive(Clone)]
struct JobServer {
    port: u16,
    jobs: Arc<(Mutex<Jobs>, Condvar)>,
}

impl JobServer {
    fn start() -> JobServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = JobServer {
            port: listener.local_addr().unwrap().port(),
            jobs: Arc::default(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || s.serve(conn));
            }
        });
        server
    }

    fn url(&self, job: &str) -> String {
        format!("http://127.0.0.1:{}/api/v1/job/{job}", self.port)
    }

    /// Requests on one connection, kept alive as HTTP/1.1 clients expect.
    fn serve(&self, conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut out = conn;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let form = parse_form(&String::from_utf8_lossy(&body));
            let (code, reply) = self.answer(Recorded {
                method,
                path,
                token: headers.get("girder-token").cloned(),
                form,
            });
            let text = reply.to_string();
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                text.len()
            );
            if out
                .write_all(head.as_bytes())
                .and_then(|_| out.write_all(text.as_bytes()))
                .is_err()
            {
                return;
            }
        }
    }

    fn answer(&self, r: Recorded) -> (&'static str, Value) {
        let (lock, changed) = &*self.jobs;
        let mut jobs = lock.lock().unwrap();
        let now = jobs.status.get(&r.path).copied().unwrap_or(1);
        let asked: Option<i64> = r.form.get("status").and_then(|s| s.parse().ok());
        let reply = match asked {
            Some(s) if now == 824 && s != 5 && s != 4 => (
                "400 Bad Request",
                json!({"message": format!("invalid transition from 824 to {s}"), "field": "status", "type": "validation"}),
            ),
            Some(s) => {
                jobs.status.insert(r.path.clone(), s);
                ("200 OK", json!({"_id": r.path, "status": s}))
            }
            None => ("200 OK", json!({"_id": r.path, "status": now})),
        };
        jobs.requests.push(r);
        changed.notify_all();
        reply
    }

    /// Girder's cancel: the job is set CANCELING.
    fn set_canceling(&self, job: &str) {
        let path = format!("/api/v1/job/{job}");
        self.jobs.0.lock().unwrap().status.insert(path, 824);
    }

    /// The requests for `job` once `done` holds for them (60 s at most).
    fn wait(&self, job: &str, what: &str, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let path = format!("/api/v1/job/{job}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let (lock, changed) = &*self.jobs;
        let mut jobs = lock.lock().unwrap();
        loop {
            let mine: Vec<Recorded> = jobs
                .requests
                .iter()
                .filter(|r| r.path == path)
                .cloned()
                .collect();
            if done(&mine) {
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "job {job}: no {what} in {mine:#?}");
            jobs = changed.wait_timeout(jobs, left).unwrap().0;
        }
    }
}

fn parse_form(body: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn statuses(requests: &[Recorded]) -> Vec<i64> {
    requests
        .iter()
        .filter_map(|r| r.form.get("status").and_then(|s| s.parse().ok()))
        .collect()
}

fn job_log(requests: &[Recorded]) -> String {
    requests
        .iter()
        .filter_map(|r| r.form.get("log"))
        .cloned()
        .collect()
}

fn ended(requests: &[Recorded]) -> bool {
    statuses(requests).iter().any(|s| [3, 4, 5].contains(s))
}

/// `examples/girder-tasks`, run by the Girder venv's Python (jsonpickle and Girder Worker's
/// transforms importable), the SDK on PYTHONPATH.
fn girder_tasks_plugin(root: &Path, python: &Path) {
    let dir = root.join("girder-tasks");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest =
        std::fs::read_to_string(repo().join("examples/girder-tasks/plugin.toml")).unwrap();
    let tasks =
        &manifest[manifest.find("[[tasks]]").unwrap()..manifest.find("[timeouts]").unwrap()];
    let text = format!(
        "name = \"girder-tasks\"\nversion = \"1.0.0\"\ncommand = [{:?}, \"-u\", {:?}]\ninstances = 2\nconcurrency = 1\n[env]\nPYTHONPATH = {:?}\n{tasks}",
        python.display().to_string(),
        repo().join("examples/girder-tasks/main.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string(),
    );
    write_manifest(&dir, &text);
}

/// Starts Girder Worker's client sending `name` to `queue` for the job at `job_url`.
fn girder_send(python: &Path, queue: &str, name: &str, job_url: &str) -> Child {
    Command::new(python)
        .arg(repo().join("tests/celery/girder_send.py"))
        .args([queue, name])
        .current_dir(repo().join("tests/celery"))
        .env("BROKER_URL", BROKER)
        .env("JOB_URL", job_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs")
}

/// The task id the client printed first.
fn task_id_of(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("client said {line:?}"));
    v["task_id"].as_str().unwrap().to_string()
}

/// The client's outcome (its last stdout line).
fn outcome_of(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!(
            "girder_send.py said {stdout:?}, stderr {}",
            text(&out.stderr)
        )
    })
}

fn call(python: &Path, queue: &str, name: &str, job_url: &str) -> Value {
    outcome_of(girder_send(python, queue, name, job_url))
}

struct Setup {
    girder: PathBuf,
    lane: Lane,
    _root: tempfile::TempDir,
    _worker: Daemon,
    jobs: JobServer,
}

fn setup(test: &'static str) -> Setup {
    let girder = girder_python(test);
    let python = requirements(test);
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let lane = Lane::new(test, python);
    girder_tasks_plugin(&plugins, &girder);
    let jobs = JobServer::start();
    let allowed = format!("http://127.0.0.1:{}/api/v1/", jobs.port);
    let worker = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--girder-job-url", &allowed],
    );
    Setup {
        girder,
        lane,
        _root: root,
        _worker: worker,
        jobs,
    }
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_girder_jobs_follow_success_failure_and_progress() {
    let s = setup("amqp_girder_jobs");
    let (q, jobs) = (&s.lane.queue, &s.jobs);

    // Success: RUNNING, the task's prints in the log, SUCCESS; the token on every request.
    let out = call(&s.girder, q, "girder.add", &jobs.url("add"));
    assert_eq!(
        out["girder_io_bodies"], 1,
        "sent through `girder_io`: {out}"
    );
    let result = &out["ok"];
    assert_eq!(result["sum"], 9, "{out}");
    assert_eq!(
        result["args"],
        json!([[2, 3], 4]),
        "tuples arrive as arrays: {out}"
    );
    assert_eq!(result["serializer"], "jsonpickle", "{out}");
    assert_eq!(result["kwargs"]["k"], json!([1, 2]), "{out}");
    assert_eq!(
        result["kwargs"]["file"]["type"], "girder_worker.utils.transforms.girder_io.GirderFileId",
        "a py/object argument is decoded by the SDK where jsonpickle is: {out}"
    );
    assert_eq!(
        result["kwargs"]["file"]["state"]["file_id"], "65f0c0ffee",
        "{out}"
    );
    assert_eq!(
        result["headers"],
        json!(["girder_api_url", "girder_client_token", "jobInfoSpec"]),
        "Girder's headers reach the plugin: {out}"
    );
    assert_eq!(result["job_url"], jobs.url("add"), "{out}");
    let add = jobs.wait("add", "final status", ended);
    assert_eq!(statuses(&add), [2, 3], "RUNNING then SUCCESS: {add:#?}");
    assert!(
        add.iter()
            .all(|r| r.method == "PUT" && r.token.as_deref() == Some("token-1")),
        "{add:#?}"
    );
    let log = job_log(&add);
    assert!(
        log.contains("adding [2, 3] and 4\n") && log.contains("the sum is 9\n"),
        "{log:?}"
    );
    let first_log = add.iter().position(|r| r.form.contains_key("log")).unwrap();
    let success = add
        .iter()
        .position(|r| r.form.get("status").is_some_and(|s| s == "3"))
        .unwrap();
    assert!(
        first_log < success,
        "the log is flushed before the final status: {add:#?}"
    );

    // Failure: the exception and its traceback in the log, then ERROR.
    let out = call(&s.girder, q, "girder.fail", &jobs.url("fail"));
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    let fail = jobs.wait("fail", "final status", ended);
    assert_eq!(statuses(&fail), [2, 4], "RUNNING then ERROR: {fail:#?}");
    let log = job_log(&fail);
    assert!(log.contains("about to fail"), "{log:?}");
    assert!(
        log.contains("ValueError: the input is not an image\nTraceback (most recent call last):"),
        "{log:?}"
    );

    // Progress: the job's progress fields follow task.progress.
    let out = call(&s.girder, q, "girder.progress", &jobs.url("progress"));
    assert_eq!(out["ok"], "done", "{out}");
    let progress = jobs.wait("progress", "final status", ended);
    assert!(
        progress.iter().any(
            |r| r.form.get("progressCurrent").map(String::as_str) == Some("4")
                && r.form.get("progressTotal").map(String::as_str) == Some("4")
                && r.form.get("progressMessage").map(String::as_str) == Some("step 4 of 4")
        ),
        "{progress:#?}"
    );
    assert_eq!(statuses(&progress), [2, 3], "{progress:#?}");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_girder_jobs_are_canceled_by_a_revoke_or_by_girder() {
    let s = setup("amqp_girder_cancel");
    let (q, jobs) = (&s.lane.queue, &s.jobs);

    // A plain revoke of the running task: the plugin sees the cancel, the job ends CANCELED.
    let mut client = girder_send(&s.girder, q, "girder.wait", &jobs.url("revoked"));
    let id = task_id_of(&mut client);
    jobs.wait("revoked", "task output", |r| {
        job_log(r).contains("waiting to be cancelled")
    });
    let said = s.lane.celery_cli(&["control", "revoke", &id]);
    let out = outcome_of(client);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out} ({said})");
    let revoked = jobs.wait("revoked", "final status", ended);
    assert_eq!(
        statuses(&revoked),
        [2, 5],
        "RUNNING then CANCELED: {revoked:#?}"
    );
    assert!(job_log(&revoked).contains("saw cancelled"), "{revoked:#?}");

    // Girder sets the job CANCELING: the worker reads it back and cancels the task the same way.
    let client = girder_send(&s.girder, q, "girder.wait", &jobs.url("canceling"));
    jobs.wait("canceling", "task output", |r| {
        job_log(r).contains("waiting to be cancelled")
    });
    jobs.set_canceling("canceling");
    let out = outcome_of(client);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    let canceled = jobs.wait("canceling", "final status", ended);
    assert_eq!(statuses(&canceled), [2, 5], "{canceled:#?}");
    assert!(
        job_log(&canceled).contains("saw cancelled"),
        "{canceled:#?}"
    );
    assert!(
        canceled.iter().any(|r| r.method == "GET"),
        "a quiet job's status is read back: {canceled:#?}"
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_girder_tasks_still_serve_plain_celery_clients() {
    for (test, python) in [
        ("amqp_girder_celery57", requirements("amqp_girder_celery57")),
        (
            "amqp_girder_celery536",
            celery_536_python("amqp_girder_celery536"),
        ),
    ] {
        let girder = girder_python(test);
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let lane = Lane::new(test, python);
        girder_tasks_plugin(&plugins, &girder);
        let _w = lane.worker(&plugins, &root.path().join("w.sock"));
        let out = lane.run(&["call", "girder.add", "[[2, 3], 4]", r#"{"k": [1, 2]}"#]);
        assert_eq!(out["ok"]["sum"], 9, "{test}: {out}");
        assert_eq!(out["ok"]["serializer"], "json", "{test}: {out}");
        assert_eq!(out["ok"]["headers"], json!([]), "{test}: {out}");
        let out = lane.run(&["call", "girder.fail", "[]"]);
        assert_eq!(out["exc_type"], "ValueError", "{test}: {out}");
        let out = lane.run(&["call", "girder.progress", "[]"]);
        assert_eq!(out["ok"], "done", "{test}: {out}");
    }
}
