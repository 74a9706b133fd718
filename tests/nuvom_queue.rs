//! `examples/nuvom-queue` against the real Nuvom (the registry's `nuvom` package): jobs Nuvom's
//! own client enqueues with `.delay()` run on a worker plugin, Nuvom's own `get_result` /
//! `get_error` read their outcomes, and the queue ends empty; results of tasks from the control
//! socket land in Nuvom's result backend too; and a SIGKILL of the queue plugin mid-run loses
//! no job and runs none twice. The plugin is installed by its own install steps (a venv, the SDK
//! from this checkout, nuvom); Nuvom's client and the tasks' plugin use `target/nuvom-venv`,
//! made on first use (the package registry is needed then).

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What both the example's install step and the test's venv install.
const NUVOM: &str = "nuvom>=0.11.2,<0.12";

/// The Nuvom project: its tasks (run by the `nuvom-tasks` plugin) and a `.env` that moves its
/// databases from their default paths, so a plugin that did not read the project's settings
/// would find no job.
const TASKS_PY: &str = r#"import os
import time

from nuvom.task import task


@task(timeout_secs=60)
def add(a, b):
    return a + b


@task(timeout_secs=60)
def fail(message):
    raise ValueError(message)


@task(timeout_secs=1)
def nap(seconds):
    time.sleep(seconds)
    return "woke"


@task(timeout_secs=60, retries=1, retry_delay_secs=1)
def flaky(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try")
    return "second try"


@task(timeout_secs=60)
def hold(n, gate):
    # One line per run in `gate`.runs, then runs until the file `gate` exists.
    with open(gate + ".runs", "a") as runs:
        runs.write("%d\n" % n)
    while not os.path.exists(gate):
        time.sleep(0.02)
    return n
"#;

const DOT_ENV: &str =
    "NUVOM_SQLITE_QUEUE_PATH=.nuvom/jobs.db\nNUVOM_SQLITE_DB_PATH=.nuvom/outcomes.db\n";

/// Nuvom's client as an application uses it. `delay '[["add", [2, 3], {}], ...]'` enqueues with
/// `.delay()` and prints the job ids; `outcomes ID...` waits (40 s at most) until each id has a
/// final state in the result backend and the queue is empty, then prints what Nuvom's
/// `get_result` / `get_error` (and `get_full`) say and the queue's size. The last stdout line
/// is the JSON (Nuvom logs to stdout too).
const CLIENT_PY: &str = r#"import json
import logging
import sys
import time

import tasks
from nuvom.queue import get_queue_backend
from nuvom.result_store import get_backend, get_error, get_result

logging.getLogger("nuvom").setLevel(logging.WARNING)


def outcomes(ids):
    deadline = time.time() + 40
    while True:
        full = {i: get_backend().get_full(i) for i in ids}
        final = all(f is not None and f["status"] in ("SUCCESS", "FAILED") for f in full.values())
        size = get_queue_backend().qsize()
        if (final and size == 0) or time.time() > deadline:
            break
        time.sleep(0.05)
    said = {}
    for i, f in full.items():
        said[i] = None if f is None else {
            "status": f["status"], "result": get_result(i), "error": get_error(i),
            "error_type": f["error_type"], "traceback": f["traceback"],
            "func_name": f["func_name"], "attempts": f["attempts"]}
    return {"outcomes": said, "qsize": size}


if sys.argv[1] == "delay":
    jobs = [getattr(tasks, n).delay(*a, **k) for n, a, k in json.loads(sys.argv[2])]
    print(json.dumps([j.id for j in jobs]))
else:
    print(json.dumps(outcomes(sys.argv[2:])))
"#;

/// A worker plugin serving the project's `@task` functions (the port of Nuvom's worker side):
/// each task calls the function `tasks.<name>` wraps. `SERVE` names the tasks, as
/// `worker_name=nuvom_name` pairs.
const SERVE_PY: &str = r#"import importlib
import os

from worker_plugin import Plugin

plugin = Plugin(os.environ["WORKER_PLUGIN_NAME"], "1.0.0")


def serve(name, func):
    @plugin.task(name)
    def run(ctx, *args, **kwargs):
        return getattr(importlib.import_module("tasks"), func).func(*args, **kwargs)


for pair in os.environ["SERVE"].split(","):
    name, func = pair.split("=")
    serve(name, func)

plugin.run()
"#;

/// The Python of `target/nuvom-venv` (Nuvom's client; the tasks' plugin), made on first use,
/// once across test threads and processes.
fn nuvom_python() -> PathBuf {
    let venv = repo().join("target/nuvom-venv");
    let python = venv.join("bin/python");
    let has_nuvom = || {
        Command::new(&python)
            .args([
                "-c",
                "import nuvom.result_store, nuvom.queue_backends.sqlite_queue",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_nuvom() {
        return python;
    }
    std::fs::create_dir_all(repo().join("target")).unwrap();
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(repo().join("target/nuvom-venv.lock"))
        .unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock for the venv");
    if has_nuvom() {
        return python;
    }
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", NUVOM])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        made && has_nuvom(),
        "these tests need a venv with Nuvom: /usr/bin/python3 -m venv {v} && {v}/bin/pip \
         install '{NUVOM}' (Debian's python3-venv provides venv)",
        v = venv.display()
    );
    python
}

/// A Nuvom project directory: `tasks.py`, `client.py`, `.env`.
fn nuvom_project(root: &Path) -> PathBuf {
    let dir = root.join("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tasks.py"), TASKS_PY).unwrap();
    std::fs::write(dir.join("client.py"), CLIENT_PY).unwrap();
    std::fs::write(dir.join(".env"), DOT_ENV).unwrap();
    dir
}

/// Runs `client.py` in the project; the JSON of its last stdout line.
fn client(python: &Path, project: &Path, args: &[&str]) -> Value {
    let out = output(
        Command::new(python)
            .arg("client.py")
            .args(args)
            .current_dir(project),
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "client.py {args:?} failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("client.py said {stdout:?}"))
}

/// Enqueues `jobs` (`[name, args, kwargs]` each) with Nuvom's `.delay()`; their job ids.
fn delay(python: &Path, project: &Path, jobs: Value) -> Vec<String> {
    let ids = client(python, project, &["delay", &jobs.to_string()]);
    ids.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

/// Waits for every id's final state and an empty queue; Nuvom's view of them.
fn outcomes(python: &Path, project: &Path, ids: &[&str]) -> Value {
    let mut args = vec!["outcomes"];
    args.extend(ids);
    client(python, project, &args)
}

/// `examples/nuvom-queue` as one of the test's plugins: its own files, manifest and install
/// steps, with `settings` for the test's project and a quick restart.
fn nuvom_queue_plugin(plugins: &Path, settings: Value) {
    let source = repo().join("examples/nuvom-queue");
    let dir = plugins.join("nuvom-queue");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["main.py", "nuvom_bridge.py"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    // The install step finds the SDK beside the example in the checkout; this copy is elsewhere.
    let text = std::fs::read_to_string(source.join("plugin.toml")).unwrap();
    assert!(text.contains("$WORKER_PLUGIN_SOURCE/../..") && text.contains(NUVOM));
    let text = text.replace("$WORKER_PLUGIN_SOURCE/../..", &repo().display().to_string());
    let mut manifest: toml::Table = text.parse().expect("the example's plugin.toml");
    let settings: toml::Table = serde_json::from_value(settings).unwrap();
    manifest["settings"]
        .as_table_mut()
        .expect("[settings]")
        .extend(settings);
    // The example stores `nuvom.*` results by default; the test stores every task's.
    manifest["result_backend"]
        .as_table_mut()
        .expect("[result_backend]")
        .insert("tasks".into(), toml::Value::Array(vec!["*".into()]));
    let mut restart = toml::Table::new();
    restart.insert("backoff_initial".into(), 0.05.into());
    manifest.insert("restart".into(), restart.into());
    if !own_user().is_empty() {
        manifest.insert("user".into(), "root".into());
    }
    std::fs::write(dir.join("plugin.toml"), toml::to_string(&manifest).unwrap()).unwrap();
}

/// A plugin `name` serving `tasks` (`worker name` -> `Nuvom name`) with the project's functions,
/// `concurrency` at once.
fn tasks_plugin(
    plugins: &Path,
    project: &Path,
    name: &str,
    tasks: &[(&str, &str)],
    concurrency: u32,
) {
    let dir = plugins.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("serve.py"), SERVE_PY).unwrap();
    let serve: Vec<String> = tasks.iter().map(|(w, n)| format!("{w}={n}")).collect();
    let declared: String = tasks
        .iter()
        .map(|(w, _)| format!("[[tasks]]\nname = {w:?}\n"))
        .collect();
    let python = nuvom_python();
    let pythonpath = format!(
        "{}:{}",
        repo().join("plugin-protocol/python").display(),
        project.display()
    );
    let text = format!(
        "name = {name:?}\nversion = \"1.0.0\"\ncommand = [{:?}, \"-u\", \"serve.py\"]\nconcurrency = {concurrency}\n[env]\nPYTHONPATH = {pythonpath:?}\nSERVE = {:?}\n{declared}",
        python.display().to_string(),
        serve.join(","),
    );
    write_manifest(&dir, &text);
}

/// The pids of `plugin`'s live instances.
fn pids_of(doc: &Value, plugin: &str) -> Vec<u32> {
    doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == plugin)
        .flat_map(|p| {
            p["live"]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect()
}

fn all_ready(doc: &Value, plugins: &[&str]) -> bool {
    plugins.iter().all(|p| plugin_ready(doc, p))
}

/// Starts a daemon over `plugins` and waits until each of `names` is ready.
fn daemon(root: &Path, plugins: &Path, names: &[&str]) -> Daemon {
    let d = Daemon::start(plugins, &root.join("w.sock"));
    d.wait_list("every plugin ready", |doc| all_ready(doc, names));
    d
}

#[test]
fn nuvom_jobs_run_on_the_worker_and_nuvom_reads_their_outcomes() {
    let python = nuvom_python();
    let root = tempfile::tempdir().unwrap();
    let project = nuvom_project(root.path());
    let plugins = root.path().join("plugins");
    nuvom_queue_plugin(
        &plugins,
        json!({
            "project_dir": project.display().to_string(),
            "task_map": {"nap": "slow.nap"},
            "poll_interval": 0.05,
        }),
    );
    tasks_plugin(
        &plugins,
        &project,
        "nuvom-tasks",
        &[("add", "add"), ("fail", "fail"), ("flaky", "flaky")],
        4,
    );
    // Its own process: the time limit kills the process running `nap`.
    tasks_plugin(&plugins, &project, "nuvom-slow", &[("slow.nap", "nap")], 1);
    // Jobs waiting before the worker starts are taken as well as those enqueued later.
    let marker = root.path().join("flaky.marker").display().to_string();
    let mut ids = delay(
        &python,
        &project,
        json!([["add", [2, 3], {}], ["fail", ["no luck"], {}]]),
    );
    let d = daemon(
        root.path(),
        &plugins,
        &["nuvom-queue", "nuvom-tasks", "nuvom-slow"],
    );
    ids.extend(delay(
        &python,
        &project,
        json!([["add", [], {"a": 10, "b": 20}], ["nap", [30], {}], ["flaky", [marker], {}]]),
    ));
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let said = outcomes(&python, &project, &ids);
    let of = |i: usize| &said["outcomes"][ids[i]];
    assert_eq!(said["qsize"], 0, "every job acked: {said:#}");

    assert_eq!(of(0)["result"], 5, "{said:#}");
    assert_eq!(of(0)["status"], "SUCCESS");
    assert_eq!(of(0)["func_name"], "add");
    assert_eq!(of(2)["result"], 30, "kwargs travel: {said:#}");

    // A failure is stored as Nuvom's worker stores one: get_error is the message, and the
    // traceback is the one from the plugin that ran the task.
    assert_eq!(of(1)["status"], "FAILED", "{said:#}");
    assert_eq!(of(1)["error"], "no luck");
    assert_eq!(of(1)["error_type"], "ValueError");
    let traceback = of(1)["traceback"].as_str().unwrap();
    assert!(
        traceback.contains("raise ValueError(message)") && traceback.contains("tasks.py"),
        "{traceback}"
    );

    // `nap` ran as `slow.nap` (task_map) with the job's timeout as its hard time limit.
    assert_eq!(of(3)["error"], "Job execution timed out.", "{said:#}");
    assert_eq!(of(3)["error_type"], "TimeoutError");
    assert_eq!(of(3)["func_name"], "nap");

    // Nuvom's retry: the first failure, then the job again after its delay.
    assert_eq!(of(4)["result"], "second try", "{said:#}");
    assert_eq!(of(4)["attempts"], 1);

    // As a result backend: tasks from the control socket are stored too, by their ids.
    let ok = output(&mut d.cli(&["task", "run", "--id", "ctl-add", "add", "4", "5"]));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let failed = output(&mut d.cli(&["task", "run", "--id", "ctl-fail", "fail", "boom"]));
    assert!(!failed.status.success());
    // Stored before the task was answered: no wait needed, and none is done (40 s at most).
    let said = outcomes(&python, &project, &["ctl-add", "ctl-fail"]);
    assert_eq!(said["outcomes"]["ctl-add"]["result"], 9, "{said:#}");
    assert_eq!(said["outcomes"]["ctl-add"]["func_name"], "add");
    assert_eq!(said["outcomes"]["ctl-fail"]["error"], "boom", "{said:#}");
    assert_eq!(said["outcomes"]["ctl-fail"]["error_type"], "ValueError");
}

#[test]
fn a_killed_nuvom_queue_plugin_loses_no_job_and_runs_none_twice() {
    let python = nuvom_python();
    let root = tempfile::tempdir().unwrap();
    let project = nuvom_project(root.path());
    let plugins = root.path().join("plugins");
    nuvom_queue_plugin(
        &plugins,
        json!({
            "project_dir": project.display().to_string(),
            "visibility_timeout": 2,
            "poll_interval": 0.05,
        }),
    );
    tasks_plugin(
        &plugins,
        &project,
        "nuvom-tasks",
        &[("add", "add"), ("hold", "hold")],
        2,
    );
    let d = daemon(root.path(), &plugins, &["nuvom-queue", "nuvom-tasks"]);
    let gate = root.path().join("gate");
    let runs = root.path().join("gate.runs");
    let g = gate.display().to_string();
    let ids = delay(
        &python,
        &project,
        json!([
            ["hold", [0, g], {}],
            ["hold", [1, g], {}],
            ["hold", [2, g], {}],
            ["add", [1, 1], {}],
            ["hold", [3, g], {}],
            ["add", [2, 2], {}],
        ]),
    );
    // Mid-run: both of the tasks' plugin's threads are in a `hold`, the rest wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no two holds started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = pids_of(&d.list_json(), "nuvom-queue");
    assert_eq!(before.len(), 1, "one nuvom-queue process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_list("nuvom-queue restarted", |doc| {
        let now = pids_of(doc, "nuvom-queue");
        plugin_ready(doc, "nuvom-queue") && !now.is_empty() && now != before
    });
    std::fs::write(&gate, "").unwrap();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let said = outcomes(&python, &project, &ids);
    assert_eq!(said["qsize"], 0, "every job acked: {said:#}");
    let results: Vec<&Value> = ids.iter().map(|i| &said["outcomes"][i]["result"]).collect();
    assert_eq!(results, [0, 1, 2, 2, 3, 4], "{said:#}");
    // The restarted plugin offered the jobs its predecessor had claimed once their claims
    // lapsed; the worker joined them to the runs under way instead of running them again.
    let mut ran: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    ran.sort();
    assert_eq!(ran, ["0", "1", "2", "3"], "each hold ran once");
}
