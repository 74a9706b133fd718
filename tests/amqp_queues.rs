//! Task queues as users run them: declared quorum by the client (Celery 5.5's
//! `task_default_queue_type`) or by the worker (`queue_type`). Needs RabbitMQ, like
//! `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::*;
use serde_json::Value;

/// Runs the lane's client with `QUEUE_TYPE=quorum` (its queues declared quorum).
fn quorum_client(lane: &Lane, args: &[&str]) -> Value {
    let out = lane
        .client(args)
        .env("QUEUE_TYPE", "quorum")
        .output()
        .expect("python runs");
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("client said {stdout:?}, stderr {}", text(&out.stderr)))
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_queue_a_client_declared_quorum_is_consumed_as_it_is() {
    let (lane, root, plugins) = setup!("amqp_client_quorum");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let declared = quorum_client(&lane, &["declare"]);
    assert_eq!(declared["declared"], lane.queue.as_str(), "{declared}");
    // The worker would declare it classic: it takes the queue as it is, says so once, and
    // never reconnects over it.
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let warned = w.wait_log("exists with other arguments");
    assert!(
        warned.contains("x-queue-type") && warned.contains("queue_type"),
        "names the argument and the setting: {warned}"
    );
    let out = quorum_client(&lane, &["call", "f.ok", "[1]"]);
    assert_eq!(out["ok"], serde_json::json!([1]), "{out}");
    let logs = w.drain_log();
    assert!(
        !logs.iter().any(|l| l.contains("reconnecting")),
        "no reconnect over a queue's arguments: {logs:#?}"
    );
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_queue_type_quorum_declares_what_a_quorum_client_declares() {
    let (lane, root, plugins) = setup!("amqp_worker_quorum");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--queue-type", "quorum"],
    );
    // A quorum client declares the queue again as it publishes: a classic queue would refuse
    // it (406), so its task running shows the worker declared it quorum.
    let out = quorum_client(&lane, &["call", "f.ok", "[2]"]);
    assert_eq!(out["ok"], serde_json::json!([2]), "{out}");
    drop(w);
}

/// Celery's failover syntax: with the first broker unreachable, the worker moves to the next
/// URL (round robin) and consumes there.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_broker_list_fails_over_to_the_next_url() {
    let (lane, root, plugins) = setup!("amqp_failover");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}//",
        closed.local_addr().unwrap().port()
    );
    drop(closed);
    let brokers = format!("{dead};{BROKER}");
    let args = ["--broker", &brokers, "-Q", &lane.queue, "-n", &lane.node];
    let mut w = Daemon::start_with(&plugins, &root.path().join("w.sock"), &args);
    let moved = w.wait_log("reconnecting to amqp://127.0.0.1:5672");
    assert!(moved.contains(&dead.replace("guest:guest@", "")), "{moved}");
    w.wait_log("consuming Celery tasks");
    let out = lane.run(&["call", "f.ok", "[3]"]);
    assert_eq!(out["ok"], serde_json::json!([3]), "{out}");
}
