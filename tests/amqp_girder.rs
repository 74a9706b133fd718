//! Girder Worker's own client (the registry's `girder-worker` package, in a venv the test
//! makes) against this worker: its `girder_io` envelope (jsonpickle under application/json).
//! Needs RabbitMQ, like `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// Sends `name((2, 3), 4, k=[1, 2])` with Girder Worker's `Task.apply_async` to `queue`.
fn girder_call(python: &std::path::Path, queue: &str, name: &str) -> Value {
    let out = Command::new(python)
        .arg(repo().join("tests/celery/girder_send.py"))
        .args([queue, name])
        .current_dir(repo().join("tests/celery"))
        .env("BROKER_URL", BROKER)
        .stdin(Stdio::null())
        .output()
        .expect("python runs");
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!(
            "girder_send.py said {stdout:?}, stderr {}",
            text(&out.stderr)
        )
    })
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_task_sent_by_girder_workers_client_runs_with_its_tuples_as_arrays() {
    let girder = girder_python("amqp_girder_envelope");
    let (lane, root, plugins) = setup!("amqp_girder_envelope");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let out = girder_call(&girder, &lane.queue, "f.ok");
    assert_eq!(
        out["girder_io_bodies"], 1,
        "sent through `girder_io`: {out}"
    );
    assert_eq!(
        out["ok"],
        json!([[2, 3], 4]),
        "jsonpickle's tuples arrive as arrays: {out}"
    );
}
