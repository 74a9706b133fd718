//! The RabbitMQ source against the real broker on 127.0.0.1:5672, driven by the real Python
//! Celery client. Every test here is named `amqp_*`; the test support starts RabbitMQ if it is
//! installed and stopped, and creates the Celery venv in `target/celery-venv` on first use
//! (see `common::broker`). `WORKER_TESTS_WITHOUT_BROKER=1` marks them ignored.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_send_task_get_returns_the_result() {
    let (lane, root, plugins) = setup!("amqp_result");
    fib_plugin(&plugins);
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    assert_eq!(
        lane.run(&["call", "fibonacci", "[26]"]),
        json!({"ok": 121393})
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_plugin_exception_raises_on_the_client() {
    let (lane, root, plugins) = setup!("amqp_exception");
    fib_plugin(&plugins);
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane.run(&["call", "fibonacci", "[-1]"]);
    assert_eq!(out["exc_type"], "ValueError");
    assert_eq!(out["exc_module"], "builtins");
    assert_eq!(out["message"], "n must be a non-negative integer, got -1");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_on_message_sees_progress_and_stream_before_success() {
    let (lane, root, plugins) = setup!("amqp_messages");
    fib_plugin(&plugins);
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane.run(&["messages", "fibonacci", "[5]", "{\"stream\": true}"]);
    assert_eq!(out["ok"], 5);
    let messages = out["messages"].as_array().unwrap();
    let streamed: Vec<Value> = messages
        .iter()
        .filter(|m| m[0] == "STREAM")
        .flat_map(|m| m[1]["items"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        streamed,
        vec![json!(1), json!(1), json!(2), json!(3), json!(5)],
        "items in order"
    );
    let progress: Vec<Value> = messages
        .iter()
        .filter(|m| m[0] == "PROGRESS")
        .map(|m| m[1]["done"].clone())
        .collect();
    assert_eq!(progress, (1..=5).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(
        messages.last().unwrap()[0],
        "SUCCESS",
        "the final state comes last: {messages:?}"
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_unknown_task_raises_not_registered() {
    let (lane, root, plugins) = setup!("amqp_unknown");
    fib_plugin(&plugins);
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane.run(&["call", "no.such.task", "[]"]);
    assert_eq!(out["exc_type"], "NotRegistered");
    assert_eq!(out["exc_module"], "celery.exceptions");
    w.wait_log("received a task no plugin serves");
    // The worker keeps serving.
    assert_eq!(lane.run(&["call", "fibonacci", "[10]"]), json!({"ok": 55}));
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_inspect_status_and_terminate() {
    let (lane, root, plugins) = setup!("amqp_inspect");
    fib_plugin(&plugins);
    rust_plugin(&plugins, "concurrency = 4");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let ping = lane.celery_cli(&["inspect", "ping", "-d", &lane.node]);
    assert!(
        ping.contains(&format!("{}: OK", lane.node)) && ping.contains("pong"),
        "{ping}"
    );
    let registered = lane.celery_cli(&["inspect", "registered", "-d", &lane.node]);
    for task in [
        "fibonacci",
        "py.noop",
        "rust.count",
        "rust.echo",
        "rust.noop",
    ] {
        assert!(registered.contains(&format!("* {task}")), "{registered}");
    }
    let status = lane.celery_cli(&["status", "-d", &lane.node]);
    assert!(status.contains(&format!("{}: OK", lane.node)), "{status}");
    let stats = lane.celery_cli(&["inspect", "stats", "-d", &lane.node]);
    assert!(
        stats.contains("max-concurrency") && stats.contains("rust-echo"),
        "{stats}"
    );

    // `active` lists a running task; terminating it raises TaskRevokedError on the client.
    let out = lane.run(&["revoke", &lane.node, "rust.count", "[1000, 50]"]);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    assert_eq!(out["message"], "terminated");
    assert!(out["seconds"].as_f64().unwrap() < 10.0);

    // The CLI spelling: `celery control terminate SIGTERM ID`; and `inspect active` shows the task.
    let mut running = lane
        .client(&["call", "rust.count", "[1000, 50]"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let id = loop {
        let active = lane.celery_cli(&["inspect", "active", "-d", &lane.node, "-j"]);
        if let Some(id) = active
            .split("\"id\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        {
            assert!(
                active.contains("rust.count") && active.contains("time_start"),
                "{active}"
            );
            break id.to_string();
        }
    };
    let reply = lane.celery_cli(&["control", "terminate", "SIGTERM", &id, "-d", &lane.node]);
    assert!(reply.contains(&format!("terminate: {id}")), "{reply}");
    let mut line = String::new();
    BufReader::new(running.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    running.wait().unwrap();
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_plugin_killed_mid_task_is_retried_and_poison_tasks_end() {
    let (lane, root, plugins) = setup!("amqp_plugin_crash");
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "max_attempts = 3",
        "[restart]\nmax_restarts = 20\n",
    );
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let marker = root.path().join("crashed");
    let out = lane.run(&[
        "call",
        "f.crash_once",
        &json!([marker.to_str().unwrap()]).to_string(),
    ]);
    assert_eq!(out, json!({"ok": "survived"}));
    let out = lane.run(&["call", "f.exit", "[4]"]);
    assert_eq!(out["exc_type"], "PluginCrashed", "{out}");
    let msg = out["message"].as_str().unwrap();
    assert!(
        msg.contains("exited with status 4") && msg.contains("gave up after 3 attempt"),
        "{msg}"
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_worker_killed_mid_batch_loses_nothing() {
    let (lane, root, plugins) = setup!("amqp_worker_killed");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    let mut first = lane.worker(&plugins, &root.path().join("a.sock"));
    let mut client = lane
        .client(&["batch", "f.sleep", "[0.05]", "200"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    // Once some results are in, kill the worker outright: unacked messages go back to the queue.
    for line in lines.by_ref() {
        if line.unwrap() == "got 20" {
            break;
        }
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let _second = lane.worker(&plugins, &root.path().join("b.sock"));
    let summary = lines.map(Result::unwrap).last().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&summary).unwrap(),
        json!({"ok": 200, "failed": []})
    );
    assert!(client.wait().unwrap().success());
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_connection_loss_loses_nothing_and_restarts_no_plugin() {
    let (lane, root, plugins) = setup!("amqp_connection_loss");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let before = w.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let mut client = lane
        .client(&["batch", "f.sleep", "[0.2]", "40"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap() == "got 5" {
            break;
        }
    }
    // Close only the worker's connection (the client's reply queue must survive).
    let conns = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .unwrap();
    let conns = text(&conns.stdout);
    let pid = conns
        .lines()
        .find(|l| l.contains(&lane.node))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("the worker's connection is not listed: {conns}"))
        .to_string();
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test: connection loss"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{}", text(&closed.stderr));
    w.wait_log("broker connection lost");
    let summary = lines.map(Result::unwrap).last().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&summary).unwrap(),
        json!({"ok": 40, "failed": []})
    );
    let after = w.list_json();
    assert_eq!(
        live_pids(&after),
        live_pids(&before),
        "no plugin was restarted"
    );
    assert_eq!(after["installed"][0]["live"]["instances"][0]["restarts"], 0);
    // Redelivered copies were answered from memory or joined the running task: none ran twice.
    assert_eq!(after["installed"][0]["live"]["instances"][0]["done"], 40);
    assert!(client.wait().unwrap().success());
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_garbage_messages_are_rejected_and_the_worker_keeps_serving() {
    let (lane, root, plugins) = setup!("amqp_garbage");
    fib_plugin(&plugins);
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    assert_eq!(lane.run(&["garbage"]), json!({"ok": 7}));
    let reasons = [
        "body is not JSON: expected ident",
        "v1 body: `task` must be a string",
        "body[0] (args) must be an array",
        "header `task` must be a string",
        "content type `application/x-python-serialize` is not supported",
        "bytes=8388611",
        "`timelimit` is 1e300",
    ];
    for reason in reasons {
        let line = w.wait_log(reason);
        assert!(line.contains("rejecting a task message"), "{line}");
    }
    assert_eq!(
        lane.run(&["call", "fibonacci", "[20]"]),
        json!({"ok": 6765})
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_countdown_expiry_and_early_revocation() {
    let (lane, root, plugins) = setup!("amqp_eta");
    fib_plugin(&plugins);
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane.run(&["countdown", "fibonacci", "[10]", "1.5"]);
    assert_eq!(out["ok"], 55);
    assert!(
        out["seconds"].as_f64().unwrap() >= 1.4,
        "held until its eta: {out}"
    );
    let out = lane.run(&["expires", "fibonacci", "[10]"]);
    assert_eq!(
        (out["exc_type"].as_str(), out["message"].as_str()),
        (Some("TaskRevokedError"), Some("expired")),
        "{out}"
    );
    let out = lane.run(&["revoked_first", "fibonacci", "[10]"]);
    assert_eq!(
        (out["exc_type"].as_str(), out["message"].as_str()),
        (Some("TaskRevokedError"), Some("revoked")),
        "{out}"
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_two_workers_share_one_queue() {
    let (lane, root, plugins) = setup!("amqp_share");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 2", "");
    let mut a = Daemon::start_with(
        &plugins,
        &root.path().join("a.sock"),
        &[
            "--broker",
            BROKER,
            "-Q",
            &lane.queue,
            "-n",
            &format!("a-{}", lane.node),
        ],
    );
    let mut b = Daemon::start_with(
        &plugins,
        &root.path().join("b.sock"),
        &[
            "--broker",
            BROKER,
            "-Q",
            &lane.queue,
            "-n",
            &format!("b-{}", lane.node),
        ],
    );
    a.wait_log("consuming Celery tasks");
    b.wait_log("consuming Celery tasks");
    let out = lane.run(&["batch", "f.sleep", "[0.05]", "60"]);
    assert_eq!(out, json!({"ok": 60, "failed": []}));
    let done = |d: &Daemon| {
        d.list_json()["installed"][0]["live"]["instances"][0]["done"]
            .as_u64()
            .unwrap()
    };
    let (da, db) = (done(&a), done(&b));
    assert_eq!(da + db, 60);
    assert!(da > 0 && db > 0, "both workers took tasks: {da} + {db}");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_taken_node_name_gets_a_unique_one() {
    let (lane, root, plugins) = setup!("amqp_node_name");
    fib_plugin(&plugins);
    let _first = lane.worker(&plugins, &root.path().join("a.sock"));
    let mut second = lane.worker(&plugins, &root.path().join("b.sock"));
    let line = second.wait_log("is in use by another worker");
    let (name, host) = lane.node.split_once('@').unwrap();
    let unique = format!("{name}-{}@{host}", second.child.id());
    assert!(line.contains(&unique), "{line}");
    let ping = lane.celery_cli(&["inspect", "ping", "-d", &format!("{},{unique}", lane.node)]);
    assert!(ping.contains("2 nodes online"), "both answer: {ping}");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_passive_declare_uses_an_existing_queue() {
    let (lane, root, plugins) = setup!("amqp_passive");
    fib_plugin(&plugins);
    // The client declares the queue (kombu's way) when it sends; the worker then only checks it.
    let mut client = lane
        .client(&["call", "fibonacci", "[12]"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &[
            "--broker",
            BROKER,
            "-Q",
            &lane.queue,
            "-n",
            &lane.node,
            "--queue-declare",
            "passive",
        ],
    );
    w.wait_log("consuming Celery tasks");
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap(),
        json!({"ok": 144})
    );
    client.wait().unwrap();
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_plain_revoke_asks_a_running_task_to_stop_and_never_kills_it() {
    let (lane, root, plugins) = setup!("amqp_plain_revoke");
    rust_plugin(&plugins, "");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let w = lane.worker(&plugins, &root.path().join("w.sock"));
    // A task that polls its cancel flag stops, and the client sees REVOKED.
    let out = lane.run(&["revoke", &lane.node, "rust.count", "[1000, 50]", "plain"]);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    assert_eq!(out["message"], "revoked");
    assert!(out["seconds"].as_f64().unwrap() < 10.0);
    // One that ignores it finishes with its result: nothing kills it (cancel_grace is 5 s by
    // default; this task runs 7 s).
    let out = lane.run(&["revoke", &lane.node, "f.sleep_nocancel", "[7]", "plain"]);
    assert_eq!(out["ok"], "slept", "{out}");
    let list = w.list_json();
    let faulty = list["installed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "faulty")
        .unwrap();
    assert_eq!(faulty["live"]["instances"][0]["restarts"], 0, "{faulty}");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_task_sees_its_queue_and_request_facts_and_a_local_one_sees_none() {
    let (lane, root, plugins) = setup!("amqp_context");
    context_plugin(&plugins);
    let w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane
        .client(&["call", "ctx.where", "[]"])
        .env("PRIORITY", "7")
        .output();
    let out: Value = serde_json::from_str(
        text(&out.unwrap().stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
    .unwrap();
    let seen = &out["ok"];
    assert_eq!(seen["queue"], lane.queue.as_str(), "{out}");
    let request = &seen["request"];
    assert_eq!(request["delivery_info"]["queue"], lane.queue.as_str());
    assert_eq!(request["delivery_info"]["priority"], 7, "{request}");
    assert_eq!(request["delivery_info"]["redelivered"], false, "{request}");
    assert_eq!(request["delivery_info"]["serializer"], "json", "{request}");
    assert_eq!(request["delivery_info"]["routing_key"], lane.queue.as_str());
    assert_eq!(request["hostname"], lane.node.as_str());
    assert_eq!(request["retries"], 0);
    // A top-level task is its own root; Celery's client says so in the headers.
    assert_eq!(request["root_id"], request["id"], "{request}");
    assert_eq!(request["parent_id"], Value::Null);
    assert_eq!(request["eta"], Value::Null);

    let local = output(&mut w.cli(&["task", "run", "ctx.where"]));
    assert!(local.status.success(), "{}", text(&local.stderr));
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(local["queue"], Value::Null);
    assert_eq!(
        local["request"]["delivery_info"],
        json!({"queue": null, "exchange": null, "routing_key": null})
    );
    assert_eq!(local["request"]["hostname"], lane.node.as_str());
}

/// The payload of a file-action task, field by field, as Ngenea Hub reads it.
/// The Hub's payload of a checksum plugin (`task` in its status) over `hub_files`; an unreadable
/// file's message starts with `denied` (each language names the error its own way).
fn assert_hub_payload(out: &Value, dir: &std::path::Path, task: &str, denied: &str) {
    let p = |name: &str| dir.join(name).display().to_string();
    let result = &out["ok"];
    assert_eq!(result["jobid"], 100, "{out}");
    let status = &result["status"];
    assert_eq!(status["task"], task);
    assert_eq!(
        status["input_paths"],
        json!([{"path": dir.display().to_string()}])
    );
    assert_eq!(status["input_total"], 1);
    assert_eq!(
        status["summary"],
        json!({"failures": 1, "processed": 1, "skipped": 1})
    );
    let details = &status["details"];
    assert_eq!(details["processed"][0]["path"], p("new.txt"));
    assert_eq!(
        details["processed"][0]["sha256"],
        "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    );
    assert_eq!(details["skipped"][0]["path"], p("done.txt"));
    assert_eq!(details["failures"][0]["path"], p("locked.txt"));
    assert!(
        details["failures"][0]["message"][0]
            .as_str()
            .unwrap()
            .starts_with(denied),
        "{details}"
    );
    // What goes to the next task: processed and skipped, by path only.
    let mut next: Vec<String> = result["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect();
    next.sort();
    assert_eq!(next, vec![p("done.txt"), p("new.txt")]);
    let started = status["started"].as_str().unwrap();
    assert!(started.ends_with("+00:00"), "timezone-aware: {started}");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_file_action_task_answers_the_hub_payload_streamed_or_not() {
    let (lane, root, plugins) = setup!("amqp_file_action");
    checksum_plugin(&plugins);
    let dir = hub_files(root.path());
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    assert_file_action(
        &lane,
        "file.checksum",
        &dir,
        "file-checksum",
        "PermissionError",
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_the_node_file_action_task_answers_the_same_hub_payload() {
    let (lane, root, plugins) = setup!("amqp_node_file_action");
    node_checksum_plugin(&plugins, root.path());
    let dir = hub_files(root.path());
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let task = "node.file.checksum";
    assert_file_action(&lane, task, &dir, "node-file-checksum", "EACCES");
}

/// A folder with a new file, one whose `.sha256` sidecar matches, and an unreadable one.
fn hub_files(root: &Path) -> std::path::PathBuf {
    let dir = root.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("new.txt"), "foo").unwrap();
    std::fs::write(dir.join("done.txt"), "bar").unwrap();
    std::fs::write(
        dir.join("done.txt.sha256"),
        "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9  done.txt\n",
    )
    .unwrap();
    let locked = dir.join("locked.txt");
    std::fs::write(&locked, "secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    // The plugin's processes run without capabilities, so even as root a 0000 file is unreadable.
    dir
}

/// Calls a checksum task through the real Celery client over `dir`, plainly and streaming, and
/// checks the Hub's payload field by field (and the streamed batches' states).
fn assert_file_action(lane: &Lane, task: &str, dir: &Path, status_task: &str, denied: &str) {
    let kwargs = json!({"jobid": 100, "paths": [{"path": dir.display().to_string()}]});
    let out = lane.run(&["call", task, "[]", &kwargs.to_string()]);
    assert_hub_payload(&out, dir, status_task, denied);

    let mut streaming = kwargs.clone();
    streaming["stream_results"] = json!(true);
    let out = lane.run(&["messages", task, "[]", &streaming.to_string()]);
    assert_hub_payload(&out, dir, status_task, denied);
    let streamed: Vec<Value> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m[0] == "STREAM")
        .flat_map(|m| m[1]["items"].as_array().unwrap().clone())
        .flat_map(|batch| batch["files"].as_array().unwrap().clone())
        .collect();
    let mut states: Vec<&str> = streamed
        .iter()
        .map(|f| f["state"].as_str().unwrap())
        .collect();
    states.sort();
    assert_eq!(states, vec!["failures", "processed", "skipped"], "{out}");
}

/// The events a monitoring plugin logged, once `pred` holds for one of them (20 s at most).
fn wait_events(log: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = json_lines(log);
        if events.iter().any(&pred) {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} in {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn amqp_a_monitoring_plugin_sees_celery_tasks_and_plugin_installs() {
    let (lane, root, plugins) = setup!("amqp_events");
    fib_plugin(&plugins);
    let log = root.path().join("events.jsonl");
    event_log_plugin(&plugins, &log);
    let w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = lane.run(&["call", "fibonacci", "[10]"]);
    assert_eq!(out["ok"], 55, "{out}");
    let events = wait_events(&log, "fibonacci's end", |e| {
        e["event"] == "task.succeeded" && e["task"] == "fibonacci"
    });
    let fib: Vec<&Value> = events.iter().filter(|e| e["task"] == "fibonacci").collect();
    let kinds: Vec<&str> = fib.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["task.received", "task.started", "task.succeeded"]);
    let id = &fib[0]["task_id"];
    assert!(fib
        .iter()
        .all(|e| &e["task_id"] == id && e["plugin"] == "python-fibonacci"));
    assert!(
        fib[0]["submitter"].as_str().unwrap().contains(&lane.queue),
        "{:?}",
        fib[0]
    );
    assert_eq!(fib[2]["outcome"], "success");

    // Installing and uninstalling a plugin while it runs: told as plugin events.
    rust_plugin(&plugins, "");
    let out = output(&mut w.cli(&["plugins", "install", "rust-echo"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_events(&log, "plugin.installed", |e| {
        e["event"] == "plugin.installed" && e["plugin"] == "rust-echo" && e["version"] == "0.1.0"
    });
    let out = output(&mut w.cli(&["plugins", "uninstall", "--yes", "rust-echo"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_events(&log, "plugin.removed", |e| {
        e["event"] == "plugin.removed" && e["plugin"] == "rust-echo"
    });
    let listed = output(&mut w.cli(&["plugins", "list"]));
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("events: *  delivered ") && listed.contains("dropped 0"),
        "{listed}"
    );
}
