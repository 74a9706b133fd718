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
