//! Remote-control commands that change how this worker runs tasks, through the real `celery
//! control` CLI against real RabbitMQ: `rate_limit` and `time_limit`.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_rate_limit_and_time_limit_by_remote_control() {
    let (lane, root, plugins) = setup!("amqp_task_controls");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-d", lane.node.as_str()]);
        lane.celery_cli(&all)
    };
    for (args, reply) in [
        (
            ["rate_limit", "f.ok", "5/s"],
            "new rate limit set successfully",
        ),
        (["rate_limit", "no.such.task", "5/s"], "unknown task"),
        (["rate_limit", "f.ok", "1/y"], "KeyError('y')"),
        (
            ["rate_limit", "f.ok", "x/s"],
            "Invalid rate limit string: ValueError(",
        ),
    ] {
        let mut all = vec!["control"];
        all.extend(args);
        let said = cli(&all);
        assert!(said.contains(reply), "{args:?}: {said}");
    }

    // Ten tasks at 5/s: each starts 200 ms after the one before, so the batch cannot take less
    // than 1.8 s (a lower bound the worker enforces, not a speed measured).
    let began = Instant::now();
    let out = lane.run(&["batch", "f.ok", "[]", "10"]);
    assert_eq!(out["ok"], 10, "{out}");
    assert!(
        began.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        began.elapsed()
    );
    let said = cli(&["control", "rate_limit", "f.ok", "0"]);
    assert!(said.contains("rate limit disabled successfully"), "{said}");

    // Limits for tasks whose message sets none: the hard one kills a task that ignores the soft.
    let said = cli(&["control", "time_limit", "f.sleep_nocancel", "0.5", "1"]);
    assert!(said.contains("time limits set successfully"), "{said}");
    let said = cli(&["control", "time_limit", "no.such.task", "1", "2"]);
    assert!(said.contains("unknown task"), "{said}");
    let out = lane.run(&["call", "f.sleep_nocancel", "[30]"]);
    assert_eq!(out["exc_type"], "TimeLimitExceeded", "{out}");
    assert_eq!(lane.run(&["call", "f.ok", "[1]"]), json!({"ok": [1]}));
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_add_consumer_and_cancel_consumer_change_the_queues_at_run_time() {
    let (lane, root, plugins) = setup!("amqp_consumers");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let extra = format!("{}.extra", lane.queue);
    let on_extra = |args: &[&str]| {
        let out = lane.client_on(&extra, args).output().unwrap();
        let text = text(&out.stdout);
        serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|_| panic!("client said {text:?}"))
    };
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-d", lane.node.as_str()]);
        lane.celery_cli(&all)
    };

    let said = cli(&["control", "add_consumer", &extra]);
    assert!(said.contains(&format!("add consumer {extra}")), "{said}");
    let said = cli(&["control", "add_consumer", &extra]);
    assert!(
        said.contains(&format!("already consuming from '{extra}'")),
        "{said}"
    );
    let said = cli(&["inspect", "active_queues", "-j"]);
    assert!(said.contains(&format!("\"name\": \"{extra}\"")), "{said}");
    assert_eq!(on_extra(&["call", "f.ok", "[7]"]), json!({"ok": [7]}));

    let said = cli(&["control", "cancel_consumer", &extra]);
    assert!(
        said.contains(&format!("no longer consuming from {extra}")),
        "{said}"
    );
    let said = cli(&["inspect", "active_queues", "-j"]);
    assert!(!said.contains(&format!("\"name\": \"{extra}\"")), "{said}");
    assert!(
        said.contains(&format!("\"name\": \"{}\"", lane.queue)),
        "{said}"
    );
    // Sent now, it waits in the queue: nobody consumes it...
    let mut waiting = lane
        .client_on(&extra, &["send_wait", "f.ok", "[8]"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(waiting.stdout.take().unwrap());
    let mut lines = std::io::BufRead::lines(stdout);
    let sent = lines.next().unwrap().unwrap();
    assert!(sent.contains("\"id\""), "{sent}");
    // (The broker may count a message a moment after the publish returned: each look is a
    // client process, which paces the looks.)
    let depth = (0..20)
        .map(|_| on_extra(&["depth"]))
        .find(|d| d["messages"] == 1);
    assert!(depth.is_some(), "the task never waited in {extra}");
    // ...until the worker consumes the queue again.
    cli(&["control", "add_consumer", &extra]);
    let answered: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(answered, json!({"ok": [8]}));
    waiting.wait().unwrap();
    assert_eq!(on_extra(&["depth"]), json!({"messages": 0}));
    on_extra(&["delete"]);
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_pool_grow_shrink_and_autoscale_by_remote_control() {
    let (lane, root, plugins) = setup!("amqp_pool_scale");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-d", lane.node.as_str()]);
        lane.celery_cli(&all)
    };
    // `inspect stats` lists each plugin's instances (retiring ones until they end).
    let instances = || -> u64 {
        let said = cli(&["inspect", "stats", "-j"]);
        let v: serde_json::Value =
            serde_json::from_str(said.trim()).unwrap_or_else(|_| panic!("{said}"));
        v[lane.node.as_str()]["plugins"][0]["instances"]
            .as_u64()
            .unwrap()
    };
    let wait_instances = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Each look is a CLI process, which paces the looks.
        while instances() != n {
            assert!(Instant::now() < deadline, "never {n} instances");
        }
    };
    assert!(cli(&["control", "pool_grow", "2"]).contains("pool will grow"));
    wait_instances(3);
    assert!(cli(&["control", "pool_shrink", "2"]).contains("pool will shrink"));
    wait_instances(1);
    assert_eq!(lane.run(&["call", "f.ok", "[1]"]), json!({"ok": [1]}));
    let said = cli(&["control", "autoscale", "3", "1"]);
    assert!(said.contains("autoscale now max=3 min=1"), "{said}");
    let said = cli(&["control", "pool_grow", "1"]);
    assert!(
        said.contains("pool_grow is not supported with autoscale. Adjust autoscale range instead."),
        "{said}"
    );
}
