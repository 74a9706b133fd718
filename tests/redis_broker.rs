//! The Redis broker (`--broker redis://`) with the real Celery client, CLI and Flower, each
//! test against a `redis-server` of its own: results through the Redis backend and rpc://,
//! failures, NotRegistered and progress states (Celery 5.7 and 5.3.6), revokes, remote
//! control, canvas, priority steps, kombu's `global_keyprefix`, and Flower. No RabbitMQ.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A test's own Redis, a lane on it (the Celery 5.7 client with `redis`, rpc:// results
/// unless set), a temp dir and a plugins directory in it.
fn setup(test: &str) -> (RedisServer, Lane, tempfile::TempDir, PathBuf) {
    let python = redis_python(test);
    let redis = RedisServer::start();
    let mut lane = Lane::new(test, python);
    lane.broker = redis.url();
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    (redis, lane, root, plugins)
}

/// The Redis result backend on the test's server: db 1, beside the broker's db 0.
fn backend(redis: &RedisServer) -> String {
    format!("redis://127.0.0.1:{}/1", redis.port)
}

/// `celery -A capp ARGS -d NODE`: what it printed.
fn cli(lane: &Lane, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["-d", lane.node.as_str()]);
    lane.celery_cli(&all)
}

/// `celery inspect COMMAND -j` for the lane's node: its JSON reply.
fn inspect(lane: &Lane, command: &str) -> Value {
    let said = cli(lane, &["inspect", command, "-j"]);
    let reply: Value = serde_json::from_str(said.trim()).unwrap_or_else(|_| panic!("{said}"));
    reply[lane.node.as_str()].clone()
}

/// Nothing left taken and unsettled: every message the worker took was acked.
fn assert_all_acked(redis: &RedisServer) {
    assert_eq!(redis.cli(&["hlen", "unacked"]), "0");
    assert_eq!(redis.cli(&["zcard", "unacked_index"]), "0");
}

/// The states a `messages` run saw, in order.
fn states(out: &Value) -> Vec<String> {
    out["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|m| m[0].as_str().unwrap().to_string())
        .collect()
}

/// The message `f.progress` sends, as its PROGRESS state's meta, and its streamed items.
fn assert_progress_and_stream(out: &Value) {
    assert_eq!(out["ok"], "done", "{out}");
    let messages = out["messages"].as_array().unwrap();
    let progress: Vec<&Value> = messages
        .iter()
        .filter(|m| m[0] == "PROGRESS")
        .map(|m| &m[1])
        .collect();
    assert_eq!(progress.len(), 1, "{out}");
    assert_eq!(progress[0]["done"], 1, "{out}");
    assert_eq!(progress[0]["total"], 2, "{out}");
    let streamed: Vec<Value> = messages
        .iter()
        .filter(|m| m[0] == "STREAM")
        .flat_map(|m| m[1]["items"].as_array().unwrap().clone())
        .collect();
    assert_eq!(streamed, [json!("a"), json!("b"), json!("c")], "{out}");
    assert_eq!(
        states(out).last().map(String::as_str),
        Some("SUCCESS"),
        "the final state comes last: {out}"
    );
}

#[test]
fn redis_results_failures_not_registered_and_progress_in_the_redis_backend() {
    let (redis, mut lane, root, plugins) = setup("redis_backend");
    lane.result_backend = Some(backend(&redis));
    faulty_plugin(&plugins, "faulty", &[], "", "");
    rust_plugin(&plugins, "");
    let mut w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &backend(&redis)],
    );

    let out = lane.run(&["call", "rust.echo", r#"[1, "two"]"#, r#"{"three": 3}"#]);
    assert_eq!(
        out,
        json!({"ok": {"args": [1, "two"], "kwargs": {"three": 3}}}),
        "{out}"
    );
    // Stored in the backend's db, read back by another client process.
    let out = lane.run(&["call_id", "f.ok", "[4]"]);
    let id = out["id"].as_str().unwrap();
    let key = format!("celery-task-meta-{id}");
    let stored: Value = serde_json::from_str(&redis.cli(&["-n", "1", "get", &key])).unwrap();
    assert_eq!(stored["status"], "SUCCESS");
    assert_eq!(stored["result"], json!([4]));
    assert_eq!(redis.cli(&["exists", &key]), "0", "not in the broker's db");
    assert_eq!(
        lane.run(&["state", id]),
        json!({"state": "SUCCESS", "info": [4]})
    );

    let out = lane.run(&["call_id", "f.raise", "[7]"]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    assert_eq!(out["exc_module"], "builtins", "{out}");
    assert_eq!(out["message"], "bad value: [7]", "{out}");
    let seen = lane.run(&["state", out["id"].as_str().unwrap()]);
    assert_eq!(seen["state"], "FAILURE");
    assert_eq!(
        seen["info"],
        json!({"exc_type": "ValueError", "message": "bad value: [7]"})
    );

    let out = lane.run(&["call", "no.such.task", "[]"]);
    assert_eq!(out["exc_type"], "NotRegistered", "{out}");
    assert_eq!(out["exc_module"], "celery.exceptions", "{out}");
    w.wait_log("received a task no plugin serves");

    // Every state the worker publishes on the task's channel, PROGRESS and STREAM first.
    let out = lane.run(&["messages", "f.progress", "[]"]);
    assert_progress_and_stream(&out);
    assert_all_acked(&redis);
}

#[test]
fn redis_celery_536_client_gets_results_failures_and_not_registered() {
    let (redis, mut lane, root, plugins) = setup("redis_celery536");
    lane.python = celery_536_redis_python("redis_celery536");
    lane.result_backend = Some(backend(&redis));
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &backend(&redis)],
    );
    let version = lane.celery_cli(&["--version"]);
    assert!(version.starts_with("5.3.6"), "{version}");
    assert_eq!(
        lane.run(&["call", "f.ok", "[1, 2]", r#"{"k": 3}"#]),
        json!({"ok": [1, 2]})
    );
    let out = lane.run(&["call", "f.raise", r#"["x"]"#]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    assert_eq!(out["message"], "bad value: ['x']", "{out}");
    let out = lane.run(&["call", "no.such.task", "[]"]);
    assert_eq!(out["exc_type"], "NotRegistered", "{out}");
    assert_all_acked(&redis);
}

/// rpc:// on Redis: Celery's rpc backend names its reply queue in `reply_to`, and the worker
/// pushes each state to that list (the default exchange), where the client's consumer reads it.
#[test]
fn redis_rpc_results_reach_the_clients_reply_list() {
    let (redis, lane, root, plugins) = setup("redis_rpc");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    rust_plugin(&plugins, "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));

    let out = lane.run(&["call", "rust.echo", r#"["a"]"#, r#"{"b": 2}"#]);
    assert_eq!(
        out,
        json!({"ok": {"args": ["a"], "kwargs": {"b": 2}}}),
        "{out}"
    );
    let out = lane.run(&["call", "f.raise", "[1]"]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    assert_eq!(out["message"], "bad value: [1]", "{out}");
    // `get(on_message=...)` sees every state through the reply list.
    let out = lane.run(&["messages", "f.progress", "[]"]);
    assert_progress_and_stream(&out);

    // The oldest client the drop-in promise covers, on the same queue and worker.
    let mut old = Lane::new("redis_rpc", celery_536_redis_python("redis_rpc"));
    old.queue.clone_from(&lane.queue);
    old.broker.clone_from(&lane.broker);
    assert_eq!(old.run(&["call", "f.ok", "[5]"]), json!({"ok": [5]}));
    let out = old.run(&["call", "f.raise", "[]"]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    assert_all_acked(&redis);
}

/// The id of the first task `inspect active` lists, once one is listed.
fn wait_active(lane: &Lane) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    // Each look is a CLI process, which paces the looks.
    loop {
        let active = inspect(lane, "active");
        if let Some(task) = active.as_array().and_then(|a| a.first()) {
            return task["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no task became active: {active}");
    }
}

#[test]
fn redis_revoked_before_start_never_runs_and_terminate_stops_a_running_task() {
    let (redis, mut lane, root, plugins) = setup("redis_revoke");
    lane.result_backend = Some(backend(&redis));
    // One instance: a second task waits behind the first.
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 1", "");
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &backend(&redis)],
    );
    let mut blocker = Watched::spawn(lane.client(&["send_wait", "f.sleep", "[30]"]));
    let sent: Value =
        serde_json::from_str(&blocker.wait("the id", |l| l.contains("\"id\""))).unwrap();
    let blocker_id = sent["id"].as_str().unwrap().to_string();
    let active = wait_active(&lane);
    assert_eq!(active, blocker_id);

    // Taken (listed active) but queued behind the blocker: revoked, it answers REVOKED...
    let notes_path = root.path().join("notes.jsonl");
    let path = notes_path.display().to_string();
    let out = lane.run(&[
        "revoke",
        &lane.node,
        "f.note",
        &json!(["queued", path]).to_string(),
        "plain",
    ]);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    assert_eq!(out["message"], "revoked", "{out}");
    // ...and revoked before it is even sent, too.
    let out = lane.run(&[
        "revoked_first",
        "f.note",
        &json!(["first", path]).to_string(),
    ]);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");

    // `revoke(terminate=True)` of the running one (the CLI's `terminate SIGTERM`).
    let said = cli(&lane, &["control", "terminate", "SIGTERM", &blocker_id]);
    assert!(said.contains(&format!("terminate: {blocker_id}")), "{said}");
    let answered = blocker.wait("the blocker's outcome", |l| l.contains("exc_type"));
    let answered: Value = serde_json::from_str(&answered).unwrap();
    assert_eq!(answered["exc_type"], "TaskRevokedError", "{answered}");
    assert_eq!(answered["message"], "terminated", "{answered}");
    assert_eq!(lane.run(&["state", &blocker_id])["state"], "REVOKED");

    // The slot is free: a witness runs, and the revoked tasks never did before it.
    let out = lane.run(&["call", "f.note", &json!(["after", path]).to_string()]);
    assert_eq!(out, json!({"ok": 2}));
    assert_eq!(notes(&notes_path, 1), [json!(["after", path])]);
    assert_all_acked(&redis);
}

#[test]
fn redis_inspect_and_consumers_by_remote_control() {
    let (redis, lane, root, plugins) = setup("redis_remote");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 2", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let node = lane.node.as_str();

    let ping = cli(&lane, &["inspect", "ping"]);
    assert!(
        ping.contains(&format!("{node}: OK")) && ping.contains("pong"),
        "{ping}"
    );
    let stats = inspect(&lane, "stats");
    assert_eq!(stats["broker"]["transport"], "redis", "{stats}");
    assert_eq!(stats["pool"]["max-concurrency"], 2, "{stats}");
    let registered = cli(&lane, &["inspect", "registered"]);
    for task in ["f.ok", "f.sleep", "f.note"] {
        assert!(registered.contains(&format!("* {task}")), "{registered}");
    }
    assert_eq!(inspect(&lane, "active"), json!([]));
    let queue_names = || -> Vec<String> {
        let queues = inspect(&lane, "active_queues");
        queues
            .as_array()
            .unwrap_or_else(|| panic!("{queues}"))
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(queue_names(), [lane.queue.as_str()]);

    let extra = format!("{}.extra", lane.queue);
    let said = cli(&lane, &["control", "add_consumer", &extra]);
    assert!(said.contains(&format!("add consumer {extra}")), "{said}");
    let said = cli(&lane, &["control", "add_consumer", &extra]);
    assert!(
        said.contains(&format!("already consuming from '{extra}'")),
        "{said}"
    );
    assert_eq!(queue_names(), [lane.queue.as_str(), extra.as_str()]);
    let out = last_json(&mut lane.client_on(&extra, &["call", "f.ok", "[7]"]));
    assert_eq!(out, json!({"ok": [7]}));

    let said = cli(&lane, &["control", "cancel_consumer", &extra]);
    assert!(
        said.contains(&format!("no longer consuming from {extra}")),
        "{said}"
    );
    assert_eq!(queue_names(), [lane.queue.as_str()]);
    // Sent now, it waits in its list: nobody takes it...
    let mut waiting = Watched::spawn(lane.client_on(&extra, &["send_wait", "f.ok", "[8]"]));
    waiting.wait("the id", |l| l.contains("\"id\""));
    assert_eq!(redis.cli(&["llen", &extra]), "1");
    // ...until the worker consumes the queue again.
    cli(&lane, &["control", "add_consumer", &extra]);
    let answered = waiting.wait("the outcome", |l| l.contains("\"ok\""));
    assert_eq!(
        serde_json::from_str::<Value>(&answered).unwrap(),
        json!({"ok": [8]})
    );
    assert_eq!(redis.cli(&["llen", &extra]), "0");
    assert_all_acked(&redis);
}

#[test]
fn redis_chain_and_chord_run_as_in_celery() {
    let (redis, mut lane, root, plugins) = setup("redis_canvas");
    lane.result_backend = Some(backend(&redis));
    fib_plugin(&plugins);
    rust_plugin(&plugins, "");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &backend(&redis)],
    );
    // fibonacci(10) = 55 goes to rust.echo ahead of its own "x"; the immutable last step keeps
    // its 12.
    let out = lane.run(&["canvas", "chain"]);
    assert_eq!(out["ok"], 144, "{out}");
    assert_eq!(out["middle"], json!({"args": [55, "x"], "kwargs": {}}));
    // The chord's body (f.ok, which returns its arguments) gets the ten results in order.
    let out = lane.run(&["canvas", "chord"]);
    assert_eq!(out, json!({"ok": [[0, 1, 1, 2, 3, 5, 8, 13, 21, 34]]}));
    assert_all_acked(&redis);
}

/// `send_many NAME ARGS 1` with `PRIORITY`: the one id sent.
fn send_with_priority(lane: &Lane, priority: &str, args: &Value) -> String {
    let out = last_json(
        lane.client(&["send_many", "f.note", &args.to_string(), "1"])
            .env("PRIORITY", priority),
    );
    out["ids"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

/// On Redis a lower priority number is served first (kombu's steps 0, 3, 6, 9, each a list).
#[test]
fn redis_priority_steps_are_served_lowest_number_first() {
    let (redis, lane, root, plugins) = setup("redis_priority");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 1", "");
    // One message taken at a time: the rest wait in Redis, where their order is kombu's.
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--prefetch-count", "1"],
    );
    let mut blocker = Watched::spawn(lane.client(&["send_wait", "f.sleep", "[60]"]));
    let sent: Value =
        serde_json::from_str(&blocker.wait("the id", |l| l.contains("\"id\""))).unwrap();
    let blocker_id = sent["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Each look is a redis-cli process, which paces the looks.
    while redis.cli(&["hlen", "unacked"]) != "1" {
        assert!(Instant::now() < deadline, "the blocker was never taken");
    }
    let notes_path = root.path().join("notes.jsonl");
    let path = notes_path.display().to_string();
    for priority in ["9", "6", "3", "0"] {
        send_with_priority(&lane, priority, &json!([priority, path]));
    }
    for step in ["3", "6", "9"] {
        let list = format!("{}\x06\x16{step}", lane.queue);
        assert_eq!(redis.cli(&["llen", &list]), "1", "step {step}'s list");
    }
    assert_eq!(redis.cli(&["llen", &lane.queue]), "1", "step 0's list");
    let said = cli(&lane, &["control", "revoke", &blocker_id]);
    assert!(said.contains("flagged as revoked"), "{said}");
    blocker.wait("the blocker's outcome", |l| l.contains("exc_type"));
    let order: Vec<Value> = notes(&notes_path, 4).iter().map(|n| n[0].clone()).collect();
    assert_eq!(order, [json!("0"), json!("3"), json!("6"), json!("9")]);
    assert_all_acked(&redis);
}

/// Every key in the broker's db.
fn keys(redis: &RedisServer) -> Vec<String> {
    redis.cli(&["--scan"]).lines().map(str::to_string).collect()
}

#[test]
fn redis_global_keyprefix_is_shared_with_the_client() {
    let (redis, lane, root, plugins) = setup("redis_keyprefix");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let options = (
        "BROKER_TRANSPORT_OPTIONS",
        r#"{"global_keyprefix": "app:"}"#,
    );
    // Sent before any worker runs: the message waits under the prefix.
    let mut client = lane.client(&["send_wait", "f.ok", "[5]"]);
    client.env(options.0, options.1);
    let mut sent = Watched::spawn(client);
    sent.wait("the id", |l| l.contains("\"id\""));
    assert_eq!(redis.cli(&["llen", &format!("app:{}", lane.queue)]), "1");
    assert_eq!(redis.cli(&["exists", &lane.queue]), "0");

    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--global-keyprefix", "app:"],
    );
    let answered = sent.wait("the outcome", |l| l.contains("\"ok\""));
    assert_eq!(
        serde_json::from_str::<Value>(&answered).unwrap(),
        json!({"ok": [5]})
    );
    // Remote control goes through the prefixed channel and reply list too.
    let out = lane
        .celery_command(&["inspect", "ping", "-d", &lane.node])
        .env(options.0, options.1)
        .output()
        .unwrap();
    let said = text(&out.stdout);
    assert!(said.contains(&format!("{}: OK", lane.node)), "{said}");

    let all = keys(&redis);
    assert!(
        all.contains(&format!("app:_kombu.binding.{}", lane.queue)),
        "{all:?}"
    );
    assert!(all.iter().all(|k| k.starts_with("app:")), "{all:?}");
    assert_eq!(redis.cli(&["hlen", "app:unacked"]), "0");
}

#[test]
fn redis_flower_sees_the_worker_and_its_tasks() {
    let (_redis, lane, root, plugins) = setup("redis_flower");
    assert_eq!(flower_python("redis_flower"), lane.python);
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut flower =
        lane.celery_command(&["flower", &format!("--port={port}"), "--address=127.0.0.1"]);
    flower.env("FLOWER_UNAUTHENTICATED_API", "true");
    let _flower = Watched::spawn(flower);
    let mut w = lane.worker_with(&plugins, &root.path().join("w.sock"), &["-E"]);
    let node = lane.node.clone();
    // Its `inspect stats`, as Flower asked for it over the Redis broker.
    let workers = wait_json(port, "/api/workers", "the worker's stats", |d| {
        d[&node]["stats"]["broker"]["transport"] == "redis"
    });
    assert_eq!(workers[&node]["stats"]["pool"]["max-concurrency"], 1);
    wait_json(port, "/api/workers?status=true", "the worker online", |d| {
        d[&node] == true
    });

    let out = lane.run(&["call_id", "f.ok", "[3]"]);
    assert_eq!(out["ok"], json!([3]), "{out}");
    let id = out["id"].as_str().unwrap();
    let tasks = wait_json(port, "/api/tasks", "the task", |d| {
        d[id]["state"] == "SUCCESS"
    });
    assert_eq!(tasks[id]["name"], "f.ok");
    assert_eq!(tasks[id]["worker"], node.as_str());
    assert_eq!(tasks[id]["args"], "(3,)");

    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(w.wait_exit().success());
    wait_json(
        port,
        "/api/workers?status=true",
        "the worker offline",
        |d| d[&node] == false,
    );
}
