//! Celery's canvas through the worker, with the real client: a chain across two plugins, a
//! chain whose middle step fails (the errback runs, the client raises), `link`, a group, and a
//! group as a chain's last step. Real RabbitMQ, rpc:// results.

mod common;

use common::broker::notes;
use common::*;
use serde_json::{json, Value};

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_chains_links_errbacks_and_groups_run_as_in_celery() {
    let (lane, root, plugins) = setup!("amqp_canvas");
    common::broker::fib_plugin(&plugins);
    rust_plugin(&plugins, "");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let _w = lane.worker(&plugins, &root.path().join("w.sock"));

    // fibonacci(10) = 55 goes to rust.echo ahead of its own "x"; the immutable last step keeps
    // its 12.
    let out = lane.run(&["canvas", "chain"]);
    assert_eq!(out["ok"], 144, "{out}");
    assert_eq!(out["middle"], json!({"args": [55, "x"], "kwargs": {}}));

    let errback = root.path().join("errback.jsonl");
    let out = lane.run(&["canvas", "chain_fails", &errback.display().to_string()]);
    assert_eq!(
        out["exc_type"], "ValueError",
        "the client waiting on the last step raises: {out}"
    );
    let failed_id = out["failed_id"].as_str().unwrap();
    assert_eq!(
        notes(&errback, 1),
        [json!([failed_id, errback.display().to_string()])],
        "the errback got the failed task's id"
    );

    let linked = root.path().join("link.jsonl");
    let out = lane.run(&["canvas", "link", &linked.display().to_string()]);
    assert_eq!(out, json!({"ok": 55}));
    assert_eq!(
        notes(&linked, 1),
        [json!([55, linked.display().to_string()])]
    );

    let out = lane.run(&["canvas", "group"]);
    let want: Vec<Value> = (0..20)
        .map(|i| json!({"args": [i], "kwargs": {}}))
        .collect();
    assert_eq!(out["ok"], json!(want), "{out}");

    let out = lane.run(&["canvas", "chain_group"]);
    let want: Vec<Value> = (0..20)
        .map(|i| json!({"args": [55, i], "kwargs": {}}))
        .collect();
    assert_eq!(out["ok"], json!(want), "{out}");
}
