//! A task that runs longer than the broker's `consumer_timeout` is answered once and runs once.
//!
//! RabbitMQ closes a channel whose oldest unacknowledged delivery is older than
//! `consumer_timeout` ("delivery acknowledgement on channel 1 timed out") and requeues what it
//! had delivered there; the worker opens a new channel for its consumers (the connection, and
//! the results, control and event channels on it, stay) and is handed the same message while
//! the task still runs, maybe more than once. The copies must join the running task: one run, one final
//! state. Counted where the client would read them, as in `tests/amqp_faults.rs`: the test
//! consumes a raw reply queue and the task's id must have exactly one final state there; the
//! task notes each of its runs in a file.
//!
//! The node is the test's own (`tests/common/nodes.rs`; the system broker on 5672 is left
//! alone), with a 2 s `consumer_timeout`. RabbitMQ 3.10 checks that timeout on the channel's
//! tick (`channel_tick_interval`, 60 s unless set, and only in `advanced.config`), so the node
//! ticks every 500 ms: the first close comes 2 to 2.5 s after the delivery.

mod common;

use common::broker::*;
use common::nodes::*;
use common::*;
use lapin::types::FieldTable;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The node's `consumer_timeout`, in ms.
const CONSUMER_TIMEOUT_MS: u64 = 2000;
/// The node's `channel_tick_interval`, in ms: how often a channel checks the timeout.
const TICK_MS: u64 = 500;
/// How long the long task runs. The broker closes the channel 2 to 2.5 s after the first
/// delivery (the worker's channel ticks since it opened), then about 2.5 s after each
/// redelivery (a new channel's tick starts with it): near 2.3, 4.8 and 7.3 s. The answer, a
/// little after 6 s, falls between two closes rather than on one.
const TASK_SECONDS: u64 = 6;
/// What RabbitMQ says when it closes a channel for the consumer timeout.
const TIMED_OUT: &str = "delivery acknowledgement on channel";

/// The test's node, with the short consumer timeout and channel tick (checked: without them no
/// timeout would come while the task runs, and the test would prove nothing).
fn start_node() -> Cluster {
    let conf = format!("consumer_timeout = {CONSUMER_TIMEOUT_MS}\n");
    let advanced = format!("[{{rabbit, [{{channel_tick_interval, {TICK_MS}}}]}}].\n");
    let cluster = Cluster::start(NodeSetup {
        nodes: 1,
        conf: &conf,
        advanced: Some(&advanced),
    });
    let env = cluster.nodes[0]
        .ctl(
            &[
                "eval",
                "{application:get_env(rabbit, consumer_timeout), \
                 application:get_env(rabbit, channel_tick_interval)}.",
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("reading the node's settings: {e}"));
    assert_eq!(
        env.trim(),
        format!("{{{{ok,{CONSUMER_TIMEOUT_MS}}},{{ok,{TICK_MS}}}}}"),
        "the node's consumer_timeout and channel_tick_interval"
    );
    cluster
}

/// Sends one task with the real Celery client to `node`, its result to the raw queue
/// `replies`. Its id, and the client (kept until the test ends, so its publish is never cut).
fn send(lane: &Lane, node: &Node, task: &str, args: &Value, replies: &str) -> (String, Watched) {
    let mut flood = lane.client(&["flood", task, &args.to_string(), "1", replies]);
    flood.env("BROKER_URL", node.url());
    let mut client = Watched::spawn(flood);
    let sent = client.wait("with the id of the task sent", |l| l.starts_with('{'));
    let sent: Value = serde_json::from_str(&sent).expect("the client prints JSON");
    let id = sent["ids"][0].as_str().expect("the id of the task sent");
    (id.to_string(), client)
}

/// The one final-state message of `id` (its body); fails if there is none or more than one.
fn only_final_state<'a>(
    counts: &'a HashMap<String, Vec<Value>>,
    id: &str,
    log: &[String],
) -> &'a Value {
    match counts.get(id).map(Vec::as_slice) {
        Some([one]) => one,
        seen => panic!(
            "task {id} has {} final states in the reply queue: {seen:?}; what the worker logged \
             about it:\n{}",
            seen.map_or(0, <[Value]>::len),
            log.iter()
                .filter(|l| l.contains(id))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_task_longer_than_the_consumer_timeout_is_answered_once_and_runs_once() {
    // The whole test, node included, ends within this (or fails saying what it waited for).
    const BUDGET: Duration = Duration::from_secs(120);
    let began = Instant::now();
    let deadline = began + BUDGET;
    let (lane, root, plugins) = setup!("amqp_consumer_timeout");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let booting = Instant::now();
    let cluster = start_node();
    let booted = booting.elapsed();
    let node = &cluster.nodes[0];

    let replies = format!("replies-{}", lane.queue);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let (ready, consuming) = tokio::sync::oneshot::channel();
    let reader = rt.spawn(read_replies(
        node.url(),
        replies.clone(),
        FieldTable::default(),
        counts.clone(),
        Some(ready),
        stop.clone(),
    ));
    rt.block_on(within(Duration::from_secs(30), consuming))
        .expect("the reply reader consumes");

    let mut worker = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--broker", &node.url(), "-Q", &lane.queue, "-n", &lane.node],
    );
    worker.wait_log("consuming Celery tasks");

    let notes = root.path().join("notes.jsonl");
    let (id, _long) = send(
        &lane,
        node,
        "f.note_sleep",
        &json!([TASK_SECONDS, notes]),
        &replies,
    );
    // The client has published the task (it prints the id after).
    let sent = Instant::now();
    // (a) The broker closed the worker's channel for the timeout, while the task ran.
    let timed_out = worker.wait_log(TIMED_OUT);
    let timed_out_after = sent.elapsed();
    assert!(timed_out.contains("timed out"), "{timed_out}");
    assert!(
        !counts.lock().unwrap().contains_key(&id),
        "the timeout came while the task ran, not after its answer: {timed_out}"
    );

    let answered = || counts.lock().unwrap().contains_key(&id);
    wait_until("the long task's final state", deadline, answered);
    let answered_after = sent.elapsed();
    // (d) The worker still consumes: an ordinary task after it is answered too.
    let (ok_id, _ok) = send(&lane, node, "f.ok", &json!(["after"]), &replies);
    wait_until("the ordinary task's final state", deadline, || {
        counts.lock().unwrap().contains_key(&ok_id)
    });
    // (e) Once no task message is left (ready or unacked), nothing more can be published nor
    // run; then read what is still in the reply queue.
    wait_until("the task queue empty", deadline, || {
        queue_depth(node, &lane.queue) == Some(0)
    });
    wait_until("the reply queue read", deadline, || {
        queue_depth(node, &replies) == Some(0)
    });
    stop.cancel();
    rt.block_on(async { within(Duration::from_secs(30), reader).await.unwrap() });

    // (b) Exactly one final state for each task: SUCCESS, with its result.
    let log = worker.drain_log();
    let counts = counts.lock().unwrap().clone();
    let long = only_final_state(&counts, &id, &log);
    assert_eq!(long["status"], "SUCCESS", "{long}");
    assert_eq!(long["result"], "slept", "{long}");
    let ok = only_final_state(&counts, &ok_id, &log);
    assert_eq!(ok["status"], "SUCCESS", "{ok}");
    assert_eq!(ok["result"], json!(["after"]), "{ok}");
    assert_eq!(
        counts.len(),
        2,
        "no final state for an unknown id: {counts:?}"
    );
    // The connection itself stayed: only the consumers' channel was replaced.
    let reconnects: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("broker connection lost or refused"))
        .collect();
    assert!(reconnects.is_empty(), "no reconnect: {reconnects:#?}");
    let reopened = log
        .iter()
        .filter(|l| l.contains("consuming on a new channel"))
        .count();
    assert!(
        reopened >= 1,
        "the consumers' channel was replaced: {log:#?}"
    );
    // (c) The long task ran once.
    let runs = json_lines(&notes);
    assert_eq!(runs.len(), 1, "the long task ran once: {runs:?}");
    assert_eq!(runs[0]["task_id"], id.as_str(), "{runs:?}");

    // Counted where the broker logs them (the worker's log has lapin's line and its own).
    let node_log = std::fs::read_to_string(node.log_file()).unwrap_or_default();
    let closes = node_log.lines().filter(|l| l.contains(TIMED_OUT)).count();
    let joined = log
        .iter()
        .filter(|l| l.contains(&id) && l.contains("still running or being answered here"))
        .count();
    let total = began.elapsed();
    assert!(total < BUDGET, "the test took {total:.1?}, over {BUDGET:?}");
    eprintln!(
        "consumer timeout: node booted in {booted:.1?}; the broker closed the worker's channel \
         {closes} time(s) (consumer_timeout {CONSUMER_TIMEOUT_MS} ms, tick {TICK_MS} ms), the \
         first seen {timed_out_after:.1?} after the task was sent; f.note_sleep \
         [{TASK_SECONDS}] answered once (SUCCESS) {answered_after:.1?} after it was sent, ran \
         once, {joined} redelivered copies joined it; the consumers' channel replaced {reopened} \
         time(s), no reconnect; f.ok answered after it; total {total:.1?}"
    );
}
