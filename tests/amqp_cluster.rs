//! Failover across a real RabbitMQ cluster: three fresh nodes started on this machine for the
//! test (the system broker on 5672 is left alone), a quorum task queue, and 2,000 tasks through
//! the worker while the node it is connected to is stopped. Counted where the client would
//! read them, as in `tests/amqp_faults.rs`: the test consumes a raw reply queue (quorum too, so
//! it outlives any one node) and every task id must have exactly one final state there, or two
//! only for the ids the worker logged as possibly published twice.
//!
//! Needs Debian's `rabbitmq-server` installed and the tests run as root: the nodes are started
//! by `tests/common/nodes.rs`, which says how. Every node is stopped when the test ends, passed
//! or not.

mod common;

use common::broker::*;
use common::nodes::*;
use common::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_stopping_the_workers_cluster_node_under_load_leaves_exactly_one_final_state_per_task() {
    const TASKS: usize = 2000;
    // The whole test, cluster included, ends within this (or fails saying what it waited for).
    const BUDGET: Duration = Duration::from_secs(170);
    let began = Instant::now();
    let deadline = began + BUDGET;
    let (lane, root, plugins) = setup!("amqp_cluster");
    // 8 tasks of 20 ms at a time: a few hundred answers a second, so the stop comes with
    // well over a thousand tasks still to run.
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "instances = 2\nconcurrency = 4",
        "",
    );
    let cluster = Cluster::start(NodeSetup {
        nodes: 3,
        ..NodeSetup::default()
    });
    let formed = began.elapsed();
    let [first, second, third] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };

    // The reply queue lives on the third node, which stays up, and is replicated anyway.
    let replies = format!("replies-{}", lane.queue);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let (ready, consuming) = tokio::sync::oneshot::channel();
    // Quorum, so the reply queue and its consumer outlive the node the worker is connected to.
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let reader = rt.spawn(read_replies(
        third.url(),
        replies.clone(),
        quorum,
        counts.clone(),
        Some(ready),
        stop.clone(),
    ));
    rt.block_on(within(Duration::from_secs(30), consuming))
        .expect("the reply reader consumes");

    // The worker on the cluster's failover list, the first node first: it declares the task
    // queue quorum (its leader on the first node), and takes the next URL after a loss.
    let failover: Vec<String> = cluster.nodes.iter().map(Node::url).collect();
    let failover = failover.join(";");
    let starting = Instant::now();
    let mut worker = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &[
            "--broker",
            &failover,
            "--queue-type",
            "quorum",
            "-Q",
            &lane.queue,
            "-n",
            &lane.node,
        ],
    );
    let consuming = worker.wait_log("consuming Celery tasks");
    let worker_up = starting.elapsed();
    assert!(
        consuming.contains(&format!("127.0.0.1:{}", first.port)),
        "the worker starts on the first URL: {consuming}"
    );

    let (kind, leader) = queue_type_and_leader(third, &lane.queue).unwrap();
    assert_eq!(kind, "quorum", "the task queue's type");

    // The client, on the third node, declares the task queue quorum as well, and publishes
    // with confirms, sending again what the broker refuses while the queue's leader moves: a
    // quorum queue promises only confirmed messages (without confirms, one run in about ten
    // ended with 38 ids that had no final state and no message left in either queue).
    let mut flood = lane.client(&["flood", "f.sleep", "[0.02]", &TASKS.to_string(), &replies]);
    flood
        .env("BROKER_URL", third.url())
        .env("QUEUE_TYPE", "quorum")
        .env("BROKER_TRANSPORT_OPTIONS", r#"{"confirm_publish": true}"#);
    let sending = Instant::now();
    let mut flood = Watched::spawn(flood);

    // The stop comes while the client may still be sending (to the third node, which stays).
    let answered = || counts.lock().unwrap().len();
    wait_until("a quarter of the tasks answered", deadline, || {
        answered() >= TASKS / 4
    });
    let mark = worker.drain_log().len();
    let answered_at_stop = answered();
    let stopping = Instant::now();
    // With the pid file, `stop` returns once the node's process has exited.
    let pid_file = first.pid_file().display().to_string();
    first
        .ctl(&["stop", &pid_file], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("stopping {}: {e}", first.name));
    let stopped_in = stopping.elapsed();
    let failover_to = format!("reconnecting to amqp://127.0.0.1:{}//", second.port);
    let lost = worker.wait_log_from(mark, &failover_to);
    let at = worker
        .seen
        .iter()
        .skip(mark)
        .position(|l| *l == lost)
        .map(|i| mark + i + 1)
        .unwrap();
    let back = worker.wait_log_from(at, "consuming Celery tasks");
    let logged_at = |line: &str| {
        chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("log lines start with an RFC 3339 time ({e}): {line}"))
    };
    let back_after = (logged_at(&back) - logged_at(&lost)).num_milliseconds();
    let sent = flood.wait("with the ids of the tasks sent", |l| l.starts_with('{'));
    let sent: Value = serde_json::from_str(&sent).expect("the client prints JSON");
    let ids: Vec<String> = serde_json::from_value(sent["ids"].clone()).unwrap();
    assert_eq!(ids.len(), TASKS, "{sent}");

    while answered() < TASKS {
        if Instant::now() > deadline {
            let seen = counts.lock().unwrap().clone();
            let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
            let about_missing: Vec<String> = worker
                .drain_log()
                .into_iter()
                .filter(|l| missing.iter().any(|id| l.contains(id.as_str())))
                .collect();
            panic!(
                "timed out waiting for every task answered: {} answered, no final state for \
                 {} ({:?}...); task queue depth {:?}, reply queue depth {:?}; {answered_at_stop} \
                 answered when {} stopped; what the worker logged about them:\n{}",
                seen.len(),
                missing.len(),
                &missing[..missing.len().min(20)],
                queue_depth(third, &lane.queue),
                queue_depth(third, &replies),
                first.name,
                about_missing.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_in = sending.elapsed();
    // Once no task message is left (ready or unacked), nothing more can be published; then
    // read what is still in the reply queue.
    wait_until("the task queue empty", deadline, || {
        queue_depth(third, &lane.queue) == Some(0)
    });
    wait_until("the reply queue read", deadline, || {
        queue_depth(third, &replies) == Some(0)
    });
    stop.cancel();
    rt.block_on(async { within(Duration::from_secs(30), reader).await.unwrap() });

    let log = worker.drain_log();
    let ambiguous = ambiguous_ids(&log);
    let counts = counts.lock().unwrap().clone();
    let mut twice = 0;
    for id in &ids {
        match counts.get(id).map(Vec::len).unwrap_or(0) {
            1 => {}
            2 if ambiguous.contains(id) => twice += 1,
            n => panic!(
                "task {id} has {n} final states in the reply queue ({:?}); ambiguous ids: \
                 {ambiguous:?}; {answered_at_stop} answered when {} stopped",
                counts.get(id),
                first.name
            ),
        }
    }
    assert_eq!(counts.len(), TASKS, "no final state for an unknown id");
    assert!(
        answered_at_stop < TASKS / 2,
        "the stop came with most tasks still to run: {answered_at_stop} of {TASKS} answered"
    );
    let undeliverable: Vec<&String> = log.iter().filter(|l| l.contains("undeliverable")).collect();
    assert!(undeliverable.is_empty(), "{undeliverable:?}");
    eprintln!(
        "cluster failover: {TASKS} tasks in {all_in:.1?} (cluster formed in {formed:.1?}, the \
         worker consuming {worker_up:.1?} after its start); {} (the task queue's leader: \
         {leader}) stopped at {answered_at_stop} answered, `stop` took {stopped_in:.1?}; the \
         worker consuming again {back_after} ms after it logged the loss ({}); {} \
         published-then-lost-before-confirm, {twice} of them seen twice",
        first.name,
        back.split_whitespace()
            .find(|w| w.starts_with("broker="))
            .unwrap_or("?"),
        ambiguous.len()
    );
}
