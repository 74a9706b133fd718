//! The Redis result backend with the real Celery client configured `backend="redis://..."`
//! and a real `redis-server` of the test's own: results, failures, progress and streamed
//! items, the stored key and its TTL, and an outage mid-batch that loses no result.

mod common;

use common::broker::RedisServer;
use common::*;
use serde_json::{json, Value};

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_redis_backend_holds_results_failures_and_custom_states() {
    let (mut lane, root, plugins) = setup!("amqp_redis");
    common::broker::redis_python("amqp_redis");
    let redis = RedisServer::start();
    lane.result_backend = Some(redis.url());
    common::broker::fib_plugin(&plugins);
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &redis.url()],
    );

    let out = lane.run(&["call_id", "fibonacci", "[26]"]);
    assert_eq!(out["ok"], 121393, "{out}");
    let key = format!("celery-task-meta-{}", out["id"].as_str().unwrap());
    let stored: Value = serde_json::from_str(&redis.cli(&["get", &key])).unwrap();
    assert_eq!(stored["status"], "SUCCESS");
    assert_eq!(stored["result"], 121393);
    let ttl: u64 = redis.cli(&["ttl", &key]).parse().unwrap();
    assert!(
        (86_000..=86_400).contains(&ttl),
        "result_expires: a day by default, got {ttl}"
    );

    // Another client process reads it back through `AsyncResult.state` / `.info`.
    let id = out["id"].as_str().unwrap();
    assert_eq!(
        lane.run(&["state", id]),
        json!({"state": "SUCCESS", "info": 121393})
    );

    let out = lane.run(&["call_id", "fibonacci", "[-1]"]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    let seen = lane.run(&["state", out["id"].as_str().unwrap()]);
    assert_eq!(seen["state"], "FAILURE");
    assert_eq!(seen["info"]["exc_type"], "ValueError", "{seen}");

    let out = lane.run(&["messages", "fibonacci", "[5]", "{\"stream\": true}"]);
    assert_eq!(out["ok"], 5, "{out}");
    let states: Vec<&str> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"STREAM") && states.contains(&"PROGRESS"),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&"SUCCESS"));
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_redis_outage_mid_batch_loses_no_result() {
    let (mut lane, root, plugins) = setup!("amqp_redis_outage");
    common::broker::redis_python("amqp_redis_outage");
    let mut redis = RedisServer::start();
    lane.result_backend = Some(redis.url());
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &redis.url()],
    );
    // 300 tasks of 20 ms on one instance: about 6 s of work for the outage to cut through.
    let n = 300;
    let sent = lane.run(&["send_many", "f.sleep", "[0.02]", &n.to_string()]);
    let ids = root.path().join("ids.json");
    std::fs::write(&ids, sent["ids"].to_string()).unwrap();
    // Once some results are stored (each look is a redis-cli process, which paces the looks)...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while redis.cli(&["dbsize"]).parse::<u64>().unwrap_or(0) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no results were stored"
        );
    }
    redis.stop();
    // ...Redis is away for 3 s: the fault itself, not a wait for something to pass.
    std::thread::sleep(std::time::Duration::from_secs(3));
    redis.resume();
    let out = lane.run(&["collect", &ids.display().to_string()]);
    assert_eq!(out, json!({"ok": n, "failed": []}));
    w.wait_log("cannot store the result in Redis");
    w.wait_log("result stored after");
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_chords_run_their_body_once_with_every_result_in_order() {
    let (mut lane, root, plugins) = setup!("amqp_chord");
    common::broker::redis_python("amqp_chord");
    let redis = RedisServer::start();
    lane.result_backend = Some(redis.url());
    common::broker::fib_plugin(&plugins);
    faulty_plugin(&plugins, "faulty", &[], "", "");
    rust_plugin(&plugins, "");
    let _w = lane.worker_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--result-backend", &redis.url()],
    );
    // A chord as a chain's step: the worker opens it in Redis and sends its header with the
    // parent's result (5) first; the body gets the three results in order.
    let out = lane.run(&["canvas", "chain_chord"]);
    let parts: Vec<Value> = (0..3)
        .map(|i| json!({"args": [5, i], "kwargs": {}}))
        .collect();
    assert_eq!(out, json!({"ok": [parts]}));
    // The body (f.ok, which returns its arguments) gets one argument: the ten results.
    let out = lane.run(&["canvas", "chord"]);
    assert_eq!(out, json!({"ok": [[0, 1, 1, 2, 3, 5, 8, 13, 21, 34]]}));
    // A failed part: the client raises it (Celery's client checks the header first), and the
    // body is stored as failed with a ChordError naming the part.
    let out = lane.run(&["canvas", "chord_fails"]);
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    let key = format!("celery-task-meta-{}", out["body_id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let body: Value = loop {
        // Each look is a redis-cli process, which paces the looks.
        if let Ok(v) = serde_json::from_str(&redis.cli(&["get", &key])) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the body's state never came"
        );
    };
    assert_eq!(body["status"], "FAILURE");
    assert_eq!(body["result"]["exc_type"], "ChordError");
    let why = body["result"]["exc_message"][0].as_str().unwrap();
    assert!(
        why.starts_with("Dependency ") && why.contains("raised ValueError("),
        "{why}"
    );
}
