//! Queue and result backends (protocol 1.5) with real plugin processes: a spool-directory
//! queue backend and a file result backend on the Python SDK, and a raw queue backend that
//! ignores its window, against a real daemon.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn sdk() -> String {
    repo().join("plugin-protocol/python").display().to_string()
}

/// A queue backend over `spool` (tests/plugins/spool_queue.py) with `window`.
fn spool_plugin(plugins: &Path, spool: &Path, window: u32, env: &str) {
    spool_version(plugins, spool, window, env, "1.0.0")
}

fn spool_version(plugins: &Path, spool: &Path, window: u32, env: &str, version: &str) {
    let text = format!(
        "name = \"spool\"\nversion = \"{version}\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nprovides = [\"queue_backend\"]\n{}\n[queue_backend]\nwindow = {window}\n[restart]\nmax_restarts = 1000\nbackoff_initial = 0.02\nbackoff_max = 0.2\n[timeouts]\nshutdown_grace = 2\n[settings]\ndir = {:?}\n[env]\nWORKER_SDK = {:?}\n{env}",
        repo().join("tests/plugins/spool_queue.py").display().to_string(),
        own_user(),
        spool.display().to_string(),
        sdk(),
    );
    std::fs::create_dir_all(plugins.join("spool")).unwrap();
    write_manifest(&plugins.join("spool"), &text);
}

/// A result backend writing to `path`, failing while `down` exists.
fn sink_plugin(plugins: &Path, path: &Path, down: &Path, tasks: &str) {
    let text = format!(
        "name = \"sink\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nprovides = [\"result_backend\"]\n{}\n[result_backend]\ntasks = {tasks}\n[settings]\npath = {:?}\ndown = {:?}\n[env]\nWORKER_SDK = {:?}\n",
        repo().join("tests/plugins/file_sink.py").display().to_string(),
        own_user(),
        path.display().to_string(),
        down.display().to_string(),
        sdk(),
    );
    std::fs::create_dir_all(plugins.join("sink")).unwrap();
    write_manifest(&plugins.join("sink"), &text);
}

/// Writes task `<id>.json` into the spool.
fn enqueue(spool: &Path, id: &str, task: &str, args: Value) {
    let job = json!({"task": task, "args": args});
    std::fs::write(spool.join(format!("{id}.json")), job.to_string()).unwrap();
}

/// Waits (up to `limit`) until `done` holds, checking every 20 ms.
fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_ext(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == ext))
        })
        .count()
}

fn outcome(spool: &Path, id: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(spool.join(format!("{id}.done"))).unwrap())
        .unwrap()
}

/// The runs `f.note` recorded, by their first argument.
fn runs(notes: &Path) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for line in json_lines(notes) {
        *runs.entry(line[0].to_string()).or_default() += 1;
    }
    runs
}

fn plugin_status(d: &Daemon, name: &str) -> Value {
    let doc = d.list_json();
    doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| p["live"].clone())
        .unwrap_or(Value::Null)
}

struct Setup {
    _root: tempfile::TempDir,
    plugins: PathBuf,
    spool: PathBuf,
    notes: PathBuf,
    socket: PathBuf,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let spool = root.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "instances = 2\nconcurrency = 4",
        "",
    );
    Setup {
        plugins,
        notes: root.path().join("notes.jsonl"),
        socket: root.path().join("w.sock"),
        spool,
        _root: root,
    }
}

#[test]
fn a_queue_backend_that_crashes_in_a_loop_is_restarted_and_loses_no_task_nor_runs_one_twice() {
    let s = setup();
    let notes = s.notes.display().to_string();
    for i in 0..200 {
        enqueue(&s.spool, &format!("t{i:03}"), "f.note", json!([i, notes]));
    }
    spool_plugin(&s.plugins, &s.spool, 8, "SPOOL_CRASH_EVERY = \"37\"\n");
    let mut d = Daemon::start(&s.plugins, &s.socket);
    wait_for("200 answered tasks", Duration::from_secs(90), || {
        count_ext(&s.spool, "done") == 200
    });
    for i in 0..200 {
        let o = outcome(&s.spool, &format!("t{i:03}"));
        assert_eq!(o["state"], "SUCCESS", "{o}");
        assert_eq!(o["result"], 2, "{o}");
    }
    assert_eq!(
        count_ext(&s.spool, "json") + count_ext(&s.spool, "taken"),
        0
    );
    let runs = runs(&s.notes);
    assert_eq!(runs.len(), 200, "every task ran");
    assert!(
        runs.values().all(|&n| n == 1),
        "no task ran twice: {runs:?}"
    );
    let status = plugin_status(&d, "spool");
    let restarts: u64 = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap())
        .sum();
    assert!(
        restarts >= 5,
        "it crashed after every 37th offer: {status:#}"
    );
    let b = &status["backends"];
    assert_eq!(b["provides"], json!(["queue_backend"]), "{b}");
    assert_eq!(b["window"], 8);
    assert!(b["offers_answered"].as_u64().unwrap() >= 200, "{b}");
    d.wait_log("restarting");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn offers_beyond_the_window_are_refused_and_an_answered_id_is_answered_again_without_running() {
    let s = setup();
    let answers = s.socket.with_extension("answers");
    let notes = s.notes.display().to_string();
    // Five offers at once into a window of three: the first three run (two seconds each).
    let offers: Vec<Value> = (0..5)
        .map(|i| json!({"task_id": format!("r{i}"), "task": "f.note_sleep", "args": [2, notes]}))
        .collect();
    let text = format!(
        "name = \"raw\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nprovides = [\"queue_backend\"]\n{}\n[queue_backend]\nwindow = 3\n[env]\nRAW_OFFERS = {:?}\nRAW_ANSWERS = {:?}\nRAW_TWICE = \"1\"\n",
        repo().join("tests/plugins/raw_offers.py").display().to_string(),
        own_user(),
        Value::from(offers).to_string(),
        answers.display().to_string(),
    );
    std::fs::create_dir_all(s.plugins.join("raw")).unwrap();
    write_manifest(&s.plugins.join("raw"), &text);
    // Installed first: the install-time handshake's offers are answered "not run" and noted too.
    let state = s.socket.with_extension("state");
    let (installed, said) = install_all(&s.plugins, &state, &s.socket);
    assert!(installed, "{said}");
    let _ = std::fs::remove_file(&answers);
    let mut d = Daemon::serve(&s.plugins, &state, &s.socket, &[]);
    wait_for("both rounds answered", Duration::from_secs(30), || {
        answers.exists() && json_lines(&answers).len() == 10
    });
    let lines = json_lines(&answers);
    let (first, second) = lines.split_at(5);
    let full: Vec<&Value> = first
        .iter()
        .filter(|a| a["error"]["code"] == -32005)
        .collect();
    assert_eq!(full.len(), 2, "two offers beyond the window: {first:?}");
    assert!(full[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("window full"));
    let ok: HashMap<String, &Value> = first
        .iter()
        .filter_map(|a| Some((a["result"]["task_id"].as_str()?.to_string(), &a["result"])))
        .collect();
    assert_eq!(ok.len(), 3, "{first:?}");
    // The second round: each id answered before gets the same answer, without a second run.
    for a in second {
        if let Some(id) = a["result"]["task_id"].as_str() {
            if let Some(before) = ok.get(id) {
                assert_eq!(&&a["result"], before);
            }
        }
    }
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for line in json_lines(&s.notes) {
        *per_task
            .entry(line["task_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(per_task.values().all(|&n| n == 1), "{per_task:?}");
    for id in ok.keys() {
        assert_eq!(per_task.get(id), Some(&1), "{id} ran once");
    }
    let b = &plugin_status(&d, "raw")["backends"];
    assert!(b["offers_refused"].as_u64().unwrap() >= 2, "{b}");
    assert_eq!(b["offers_in_flight"], 0, "{b}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn an_offered_task_is_cancelled_by_id_and_reports_its_progress() {
    let s = setup();
    let notes = s.notes.display().to_string();
    enqueue(&s.spool, "long", "f.note_sleep", json!([60, notes]));
    enqueue(&s.spool, "prog", "f.progress", json!([]));
    spool_plugin(&s.plugins, &s.spool, 4, "SPOOL_PROGRESS = \"1\"\n");
    let mut d = Daemon::start(&s.plugins, &s.socket);
    wait_for("the long task to start", Duration::from_secs(20), || {
        s.notes.exists() && !json_lines(&s.notes).is_empty()
    });
    let listed = output(&mut d.cli(&["task", "list"]));
    assert!(
        text(&listed.stdout).contains("long"),
        "{}",
        text(&listed.stdout)
    );
    let out = output(&mut d.cli(&["task", "cancel", "long"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "the cancelled task's answer",
        Duration::from_secs(20),
        || s.spool.join("long.done").exists(),
    );
    let o = outcome(&s.spool, "long");
    assert_eq!(o["state"], "FAILURE", "{o}");
    assert_eq!(o["error"]["kind"], "cancelled", "{o}");
    wait_for("the progress task", Duration::from_secs(20), || {
        s.spool.join("prog.done").exists()
    });
    assert_eq!(outcome(&s.spool, "prog")["state"], "SUCCESS");
    let progress = std::fs::read_to_string(s.spool.join("prog.progress")).unwrap();
    let progress: Value = serde_json::from_str(&progress).unwrap();
    assert_eq!(
        progress,
        json!([1, 2, "half"]),
        "offer.progress reached the backend"
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn a_result_backend_that_is_down_holds_the_answer_and_stores_it_once_back() {
    let s = setup();
    let stored = s.socket.with_extension("stored");
    let down = s.socket.with_extension("down");
    sink_plugin(&s.plugins, &stored, &down, "[\"f.*\"]");
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let mut d = Daemon::start_with(&s.plugins, &s.socket, &metrics);
    let addr = metrics_addr(&mut d);
    // Up: a success and a failure stored before the submitter hears either.
    let out = output(&mut d.cli(&["task", "run", "f.note", "1", &s.notes.display().to_string()]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(&mut d.cli(&["task", "run", "f.raise"]));
    assert!(!out.status.success());
    let records = json_lines(&stored);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["task"], "f.note");
    assert_eq!(records[0]["state"], "SUCCESS");
    assert_eq!(records[0]["result"], 2);
    assert_eq!(records[0]["attempts"], 1);
    assert!(records[0]["submitter"]
        .as_str()
        .unwrap()
        .contains("control socket"));
    assert_eq!(records[1]["state"], "FAILURE");
    assert_eq!(records[1]["error"]["kind"], "raised");

    // Down: the task ends, but its submitter waits while the store is retried.
    std::fs::write(&down, "").unwrap();
    let mut waiting = d
        .cli(&["task", "run", "f.note", "2", &s.notes.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_list("a failed store", |doc| {
        doc["installed"].as_array().unwrap().iter().any(|p| {
            p["name"] == "sink"
                && p["live"]["backends"]["result_store_failures"].as_u64() >= Some(1)
        })
    });
    assert_eq!(runs(&s.notes).get("2"), Some(&1), "the task itself ran");
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "no answer before the store"
    );
    assert_eq!(plugin_status(&d, "sink")["backends"]["results_pending"], 1);
    std::fs::remove_file(&down).unwrap();
    let status = waiting.wait().unwrap();
    assert!(status.success());
    let records = json_lines(&stored);
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(
        records[2]["args"],
        json!([2, s.notes.display().to_string()])
    );
    let b = &plugin_status(&d, "sink")["backends"];
    assert_eq!(b["results_stored"], 3, "{b}");
    assert_eq!(b["results_pending"], 0, "{b}");
    let (_, _, body) = scrape(&addr);
    assert!(
        body.contains("worker_results_stored_total{plugin=\"sink\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("worker_results_pending{plugin=\"sink\"} 0"),
        "{body}"
    );
    let failures = "worker_result_store_failures_total{plugin=\"sink\"} ";
    assert!(body.contains(failures), "{body}");
    d.wait_log("did not store task");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn plugins_test_answers_a_queue_backend_not_run_and_has_a_result_backend_store_a_record() {
    let s = setup();
    enqueue(&s.spool, "a", "f.note", json!([1]));
    enqueue(&s.spool, "b", "f.note", json!([2]));
    spool_plugin(&s.plugins, &s.spool, 4, "");
    let stored = s.socket.with_extension("stored");
    let down = s.socket.with_extension("down");
    sink_plugin(&s.plugins, &stored, &down, "[\"*\"]");
    let test = |name: &str| {
        output(
            worker()
                .args(["plugins", "test", name, "--plugins"])
                .arg(&s.plugins),
        )
    };
    let out = test("spool");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains("ok    queue backend: offered 2 task(s) (f.note)"),
        "{said}"
    );
    // Answered "not run": the queue keeps both, released at shutdown.
    assert_eq!(count_ext(&s.spool, "json"), 2, "{said}");
    assert_eq!(count_ext(&s.spool, "done"), 0);

    let out = test("sink");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains("ok    result backend: stored test record"),
        "{said}"
    );
    let records = json_lines(&stored);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["task"], "worker.plugins_test");

    std::fs::write(&down, "").unwrap();
    let out = test("sink");
    assert!(!out.status.success());
    let said = text(&out.stdout);
    assert!(
        said.contains("FAIL  result backend: answered error -32000"),
        "{said}"
    );
    assert!(said.contains("the store is down"), "{said}");
}

#[test]
fn an_upgraded_queue_backend_drains_its_offers_and_no_task_runs_twice() {
    let s = setup();
    let notes = s.notes.display().to_string();
    for i in 0..60 {
        enqueue(
            &s.spool,
            &format!("u{i:02}"),
            "f.note_sleep",
            json!([0.2, notes]),
        );
    }
    spool_plugin(&s.plugins, &s.spool, 8, "");
    let mut d = Daemon::start(&s.plugins, &s.socket);
    wait_for("ten tasks answered", Duration::from_secs(30), || {
        count_ext(&s.spool, "done") >= 10
    });
    spool_version(&s.plugins, &s.spool, 8, "", "1.0.1");
    let out = output(&mut d.cli(&["plugins", "install", "spool"]));
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("daemon: replaced spool"), "{said}");
    wait_for("60 tasks answered", Duration::from_secs(60), || {
        count_ext(&s.spool, "done") == 60
    });
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for line in json_lines(&s.notes) {
        let id = line["task_id"].as_str().unwrap().to_string();
        *per_task.entry(id).or_default() += 1;
    }
    assert_eq!(per_task.len(), 60);
    assert!(per_task.values().all(|&n| n == 1), "{per_task:?}");
    for i in 0..60 {
        assert_eq!(outcome(&s.spool, &format!("u{i:02}"))["state"], "SUCCESS");
    }
    let status = plugin_status(&d, "spool");
    assert_eq!(status["version"], "1.0.1", "{status:#}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn a_result_backend_that_is_down_holds_a_queue_backends_ack_and_loses_nothing() {
    let s = setup();
    let stored = s.socket.with_extension("stored");
    let down = s.socket.with_extension("down");
    std::fs::write(&down, "").unwrap();
    sink_plugin(&s.plugins, &stored, &down, "[\"f.*\"]");
    spool_plugin(&s.plugins, &s.spool, 4, "");
    let notes = s.notes.display().to_string();
    for i in 0..5 {
        enqueue(&s.spool, &format!("h{i}"), "f.note", json!([i, notes]));
    }
    let mut d = Daemon::start(&s.plugins, &s.socket);
    // A window's worth runs, but none is answered (so none acked, and no fifth offered) while
    // their results cannot be stored.
    wait_for("four runs", Duration::from_secs(20), || {
        s.notes.exists() && json_lines(&s.notes).len() == 4
    });
    d.wait_list("failed stores", |doc| {
        doc["installed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "sink" && p["live"]["backends"]["results_pending"] == 4)
    });
    assert_eq!(
        count_ext(&s.spool, "done"),
        0,
        "nothing acked before it is stored"
    );
    assert_eq!(
        plugin_status(&d, "spool")["backends"]["offers_in_flight"],
        4
    );
    std::fs::remove_file(&down).unwrap();
    wait_for("five answered", Duration::from_secs(60), || {
        count_ext(&s.spool, "done") == 5
    });
    let records = json_lines(&stored);
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["h0", "h1", "h2", "h3", "h4"]);
    assert!(records
        .iter()
        .all(|r| r["submitter"] == "queue backend spool"));
    assert_eq!(runs(&s.notes).len(), 5, "each ran once");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_result_backend_that_is_down_holds_the_brokers_ack_and_loses_nothing() {
    let (lane, root, plugins) = setup!("amqp_result_backend_down");
    common::broker::fib_plugin(&plugins);
    let stored = root.path().join("stored.jsonl");
    let down = root.path().join("down");
    std::fs::write(&down, "").unwrap();
    sink_plugin(&plugins, &stored, &down, "[\"fibonacci\"]");
    let d = lane.worker(&plugins, &root.path().join("w.sock"));
    let mut call = lane
        .client(&["call", "fibonacci", "[10]"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_list("a pending store", |doc| {
        doc["installed"].as_array().unwrap().iter().any(|p| {
            p["name"] == "sink"
                && p["live"]["backends"]["result_store_failures"].as_u64() >= Some(1)
        })
    });
    // The task ran; its message is still unacked and the client has no result.
    assert_eq!(common::broker::queue_counts(&lane.queue), Some((0, 1)));
    assert!(
        call.try_wait().unwrap().is_none(),
        "no result before it is stored"
    );
    std::fs::remove_file(&down).unwrap();
    let out = call.wait_with_output().unwrap();
    let said = text(&out.stdout);
    assert!(said.contains("{\"ok\": 55}"), "{said}");
    let records = json_lines(&stored);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["result"], 55);
    assert!(
        records[0]["submitter"].as_str().unwrap().contains("amqp"),
        "{records:?}"
    );
    wait_for("the ack", Duration::from_secs(20), || {
        common::broker::queue_counts(&lane.queue) == Some((0, 0))
    });
}
