//! Exactly-once answers under broker faults, measured where the client would read them: the raw
//! reply queue. Tasks are sent by the real Celery client; the test itself consumes the reply
//! queue with no Celery in between, so every final-state message the worker published is seen
//! and counted. Needs RabbitMQ and the Celery venv, like `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::nodes::wait_within as wait_until;
use common::*;
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Forces closed every broker connection whose properties mention `name`.
fn drop_connections(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = text(&out.stdout);
    let pids: Vec<String> = listing
        .lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect();
    let closers: Vec<_> = pids
        .iter()
        .map(|pid| {
            Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: connection drop"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("rabbitmqctl runs")
        })
        .collect();
    for mut c in closers {
        let _ = c.wait();
    }
    pids.len()
}

/// Messages (ready and unacked) in `queue`.
fn queue_depth(queue: &str) -> Option<u64> {
    queue_counts(queue).map(|(ready, unacked)| ready + unacked)
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_connection_drops_leave_exactly_one_final_state_per_task_in_the_raw_reply_queue() {
    const TASKS: usize = 5000;
    const DROPS: usize = 5;
    // Drops come only while this many tasks are left, so every drop finds tasks in flight.
    const LEFT: usize = 300;
    let (lane, root, plugins) = setup!("amqp_exactly_once");
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        // 8 tasks of 50 ms at a time: ~160 answers a second, slow enough that a drop cycle
        // (which can take seconds of `rabbitmqctl` on a loaded machine) never runs out of tasks.
        "instances = 2\nconcurrency = 4",
        "",
    );
    let replies = format!("replies-{}", lane.queue);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let durable = FieldTable::default();
    let reader = rt.spawn(read_replies(
        BROKER.into(),
        replies.clone(),
        durable,
        counts.clone(),
        None,
        stop.clone(),
    ));

    let sent = lane.run(&["flood", "f.sleep", "[0.05]", &TASKS.to_string(), &replies]);
    let ids: Vec<String> = serde_json::from_value(sent["ids"].clone()).unwrap();
    assert_eq!(ids.len(), TASKS);
    let mut worker = lane.worker(&plugins, &root.path().join("w.sock"));

    let answered = || counts.lock().unwrap().len();
    let mut answered_at_drop = Vec::new();
    let mut last = 0;
    for _ in 0..DROPS {
        // A random moment while tasks flow (before, during or after a publish, confirm or
        // ack): some answers after the worker is consuming again from the last drop. Paced by
        // what happened, not by a schedule: `rabbitmqctl close_connection` can take seconds
        // on a loaded machine, and every drop must still find tasks in flight.
        let wait_for = last + 100 + fastrand::usize(..150);
        if wait_for > TASKS - LEFT {
            break;
        }
        wait_until("more answers", Duration::from_secs(60), || {
            answered() >= wait_for
        });
        std::thread::sleep(Duration::from_millis(fastrand::u64(..40)));
        let mark = worker.drain_log().len();
        let dropped = drop_connections(&lane.node);
        last = answered();
        answered_at_drop.push((last, dropped));
        worker.wait_log_from(mark, "consuming Celery tasks");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while answered() < TASKS {
        if std::time::Instant::now() > deadline {
            let seen = counts.lock().unwrap().clone();
            let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
            let about_missing: Vec<String> = worker
                .drain_log()
                .into_iter()
                .filter(|l| missing.iter().any(|id| l.contains(id.as_str())))
                .collect();
            panic!(
                "timed out waiting for every task answered: no final state for {missing:?}; task queue \
                 depth {:?}, reply queue depth {:?}; drops at {answered_at_drop:?}; what the worker \
                 logged about them:\n{}",
                queue_depth(&lane.queue),
                queue_depth(&replies),
                about_missing.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Once no task message is left (ready or unacked), nothing more can be published; then
    // read what is still in the reply queue.
    wait_until("the task queue empty", Duration::from_secs(60), || {
        queue_depth(&lane.queue) == Some(0)
    });
    wait_until("the reply queue read", Duration::from_secs(30), || {
        queue_depth(&replies) == Some(0)
    });
    stop.cancel();
    rt.block_on(async { within(Duration::from_secs(30), reader).await.unwrap() });

    let log = worker.drain_log();
    let ambiguous = ambiguous_ids(&log);
    let counts = counts.lock().unwrap().clone();
    let mut twice = 0;
    for id in &ids {
        let seen = counts.get(id).map(Vec::len).unwrap_or(0);
        match seen {
            1 => {}
            2 if ambiguous.contains(id) => twice += 1,
            n => panic!(
                "task {id} has {n} final states in the reply queue ({:?}); ambiguous ids: {ambiguous:?}; answered at each drop: {answered_at_drop:?}",
                counts.get(id)
            ),
        }
    }
    assert_eq!(counts.len(), TASKS, "no final state for an unknown id");
    assert!(
        answered_at_drop.len() >= 3
            && answered_at_drop
                .iter()
                .all(|(n, dropped)| *n < TASKS && *dropped >= 1),
        "at least 3 drops, each hitting tasks in flight and closing a connection: {answered_at_drop:?}"
    );
    eprintln!(
        "exactly-once: {TASKS} tasks, {} drops at {answered_at_drop:?} (answered, connections closed); \
         {} published-then-lost-before-confirm (the documented window), {twice} of them seen twice",
        answered_at_drop.len(),
        ambiguous.len()
    );
    rt.block_on(delete_queue(&replies));
    assert_eq!(
        json!(worker
            .seen
            .iter()
            .filter(|l| l.contains("undeliverable"))
            .count()),
        json!(0)
    );
}

async fn delete_queue(queue: &str) {
    let conn = Connection::connect(BROKER, ConnectionProperties::default()).await;
    if let Ok(conn) = conn {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(queue.into(), Default::default()).await;
        }
    }
}

/// Reads one message from `queue` (declaring it), waiting up to `limit`.
async fn first_message(queue: &str, limit: Duration) -> Value {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let declare = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), declare, FieldTable::default())
        .await
        .unwrap();
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(queue.into(), "late".into(), options, FieldTable::default())
        .await
        .unwrap();
    let d = within(limit, consumer.next()).await.unwrap().unwrap();
    serde_json::from_slice(&d.data).unwrap()
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_result_is_retried_until_its_reply_queue_exists_then_given_up_after_the_timeout() {
    let (lane, root, plugins) = setup!("amqp_reply_queue_missing");
    faulty_plugin(&plugins, "faulty", &[], "", "");
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
            "--result-retry-timeout",
            "3",
        ],
    );
    w.wait_log("consuming Celery tasks");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The client's reply queue does not exist yet (it is reconnecting): the result waits.
    let late = format!("late-{}", lane.queue);
    let sent = lane.run(&["flood", "f.ok", "[7]", "1", &late]);
    let id = sent["ids"][0].as_str().unwrap().to_string();
    let line = w.wait_log("the reply queue does not exist");
    assert!(line.contains(&id), "{line}");
    let body = rt.block_on(first_message(&late, Duration::from_secs(10)));
    assert_eq!(
        (&body["task_id"], &body["status"], &body["result"]),
        (&json!(id), &json!("SUCCESS"), &json!([7]))
    );
    rt.block_on(delete_queue(&late));

    // A reply queue that never comes: logged as undeliverable after the timeout, and the task
    // message is acked rather than run again.
    let never = format!("never-{}", lane.queue);
    let sent = lane.run(&["flood", "f.ok", "[8]", "1", &never]);
    let id = sent["ids"][0].as_str().unwrap().to_string();
    let line = w.wait_log("result undeliverable");
    assert!(line.contains(&id) && line.contains("3s"), "{line}");
    wait_until("the task message acked", Duration::from_secs(10), || {
        queue_depth(&lane.queue) == Some(0)
    });
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_the_first_reconnect_is_immediate() {
    let (lane, root, plugins) = setup!("amqp_reconnect_at_once");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let seen_before = w.drain_log().len();
    assert_eq!(drop_connections(&lane.node), 1);
    let lost = w.wait_log_from(seen_before, "broker connection lost");
    assert!(lost.contains("reconnecting at once"), "{lost}");
    let back = w.wait_log_from(seen_before, "consuming Celery tasks");
    let at = |line: &str| {
        chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next().unwrap())
            .expect("log lines start with an RFC 3339 time")
    };
    let took = at(&back) - at(&lost);
    eprintln!(
        "consumer back {} ms after the loss",
        took.num_milliseconds()
    );
    assert!(
        took.num_milliseconds() < 1000,
        "back at once, not after a backoff: {lost} / {back}"
    );
    assert_eq!(lane.run(&["call", "f.ok", "[1]"]), json!({"ok": [1]}));
}
