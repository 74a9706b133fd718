//! Coalesced acks against the real broker: answered deliveries are acked together (a multiple
//! ack where every lower tag is answered, single acks around a task still running), within a
//! few milliseconds, and a graceful stop sends what is pending before the connection closes.
//! Measured where it shows: the broker's own counts of ready and unacked messages in the task
//! queue, and the final states in a raw reply queue the test consumes itself (as in
//! `tests/amqp_faults.rs`), each task id exactly once. Needs RabbitMQ and the Celery venv, like
//! `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::nodes::wait_within as wait_until;
use common::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the worker logs when the broker closes its consumers' channel: a double ack, or an ack
/// of a tag a multiple ack covered, would show here (PRECONDITION_FAILED, unknown delivery tag).
const CHANNEL_CLOSED: [&str; 2] = ["closed the task consumers' channel", "PRECONDITION_FAILED"];

/// A reader of the raw reply queue `replies` into `counts`, consuming once this returns.
fn reader(
    rt: &Runtime,
    replies: &str,
    counts: &Counts,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let (ready, consuming) = tokio::sync::oneshot::channel();
    let reader = rt.spawn(read_replies(
        BROKER.into(),
        replies.to_string(),
        FieldTable::default(),
        counts.clone(),
        Some(ready),
        stop.clone(),
    ));
    rt.block_on(consuming).expect("the reply reader consumes");
    reader
}

/// Stops the reader once the reply queue is read to the end.
fn finish_reading(rt: &Runtime, replies: &str, stop: CancellationToken, reader: JoinHandle<()>) {
    wait_until("the reply queue read", Duration::from_secs(30), || {
        queue_counts(replies) == Some((0, 0))
    });
    stop.cancel();
    rt.block_on(async { within(Duration::from_secs(30), reader).await.unwrap() });
}

/// Sends `n` tasks with the real Celery client, their results to the raw queue `replies`.
fn flood(lane: &Lane, task: &str, args: &Value, n: usize, replies: &str) -> Vec<String> {
    let sent = lane.run(&["flood", task, &args.to_string(), &n.to_string(), replies]);
    serde_json::from_value(sent["ids"].clone()).expect("the ids of the tasks sent")
}

/// How many of `ids` have a final state.
fn answered(counts: &Counts, ids: &[String]) -> usize {
    let counts = counts.lock().unwrap();
    ids.iter().filter(|id| counts.contains_key(*id)).count()
}

/// Each of `ids` has exactly one final state, and no other id has one.
fn exactly_once(counts: &Counts, ids: &[String]) {
    let counts = counts.lock().unwrap();
    for id in ids {
        let seen = counts.get(id).map(Vec::len).unwrap_or(0);
        assert_eq!(seen, 1, "task {id}: {:?}", counts.get(id));
    }
    assert_eq!(counts.len(), ids.len(), "a final state for an unknown id");
}

fn assert_channel_kept(log: &[String]) {
    let closed: Vec<&String> = log
        .iter()
        .filter(|l| CHANNEL_CLOSED.iter().any(|c| l.contains(c)))
        .collect();
    assert!(closed.is_empty(), "the broker closed a channel: {closed:?}");
}

async fn delete_queue(queue: &str) {
    let conn = Connection::connect(BROKER, ConnectionProperties::default()).await;
    if let Ok(conn) = conn {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(queue.into(), Default::default()).await;
        }
    }
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_long_task_with_the_lowest_tag_holds_no_other_ack() {
    const FAST: usize = 300;
    let (lane, root, plugins) = setup!("amqp_acks_long_low_tag");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    let replies = format!("replies-{}", lane.queue);
    let rt = Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let reading = reader(&rt, &replies, &counts, &stop);
    // The long task is the first message in the queue, so delivery tag 1 on the worker's
    // consumers' channel: no multiple ack may cover it while it runs.
    let release = root.path().join("release");
    let long = flood(&lane, "f.wait_file", &json!([release]), 1, &replies);
    let fast = flood(&lane, "f.ok", &json!([1]), FAST, &replies);
    // Prefetch 8, 4 at a time: were answered messages held unacked behind tag 1, the drain
    // would stop after 7 of them.
    let mut worker = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--prefetch-count", "8"],
    );
    wait_until(
        "every fast task answered while the long one runs",
        Duration::from_secs(60),
        || answered(&counts, &fast) == FAST,
    );
    assert_eq!(
        answered(&counts, &long),
        0,
        "the long task was not released"
    );
    // Each answered message acked (singly, around tag 1): only the long one is unacked.
    wait_until(
        "only the long task's message unacked",
        Duration::from_secs(30),
        || queue_counts(&lane.queue) == Some((0, 1)),
    );
    std::fs::write(&release, "go").unwrap();
    wait_until("the long task answered", Duration::from_secs(30), || {
        answered(&counts, &long) == 1
    });
    wait_until(
        "the task queue empty, nothing unacked",
        Duration::from_secs(30),
        || queue_counts(&lane.queue) == Some((0, 0)),
    );
    finish_reading(&rt, &replies, stop, reading);
    exactly_once(&counts, &[long, fast].concat());
    assert_channel_kept(&worker.drain_log());
    rt.block_on(delete_queue(&replies));
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_graceful_stop_mid_burst_leaves_no_answered_message_unacked() {
    const TASKS: usize = 600;
    let (lane, root, plugins) = setup!("amqp_acks_graceful_stop");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    let replies = format!("replies-{}", lane.queue);
    let rt = Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let reading = reader(&rt, &replies, &counts, &stop);
    let ids = flood(&lane, "f.ok", &json!([1]), TASKS, &replies);
    let mut first = lane.worker(&plugins, &root.path().join("a.sock"));
    // Stopped while answers flow: some acks are still waiting for their batch.
    wait_until("answers flowing", Duration::from_secs(60), || {
        answered(&counts, &ids) >= 100
    });
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_exit().success());
    finish_reading(&rt, &replies, stop, reading);
    // The connection is closed: whatever was unacked is ready again. Exactly the tasks not
    // answered must be back; an answered one back too would run again.
    let done = answered(&counts, &ids);
    assert!(
        done < TASKS,
        "the stop came after the burst: {done} answered"
    );
    assert_eq!(
        queue_counts(&lane.queue),
        Some(((TASKS - done) as u64, 0)),
        "{done} of {TASKS} answered before the stop"
    );
    let log = first.drain_log();
    assert_channel_kept(&log);
    let not_drained = "still being answered at shutdown";
    assert!(!log.iter().any(|l| l.contains(not_drained)), "{log:#?}");

    // A second worker, which remembers nothing of the first, answers the rest: each task once.
    let stop = CancellationToken::new();
    let reading = reader(&rt, &replies, &counts, &stop);
    let mut second = lane.worker(&plugins, &root.path().join("b.sock"));
    wait_until("every task answered", Duration::from_secs(60), || {
        answered(&counts, &ids) == TASKS
    });
    wait_until(
        "the task queue empty, nothing unacked",
        Duration::from_secs(30),
        || queue_counts(&lane.queue) == Some((0, 0)),
    );
    finish_reading(&rt, &replies, stop, reading);
    exactly_once(&counts, &ids);
    assert_channel_kept(&second.drain_log());
    rt.block_on(delete_queue(&replies));
}
