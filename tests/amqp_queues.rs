//! Task queues as users run them: declared quorum by the client (Celery 5.5's
//! `task_default_queue_type`) or by the worker (`queue_type`). Needs RabbitMQ, like
//! `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::*;
use serde_json::Value;

/// Runs the lane's client with `QUEUE_TYPE=quorum` (its queues declared quorum).
fn quorum_client(lane: &Lane, args: &[&str]) -> Value {
    client_with(lane, &[("QUEUE_TYPE", "quorum")], args)
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

/// The lane's client with `env` set; the JSON of its last line.
fn client_with(lane: &Lane, env: &[(&str, &str)], args: &[&str]) -> Value {
    last_json(lane.client(args).envs(env.iter().copied()))
}

/// With `x-max-priority` (`queue_arguments`), a high-priority task overtakes a backlog of low
/// ones once the consumer has room (prefetch 1 here).
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_high_priority_task_overtakes_a_backlog() {
    let (lane, root, plugins) = setup!("amqp_priority");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let config = root.path().join("worker.toml");
    std::fs::write(&config, "[queue_arguments]\n\"x-max-priority\" = 10\n").unwrap();
    let config = config.display().to_string();
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--config", &config, "--prefetch-count", "1"],
    );
    let prio = [("QUEUE_MAX_PRIORITY", "10")];
    // The one prefetch slot is taken by a task that waits for its revoke.
    let mut blocker = lane.client(&["send_wait", "f.sleep", "[60]"]);
    blocker
        .env("QUEUE_MAX_PRIORITY", "10")
        .stdout(std::process::Stdio::piped());
    let mut blocker = blocker.spawn().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(blocker.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    let blocker_id = serde_json::from_str::<Value>(&first).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while client_with(&lane, &prio, &["depth"])["messages"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocker was never delivered"
        );
    }
    let path = root.path().join("notes.jsonl");
    let path_s = path.display().to_string();
    let low = serde_json::json!(["low", path_s]).to_string();
    let high = serde_json::json!(["high", path_s]).to_string();
    let low_env = [("QUEUE_MAX_PRIORITY", "10"), ("PRIORITY", "1")];
    let sent = client_with(&lane, &low_env, &["send_many", "f.note", &low, "5"]);
    assert_eq!(sent["ids"].as_array().map(Vec::len), Some(5), "{sent}");
    let high_env = [("QUEUE_MAX_PRIORITY", "10"), ("PRIORITY", "9")];
    client_with(&lane, &high_env, &["send_many", "f.note", &high, "1"]);
    let said = lane.celery_cli(&["control", "revoke", &blocker_id]);
    let _ = blocker.wait();
    let order = notes(&path, 6);
    assert_eq!(
        order[0][0], "high",
        "the high-priority task first: {order:?} ({said})"
    );
    assert!(order[1..].iter().all(|n| n[0] == "low"), "{order:?}");
}

/// A queue deleted under the worker (an operator, or its node gone): the broker cancels the
/// consumer, and the worker declares the queue again and consumes it.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_consumer_the_broker_cancels_is_declared_and_consumed_again() {
    let (lane, root, plugins) = setup!("amqp_broker_cancel");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    assert_eq!(
        lane.run(&["call", "f.ok", "[1]"])["ok"],
        serde_json::json!([1])
    );
    let deleted = lane.run(&["delete"]);
    assert!(
        deleted.get("deleted").is_some() || deleted.is_object(),
        "{deleted}"
    );
    w.wait_log("cancelled by the broker");
    w.wait_log_from(0, "consuming from");
    let out = lane.run(&["call", "f.ok", "[2]"]);
    assert_eq!(out["ok"], serde_json::json!([2]), "{out}");
}

/// A plugin's retry answer, as Celery's `self.retry(...)`: the task is published again with
/// `retries` + 1 until it succeeds; past `max_retries` it fails with its exception, or
/// `MaxRetriesExceededError` when it gave none.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_plugin_retries_a_task_as_celery_does() {
    let (lane, root, plugins) = setup!("amqp_retry");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));
    let began = std::time::Instant::now();
    let out = lane.run(&["call", "f.retry_until", "[2]"]);
    assert_eq!(out["ok"], serde_json::json!({"retries": 2}), "{out}");
    assert!(
        began.elapsed() >= std::time::Duration::from_secs(2),
        "each retry waits its countdown (1 s): {:?}",
        began.elapsed()
    );
    let out = lane.run(&["call", "f.retry_until", "[5, 1]"]);
    assert_eq!(
        out["exc_type"], "ConnectionError",
        "past max_retries: {out}"
    );
    assert_eq!(out["message"], "try again", "{out}");
    let out = lane.run(&["call", "f.retry_bare", "[5, 1]"]);
    assert_eq!(out["exc_type"], "MaxRetriesExceededError", "{out}");
}

/// `rabbitmqctl LIST --formatter json` as JSON rows.
fn rabbitmqctl(args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl runs (the broker's own CLI, beside the server)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// RabbitMQ 4.3's rules, as the broker itself reports what the worker declared: every queue
/// durable or exclusive (no transient shared queue), no deprecated argument, no global QoS.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_what_the_worker_declares_meets_rabbitmq_4_3_rules() {
    let (lane, root, plugins) = setup!("amqp_rmq43");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker_with(&plugins, &root.path().join("w.sock"), &["-E"]);
    assert_eq!(
        lane.run(&["call", "f.ok", "[1]"])["ok"],
        serde_json::json!([1])
    );
    const DEPRECATED: &[&str] = &[
        "x-ha-policy",
        "x-ha-nodes",
        "x-ha-params",
        "x-queue-master-locator",
        "x-queue-mode",
        "x-max-in-memory-length",
        "x-max-in-memory-bytes",
    ];
    let queues = rabbitmqctl(&["list_queues", "name", "durable", "exclusive", "arguments"]);
    let ours: Vec<&Value> = queues
        .iter()
        .filter(|q| {
            let name = q["name"].as_str().unwrap_or_default();
            name == lane.queue || name.starts_with(&lane.node) || name.starts_with("celery_delayed")
        })
        .collect();
    assert!(
        ours.len() >= 3,
        "the task queue, the pidbox, the delay queues: {ours:#?}"
    );
    for q in &ours {
        let exclusive =
            q["exclusive"].as_str().is_some_and(|s| !s.is_empty()) || q["exclusive"] == true;
        assert!(
            q["durable"] == true || exclusive,
            "durable or exclusive: {q}"
        );
        let args = q["arguments"].as_array().cloned().unwrap_or_default();
        for a in &args {
            let name = a[0].as_str().unwrap_or_default();
            assert!(
                !DEPRECATED.contains(&name),
                "deprecated argument {name}: {q}"
            );
        }
    }
    let conns = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
    let named = |c: &&Value| {
        c["client_properties"].as_array().is_some_and(|props| {
            props
                .iter()
                .any(|p| p[0] == "connection_name" && p[2] == lane.node.as_str())
        })
    };
    let pid = conns
        .iter()
        .find(named)
        .map(|c| c["pid"].clone())
        .unwrap_or_else(|| panic!("the worker's connection is named after its node: {conns:#?}"));
    let channels = rabbitmqctl(&["list_channels", "connection", "global_prefetch_count"]);
    let mine: Vec<&Value> = channels.iter().filter(|c| c["connection"] == pid).collect();
    assert!(!mine.is_empty(), "{channels:#?}");
    assert!(
        mine.iter().all(|c| c["global_prefetch_count"] == 0),
        "QoS is never global: {mine:#?}"
    );
}

/// Celery 5.5's native delayed delivery from a quorum, topic-exchange client: a countdown task
/// goes through `celery_delayed_27` ... `celery_delayed_delivery` to the queue (bound there
/// with `#.<routing key>`), and runs when due (3 s, within a second).
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_celery_clients_native_delayed_countdown_arrives_on_time() {
    let (lane, root, plugins) = setup!("amqp_native_delay");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--queue-type", "quorum", "--exchange-type", "topic"],
    );
    let env = [("QUEUE_TYPE", "quorum"), ("EXCHANGE_TYPE", "topic")];
    let out = client_with(&lane, &env, &["countdown", "f.ok", "[5]", "3"]);
    assert_eq!(out["ok"], serde_json::json!([5]), "{out}");
    let secs = out["seconds"].as_f64().unwrap();
    // 3 s +- 1 s from sending to the client holding the result.
    assert!(
        (2.0..=4.0).contains(&secs),
        "countdown 3 s answered after {secs} s"
    );
    eprintln!("countdown 3 s answered after {secs:.2} s");
}

/// A Celery 5.7 worker and this one on the same quorum queue: both declare the delay topology
/// the same way (neither refuses the other's), and countdown tasks sent by a Celery client are
/// each answered once, by whichever worker got them.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_side_by_side_with_a_celery_worker_countdown_tasks_are_answered_once() {
    let (lane, root, plugins) = setup!("amqp_side_by_side");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let env = [("QUEUE_TYPE", "quorum"), ("EXCHANGE_TYPE", "topic")];
    let node = format!("celery-{}", lane.node);
    let mut celery = std::process::Command::new(lane.python.parent().unwrap().join("celery"));
    celery
        .args(["-A", "cworker", "worker", "-Q", &lane.queue, "-n", &node])
        .args(["--pool", "solo", "--without-gossip", "--without-mingle"])
        .current_dir(repo().join("tests/celery"))
        .env("BROKER_URL", BROKER)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut celery = ChildGuard(celery.spawn().expect("celery worker starts"));
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--queue-type", "quorum", "--exchange-type", "topic"],
    );
    let out = client_with(&lane, &env, &["countdown_many", "f.ok", "[7]", "40", "1"]);
    let results = out["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 40, "{out}");
    let by_celery = results
        .iter()
        .filter(|r| r["ok"] == serde_json::json!(["celery", 7]))
        .count();
    let by_us = results
        .iter()
        .filter(|r| r["ok"] == serde_json::json!([7]))
        .count();
    assert_eq!(by_celery + by_us, 40, "every task answered: {out}");
    assert!(
        celery.0.try_wait().unwrap().is_none(),
        "the Celery worker still runs (it accepted the delay topology)"
    );
    eprintln!("celery worker ran {by_celery}, this worker {by_us}");
}

/// Kills a child process when the test ends, whatever happened.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A queue the broker refuses (here: passive declaration of a queue nobody declared yet) is a
/// configuration error, not a connection failure: named once at ERROR, shown as the broker's
/// state by `plugins list` and the metrics, tried again with backoff while the other queue is
/// served, and consumed as soon as it exists.
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_refused_queue_is_named_once_shown_as_broker_state_and_consumed_once_it_exists() {
    let (lane, root, plugins) = setup!("amqp_refused_queue");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let later = format!("{}-later", lane.queue);
    lane.run(&["declare"]);
    client_with_queue(&lane, &later, &["delete"]);
    let queues = format!("{},{later}", lane.queue);
    let args = [
        "--broker",
        BROKER,
        "-Q",
        &queues,
        "-n",
        &lane.node,
        "--queue-declare",
        "passive",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut w = Daemon::start_with(&plugins, &root.path().join("w.sock"), &args);
    let metrics = metrics_addr(&mut w);
    w.wait_log("consuming Celery tasks");
    let queue = |doc: &Value, name: &str| -> Value {
        doc["broker"]["queues"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let doc = w.wait_list("the new queue refused three times", |doc| {
        queue(doc, &later)["refusals"].as_u64().unwrap_or(0) >= 3
    });
    assert_eq!(doc["broker"]["state"], "connected", "{doc:#}");
    assert_eq!(queue(&doc, &lane.queue)["state"], "consuming", "{doc:#}");
    let refused = queue(&doc, &later);
    assert_eq!(refused["state"], "refused", "{doc:#}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("NOT_FOUND"),
        "the broker's words: {refused}"
    );
    let listing = text(&output(&mut w.cli(&["plugins", "list"])).stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains(&format!("queue {later}: REFUSED")) && l.contains("NOT_FOUND")),
        "{listing}"
    );
    let (_, _, body) = scrape(&metrics);
    let sample = |name: &str, queue: &str| -> Option<f64> {
        let prefix = format!("{name}{{queue=\"{queue}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(
        sample("worker_broker_queue_consuming", &later),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample("worker_broker_queue_consuming", &lane.queue),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample("worker_broker_queue_refusals_total", &later).unwrap_or(0.0) >= 3.0,
        "{body}"
    );
    // The other queue is served meanwhile.
    assert_eq!(
        lane.run(&["call", "f.ok", "[1]"])["ok"],
        serde_json::json!([1])
    );
    let logs = w.drain_log();
    let named: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(&format!("cannot consume from {later}")))
        .collect();
    assert_eq!(named.len(), 1, "named once over 3 refusals: {named:#?}");
    assert!(
        !logs.iter().any(|l| l.contains("reconnecting")),
        "no reconnect over a refused queue: {logs:#?}"
    );

    // Once the queue exists, the next try consumes it and says so.
    client_with_queue(&lane, &later, &["declare"]);
    w.wait_list("the new queue consumed", |doc| {
        queue(doc, &later)["state"] == "consuming"
    });
    w.wait_log("which the broker had refused");
    let out = client_with_queue(&lane, &later, &["call", "f.ok", "[2]"]);
    assert_eq!(out["ok"], serde_json::json!([2]), "{out}");
    let (_, _, body) = scrape(&metrics);
    assert!(
        body.contains(&format!(
            "worker_broker_queue_consuming{{queue=\"{later}\"}} 1"
        )),
        "{body}"
    );
}

/// The lane's client on another `queue`; the JSON of its last line.
fn client_with_queue(lane: &Lane, queue: &str, args: &[&str]) -> Value {
    last_json(&mut lane.client_on(queue, args))
}

/// A task redelivered from a quorum queue tells the plugin so: `redelivered` and the broker's
/// `x-delivery-count` (RabbitMQ 4 drops a message after 20 deliveries unless it is
/// dead-lettered, so a plugin may want to know how close it is).
#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_redelivered_quorum_task_tells_the_plugin_its_delivery_count() {
    let (lane, root, plugins) = setup!("amqp_delivery_count");
    context_plugin(&plugins);
    let mut send = lane.client(&["send_wait", "ctx.where", "[]"]);
    send.env("QUEUE_TYPE", "quorum");
    let mut client = Watched::spawn(send);
    client.wait("the id of the task sent", |l| l.contains("\"id\""));
    // Before any worker consumes it, another consumer takes the message and gives it back.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(within(
        std::time::Duration::from_secs(30),
        take_and_requeue(&lane.queue),
    ));
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--queue-type", "quorum"],
    );
    let answer = client.wait("the task's result", |l| l.contains("\"ok\""));
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let info = &answer["ok"]["request"]["delivery_info"];
    assert_eq!(info["redelivered"], true, "{answer}");
    assert_eq!(info["delivery_count"], 1, "{answer}");
}

/// Takes the first message of `queue` (waiting for one) and rejects it with requeue.
async fn take_and_requeue(queue: &str) {
    use lapin::options::{BasicGetOptions, BasicRejectOptions};
    let conn = lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default())
        .await
        .expect("the broker");
    let channel = conn.create_channel().await.expect("a channel");
    let message = loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await;
        match got {
            Ok(Some(m)) => break m,
            // Not there yet (or the queue is being declared): look again.
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    message
        .delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .expect("the reject");
    let _ = conn.close(200, "done".into()).await;
}
