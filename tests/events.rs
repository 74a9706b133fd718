//! Monitoring plugins (protocol 1.3 `event`): what a subscriber is told, in what order, and
//! that a subscriber which stops reading or crashes never costs the tasks anything.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use worker::task::TaskRequest;

/// `tests/plugins/subscriber.py` subscribed to `events`, logging to `log`; `env` picks its
/// misbehaviour.
fn subscriber(root: &Path, log: &Path, events: &str, env: &[(&str, &str)]) -> PathBuf {
    let dir = root.join("subscriber");
    std::fs::create_dir_all(&dir).unwrap();
    let env: String = env.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
    let text = format!(
        "name = \"subscriber\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", {:?}]\nevents = {events}\n[restart]\nbackoff_initial = 0.05\n[timeouts]\nping_interval = 3600\nshutdown_grace = 0.5\n[env]\nPYTHONPATH = {:?}\nSUBSCRIBER_LOG = {:?}\n{env}",
        repo().join("tests/plugins/subscriber.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string(),
        log.display().to_string(),
    );
    common::write_manifest(&dir, &text);
    dir
}

/// The events in a subscriber's log so far.
fn logged(log: &Path) -> Vec<Value> {
    json_lines(log)
}

/// Waits (up to 20 s) until the log holds an event matching `pred`; all events so far.
async fn wait_logged(log: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = logged(log);
        if events.iter().any(&pred) {
            return events;
        }
        assert!(Instant::now() < deadline, "no {what} in {events:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn of_task<'a>(events: &'a [Value], id: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["task_id"] == id).collect()
}

#[tokio::test]
async fn one_tasks_events_come_in_order_with_their_facts() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("events.jsonl");
    let h = Harness::start(&[
        rust_plugin(root.path(), ""),
        subscriber(root.path(), &log, r#"["task.*", "instance.*"]"#, &[]),
    ]);
    h.ready().await;
    let request = TaskRequest::new("rust.count", vec![json!(3)], Default::default());
    let id = request.id.clone();
    success(&h.run_request(request).await.0);
    let failed = h.fails("rust.nope", vec![]).await;
    assert_eq!(failed.exc_type, "NotRegistered");
    let events = wait_logged(&log, "task.succeeded", |e| {
        e["event"] == "task.succeeded" && e["task_id"] == id.as_str()
    })
    .await;
    let mine = of_task(&events, &id);
    let kinds: Vec<&str> = mine.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "task.received",
            "task.started",
            "task.progress",
            "task.progress",
            "task.progress",
            "task.succeeded"
        ]
    );
    let started = mine[1];
    assert_eq!(
        (
            &started["plugin"],
            &started["instance"],
            &started["attempt"]
        ),
        (&json!("rust-echo"), &json!(0), &json!(1))
    );
    assert!(started["pid"].as_u64().unwrap() > 0);
    assert_eq!(mine[4]["done"], 3);
    let done = mine[5];
    assert_eq!(
        (&done["outcome"], &done["task"]),
        (&json!("success"), &json!("rust.count"))
    );
    assert!(done["runtime"].as_f64().unwrap() > 0.0);
    assert!(mine
        .windows(2)
        .all(|w| w[0]["time"].as_f64() <= w[1]["time"].as_f64()));
    assert!(events.iter().all(|e| e["dropped"] == 0));
    // Instances: rust-echo's start was told, with its pid and version.
    assert!(events.iter().any(|e| e["event"] == "instance.started"
        && e["plugin"] == "rust-echo"
        && e["version"] == "0.1.0"));
    // A task refused before it ran gets only its end.
    let refused = wait_logged(&log, "the refused task", |e| {
        e["event"] == "task.failed" && e["task"] == "rust.nope"
    })
    .await;
    let refused = refused.iter().find(|e| e["task"] == "rust.nope").unwrap();
    assert_eq!(
        (&refused["outcome"], &refused["exception"]),
        (&json!("not_registered"), &json!("NotRegistered"))
    );
    let status = h.status("subscriber").await;
    let ev = status.events.expect("a subscriber reports its events");
    assert_eq!(ev.subscribed, ["task.*", "instance.*"]);
    assert!(ev.delivered >= 8, "{ev:?}");
    assert_eq!(ev.dropped, 0);
    // It only watches, so its process yields the CPU to the tasks' (the idle CPU, nice 10);
    // rust-echo's not. (`/proc/<pid>/stat` fields 19 and 41: nice, policy; 5 is SCHED_IDLE.)
    let priority = |pid: Option<u32>| {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.unwrap())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let field = |n: usize| {
            after_name
                .split(' ')
                .nth(n - 3)
                .unwrap()
                .parse::<i64>()
                .unwrap()
        };
        (field(19), field(41))
    };
    assert_eq!(priority(status.instances[0].pid), (10, 5));
    assert_eq!(
        priority(h.status("rust-echo").await.instances[0].pid),
        (0, 0)
    );
    h.stop().await;
}

/// Runs `n` `rust.noop` tasks, 64 at a time; how long they took.
async fn noops(h: &Harness, n: usize) -> Duration {
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for i in 0..n {
        if i >= 64 {
            let outcome = running.join_next().await.unwrap().unwrap();
            success(&outcome);
        }
        let d = h.dispatcher.clone();
        running.spawn(async move {
            d.submit(TaskRequest::new("rust.noop", vec![], Default::default()))
                .outcome(|_| {})
                .await
        });
    }
    while let Some(outcome) = running.join_next().await {
        success(&outcome.unwrap());
    }
    started.elapsed()
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_does_not_slow_ten_thousand_tasks() {
    const TASKS: usize = 10_000;
    let root = tempfile::tempdir().unwrap();
    let echo = rust_plugin(root.path(), "instances = 2\nconcurrency = 32");
    let alone = Harness::start(std::slice::from_ref(&echo));
    alone.ready().await;
    noops(&alone, 500).await; // warm-up, the same for both runs
    let baseline = noops(&alone, TASKS).await;
    alone.stop().await;

    let log = root.path().join("events.jsonl");
    let stalled = subscriber(root.path(), &log, r#"["*"]"#, &[("SUBSCRIBER_STALL", "1")]);
    let h = Harness::start(&[echo, stalled]);
    h.ready().await;
    noops(&h, 500).await;
    let with_stalled = noops(&h, TASKS).await;
    let ratio = with_stalled.as_secs_f64() / baseline.as_secs_f64();
    eprintln!(
        "{TASKS} tasks: {baseline:?} alone, {with_stalled:?} beside a stalled subscriber (x{ratio:.2})"
    );
    let events = h.status("subscriber").await.events.unwrap();
    // 3 events per task; the stalled plugin took one, its pipe and buffers a few thousand.
    assert!(events.dropped > 20_000, "{events:?}");
    assert!(events.delivered < 10_000, "{events:?}");
    // Generous: the point is that nothing waits for the subscriber, not a speed figure (the
    // figure itself is in benches/). Waiting for it would block at the first full buffer.
    assert!(
        ratio < 3.0,
        "{with_stalled:?} beside a stalled subscriber vs {baseline:?} alone"
    );
    // The subscriber runs on the idle CPU: its first event may reach its log only now.
    wait_logged(&log, "the first event", |_| true).await;
    assert_eq!(logged(&log).len(), 1, "it stalled at its first event");
    h.stop().await;
}

#[tokio::test]
async fn a_crashing_subscriber_is_restarted_and_told_what_it_missed() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("events.jsonl");
    let h = Harness::start(&[
        rust_plugin(root.path(), ""),
        subscriber(
            root.path(),
            &log,
            r#"["task.*", "instance.*"]"#,
            &[("SUBSCRIBER_CRASH_ON", "rust.echo")],
        ),
    ]);
    h.ready().await;
    let first_pid = h.status("subscriber").await.instances[0].pid.unwrap();
    // The subscriber dies when told this task started; the task itself is not touched.
    assert_eq!(
        h.ok("rust.echo", vec![json!("hi")]).await["args"],
        json!(["hi"])
    );
    let status = h
        .wait_status("subscriber", "restarted once and ready", |s| {
            s.instances[0].restarts == 1
                && s.instances[0].state == worker::supervisor::status::InstanceState::Ready
        })
        .await;
    assert_ne!(status.instances[0].pid, Some(first_pid));
    let request = TaskRequest::new("rust.noop", vec![], Default::default());
    let id = request.id.clone();
    success(&h.run_request(request).await.0);
    let events = wait_logged(&log, "the later task's end", |e| {
        e["event"] == "task.succeeded" && e["task_id"] == id.as_str()
    })
    .await;
    // The new process was told of its predecessor's crash (what was written to the dying
    // process is lost with it, as with any pipe).
    assert!(events.iter().any(|e| e["event"] == "instance.exited"
        && e["plugin"] == "subscriber"
        && e["expected"] == false
        && e["pid"] == first_pid));
    h.stop().await;
}

#[test]
fn a_manifest_subscribes_to_known_kinds_and_may_serve_no_task() {
    let dir = Path::new("/nonexistent");
    let ok = "name = \"m\"\nversion = \"1\"\ncommand = [\"x\"]\nevents = [\"task.*\", \"plugin.removed\"]\n";
    let m = worker::manifest::Manifest::parse(ok, dir).expect("a subscriber without tasks");
    assert_eq!(m.events, ["task.*", "plugin.removed"]);
    assert!(m.tasks.is_empty());
    assert_eq!(
        m.limits.nice,
        worker::manifest::WATCHER_NICE,
        "it only watches"
    );
    assert!(m.limits.idle_cpu, "on the idle CPU");
    let m = worker::manifest::Manifest::parse(&format!("{ok}[limits]\nnice = 0\n"), dir).unwrap();
    assert_eq!(
        (m.limits.nice, m.limits.idle_cpu),
        (0, false),
        "unless its limits say otherwise"
    );
    let serving = format!("{ok}[[tasks]]\nname = \"m.t\"\n");
    let m = worker::manifest::Manifest::parse(&serving, dir).unwrap();
    assert_eq!(
        m.limits.nice, 0,
        "a plugin that serves tasks keeps the tasks' priority"
    );
    let bad = ok.replace("plugin.removed", "tasks.*");
    let err = worker::manifest::Manifest::parse(&bad, dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key `events`") && err.contains("`tasks.*` is not an event kind"),
        "{err}"
    );
    let neither = "name = \"m\"\nversion = \"1\"\ncommand = [\"x\"]\n";
    let err = worker::manifest::Manifest::parse(neither, dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("or subscribe to `events`"), "{err}");
}

#[tokio::test]
async fn retries_revokes_failed_instances_and_reloads_are_told() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("events.jsonl");
    let faulty = faulty_plugin(root.path(), "faulty", &[], "", "");
    let broken = faulty_plugin(
        root.path(),
        "broken",
        &[("FAULT_HANDSHAKE", "exit")],
        "",
        "[restart]\nmax_restarts = 0\n",
    );
    let sub = subscriber(root.path(), &log, r#"["*"]"#, &[]);
    let h = Harness::start(&[faulty, broken.clone(), sub.clone()]);
    let failed = wait_logged(&log, "instance.failed", |e| {
        e["event"] == "instance.failed" && e["plugin"] == "broken"
    })
    .await;
    let exit = failed
        .iter()
        .find(|e| e["event"] == "instance.exited" && e["plugin"] == "broken")
        .expect("its exit came first");
    assert_eq!(exit["expected"], false);
    assert!(
        exit["reason"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{exit}"
    );

    // A crash under a task spends an attempt: retried, then started again.
    let marker = root.path().join("crashed-once");
    let request = TaskRequest::new(
        "f.crash_once",
        vec![json!(marker.display().to_string())],
        Default::default(),
    );
    let id = request.id.clone();
    success(&h.run_request(request).await.0);
    let events = wait_logged(&log, "the retried task's end", |e| {
        e["event"] == "task.succeeded" && e["task_id"] == id.as_str()
    })
    .await;
    let kinds: Vec<(&str, u64)> = of_task(&events, &id)
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("task.received", 0),
            ("task.started", 1),
            ("task.retried", 1),
            ("task.started", 2),
            ("task.succeeded", 2)
        ]
    );

    // A cancelled task ends revoked.
    let (id, running) = h.spawn("f.sleep", vec![json!(30)]);
    wait_logged(&log, "the sleep's start", |e| {
        e["event"] == "task.started" && e["task_id"] == id
    })
    .await;
    assert!(
        h.dispatcher
            .cancel(&id, worker::task::Cancellation::requested("test"))
            .await
    );
    failure(&running.await.unwrap());
    let events = wait_logged(&log, "task.revoked", |e| {
        e["event"] == "task.revoked" && e["task_id"] == id
    })
    .await;
    let revoked = of_task(&events, &id).pop().unwrap().clone();
    assert_eq!(revoked["outcome"], "cancelled");

    // A reload: faulty replaced by 0.0.2, broken removed, a new plugin installed.
    let v2 = faulty_plugin(
        &root.path().join("v2"),
        "faulty",
        &[("FAULT_VERSION", "0.0.2")],
        "",
        "",
    );
    let text = std::fs::read_to_string(v2.join("plugin.toml")).unwrap();
    std::fs::write(
        v2.join("plugin.toml"),
        text.replace("version = \"0.0.1\"", "version = \"0.0.2\""),
    )
    .unwrap();
    let manifests = [v2, sub, rust_plugin(root.path(), "")]
        .iter()
        .map(|d| worker::manifest::Manifest::load(d).unwrap())
        .collect();
    let report = h
        .dispatcher
        .reload(manifests, Duration::from_secs(5), true)
        .await;
    assert_eq!(
        (report.replaced, report.removed, report.started),
        (
            vec!["faulty".to_string()],
            vec!["broken".to_string()],
            vec!["rust-echo".to_string()]
        )
    );
    let events = wait_logged(&log, "plugin.removed", |e| e["event"] == "plugin.removed").await;
    let told = |kind: &str, plugin: &str, version: Value| {
        events
            .iter()
            .any(|e| e["event"] == kind && e["plugin"] == plugin && e["version"] == version)
    };
    assert!(
        told("plugin.replaced", "faulty", json!("0.0.2")),
        "{events:#?}"
    );
    assert!(
        told("plugin.installed", "rust-echo", json!("0.1.0")),
        "{events:#?}"
    );
    assert!(told("plugin.removed", "broken", Value::Null), "{events:#?}");
    h.stop().await;
}
