//! Celery's monitoring tools against the worker, unchanged: `celery events --dump` sees every
//! event type a Celery worker sends, and the real Flower shows the worker online (from its
//! heartbeats, with task events turned on by Flower's own `enable_events`) and a task's state
//! and result. Real RabbitMQ, the real Celery client and CLI, the real Flower.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};

/// Flower broadcasts `enable_events` to every worker every 5 s: the test that switches events
/// itself must not run beside it.
static FLOWER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_celery_events_dump_shows_every_event_type() {
    let (lane, root, plugins) = setup!("amqp_evdump");
    fib_plugin(&plugins);
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut dump = Watched::spawn(lane.celery_command(&["events", "--dump"]));
    dump.wait("starting the capture", |l| l.contains("starting capture"));
    let mut w = lane.worker_with(&plugins, &root.path().join("w.sock"), &["-E"]);
    let ours = |l: &str, what: &str| l.starts_with(&format!("{} ", lane.node)) && l.contains(what);
    // evdump names worker-online "started" and worker-offline "shutdown".
    dump.wait("online", |l| ours(l, "] started: "));
    // The periodic kind (a monitor starting asks for one with only `freq=5.0` and `sw_*`).
    let beat = dump.wait("heartbeat", |l| {
        ours(l, "] heartbeat: ") && l.contains("freq=2.0")
    });
    for field in [
        "active=0",
        "processed=",
        "loadavg=[",
        "sw_ident=worker",
        "sw_sys=Linux",
    ] {
        assert!(beat.contains(field), "{field} in {beat}");
    }

    assert_eq!(lane.run(&["call", "fibonacci", "[10]"]), json!({"ok": 55}));
    let received = dump.wait("received", |l| ours(l, "task received: fibonacci("));
    assert!(received.contains("args=(10,) kwargs={}"), "{received}");
    dump.wait("started", |l| ours(l, "task started: fibonacci("));
    let succeeded = dump.wait("succeeded", |l| ours(l, "task succeeded: fibonacci("));
    assert!(
        succeeded.contains("result=55") && succeeded.contains("runtime="),
        "{succeeded}"
    );

    assert_eq!(
        lane.run(&["call", "fibonacci", "[-1]"])["exc_type"],
        "ValueError"
    );
    let failed = dump.wait("failed", |l| ours(l, "task failed: fibonacci("));
    assert!(
        failed.contains("exception=ValueError('n must be"),
        "{failed}"
    );

    // The plugin dies under its first attempt; the dispatcher runs it again.
    let marker = root.path().join("crashed-once");
    let args = serde_json::to_string(&[marker.display().to_string()]).unwrap();
    assert_eq!(
        lane.run(&["call", "f.crash_once", &args]),
        json!({"ok": "survived"})
    );
    let retried = dump.wait("retried", |l| ours(l, "task retried: f.crash_once("));
    assert!(retried.contains("exception=Retry("), "{retried}");

    let out = lane.run(&["revoke", &lane.node, "f.sleep", "[30]"]);
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
    let revoked = dump.wait("revoked", |l| ours(l, "task revoked: f.sleep("));
    assert!(
        revoked.contains("terminated=True") && revoked.contains("signum=15"),
        "{revoked}"
    );

    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(w.wait_exit().success());
    dump.wait("offline", |l| ours(l, "] shutdown: "));
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_flower_shows_the_worker_online_and_a_task_result() {
    let _alone = FLOWER.lock().unwrap_or_else(|e| e.into_inner());
    let (lane, root, plugins) = setup!("amqp_flower");
    let python = flower_python("amqp_flower");
    assert_eq!(python, lane.python);
    fib_plugin(&plugins);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut flower =
        lane.celery_command(&["flower", &format!("--port={port}"), "--address=127.0.0.1"]);
    flower.env("FLOWER_UNAUTHENTICATED_API", "true");
    let _flower = Watched::spawn(flower);
    // No -E: Flower turns task events on itself (`enable_events` every 5 s), as with Celery.
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let node = lane.node.clone();
    wait_json(port, "/api/workers?status=true", "the worker online", |d| {
        d[&node] == true
    });
    w.wait_log("task events enabled by remote control");

    let out = lane.run(&["call_id", "fibonacci", "[12]"]);
    assert_eq!(out["ok"], 144, "{out}");
    let id = out["id"].as_str().unwrap();
    let info = wait_json(
        port,
        &format!("/api/task/info/{id}"),
        "the task's result",
        |d| d["state"] == "SUCCESS",
    );
    assert_eq!(info["name"], "fibonacci");
    assert_eq!(info["result"], "144");
    assert_eq!(info["worker"], node.as_str());
    assert_eq!(info["args"], "(12,)");
    assert!(info["runtime"].as_f64().is_some(), "{info}");

    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(w.wait_exit().success());
    wait_json(
        port,
        "/api/workers?status=true",
        "the worker offline",
        |d| d[&node] == false,
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_inspect_revoked_query_task_conf_report_and_event_switches() {
    let _alone = FLOWER.lock().unwrap_or_else(|e| e.into_inner());
    let (lane, root, plugins) = setup!("amqp_inspect_more");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let node = lane.node.as_str();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-d", node]);
        lane.celery_cli(&all)
    };

    let said = cli(&["control", "revoke", "never-sent-1"]);
    assert!(
        said.contains("tasks {'never-sent-1'} flagged as revoked"),
        "{said}"
    );
    let said = cli(&["inspect", "revoked", "-j"]);
    assert!(said.contains("\"never-sent-1\""), "{said}");

    // A running task: `query_task` finds it active, with what `inspect active` shows.
    let mut running = lane
        .client(&["call", "f.sleep", "[30]"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = loop {
        let active = cli(&["inspect", "active", "-j"]);
        if let Some(id) = active
            .split("\"id\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        {
            break id.to_string();
        }
    };
    let said = cli(&["inspect", "query_task", &id, "-j"]);
    let reply: Value = serde_json::from_str(said.trim()).unwrap_or_else(|_| panic!("{said}"));
    assert_eq!(reply[node][&id][0], "active", "{said}");
    assert_eq!(reply[node][&id][1]["name"], "f.sleep");
    assert_eq!(reply[node][&id][1]["args"], json!([30]));
    let said = cli(&["inspect", "query_task", "nobody-has-this", "-j"]);
    assert!(said.contains(&format!("\"{node}\": {{}}")), "{said}");
    let said = cli(&["control", "terminate", "SIGTERM", &id]);
    assert!(said.contains(&format!("terminate: {id}")), "{said}");
    running.wait().unwrap();

    let said = cli(&["inspect", "conf", "-j"]);
    let conf: Value = serde_json::from_str(said.trim()).unwrap_or_else(|_| panic!("{said}"));
    assert_eq!(
        conf[node]["broker_url"],
        "amqp://guest:********@127.0.0.1:5672//"
    );
    assert_eq!(conf[node]["result_backend"], "rpc://");
    assert_eq!(conf[node]["queues"], json!([lane.queue]));
    let said = cli(&["inspect", "report"]);
    assert!(
        said.contains("software -> worker:") && said.contains("transport:amqp"),
        "{said}"
    );

    for (command, reply) in [
        ("enable_events", "task events enabled"),
        ("enable_events", "task events already enabled"),
        ("disable_events", "task events disabled"),
        ("disable_events", "task events already disabled"),
    ] {
        let said = cli(&["control", command]);
        assert!(said.contains(reply), "{command}: {said}");
    }
    let said = cli(&["inspect", "conf", "-j"]);
    assert!(
        said.contains("\"worker_send_task_events\": false"),
        "{said}"
    );
}
