//! No input path can panic. The decoders a peer can reach (a plugin's stdout line, a control
//! request, a Celery message, a manifest) are fed arbitrary bytes and arbitrary JSON of the
//! right rough shape, plus a corpus of the cases a security review found: each must give a
//! value or an error, never a panic.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::path::Path;
use worker::control::SubmitParams;
use worker::manifest::Manifest;
use worker::source::celery::{self, Envelope};

/// Any JSON value, a few levels deep, with the numbers that break naive code.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            any::<f64>(),
            Just(1e308),
            Just(-1e308),
            Just(1e300),
            Just(f64::MAX),
            Just(5e-324)
        ]
        .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object with the keys of a Celery task message's headers, values arbitrary.
fn celery_headers() -> impl Strategy<Value = Map<String, Value>> {
    let keys = [
        "task",
        "id",
        "eta",
        "expires",
        "timelimit",
        "retries",
        "lang",
        "ignore_result",
    ];
    prop::collection::vec(any_json(), keys.len()).prop_map(move |values| {
        keys.iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    })
}

fn decode_celery(headers: Map<String, Value>, body: &[u8]) {
    let env = Envelope {
        headers,
        body,
        content_type: Some("application/json"),
        correlation_id: Some("c"),
        reply_to: Some("r"),
    };
    let _ = celery::decode(&env);
}

fn parse_submit(v: Value) {
    if let Ok(p) = serde_json::from_value::<SubmitParams>(v) {
        for s in [p.soft_time_limit, p.hard_time_limit].into_iter().flatten() {
            let _ = worker::task::time_limit("limit", s);
        }
    }
}

const MANIFEST: &str = "name = \"p\"\nversion = \"1\"\ncommand = [\"./run\"]\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn plugin_lines_of_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = plugin_protocol::Message::parse(&bytes);
    }

    #[test]
    fn plugin_lines_of_any_json(v in any_json(), id in any_json(), method in ".{0,8}") {
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": v.clone(), "result": v});
        let _ = plugin_protocol::Message::parse(line.to_string().as_bytes());
    }

    #[test]
    fn control_requests(v in any_json(), name in ".{0,8}", soft in any::<f64>(), hard in any::<f64>()) {
        parse_submit(v);
        parse_submit(json!({"name": name, "soft_time_limit": soft, "hard_time_limit": hard}));
    }

    #[test]
    fn celery_messages(headers in celery_headers(), body in any_json(), raw in prop::collection::vec(any::<u8>(), 0..200)) {
        decode_celery(headers.clone(), body.to_string().as_bytes());
        decode_celery(headers, &raw);
    }

    #[test]
    fn manifests_of_any_text(text in "(?s).{0,400}") {
        let _ = Manifest::parse(&text, Path::new("/p"));
    }

    #[test]
    fn manifest_numbers(x in prop_oneof![any::<f64>(), Just(1e300), Just(-0.0), Just(f64::MAX)], n in any::<i64>()) {
        let text = format!(
            "{MANIFEST}instances = {n}\n[timeouts]\ntask_hard = {x:e}\nping_interval = {x:e}\n[restart]\nbackoff_max = {x:e}\n[[tasks]]\nname = \"t\"\n"
        );
        let _ = Manifest::parse(&text, Path::new("/p"));
    }
}

/// The cases the review found, each now a clear error.
#[test]
fn the_reviewed_inputs_are_refused_with_the_field_and_range() {
    let e = worker::task::time_limit("hard_time_limit", 1e308).unwrap_err();
    assert!(
        e.contains("`hard_time_limit` is 1e308") && e.contains("30 days"),
        "{e}"
    );

    let text = format!("{MANIFEST}[timeouts]\ntask_hard = 1e300\n[[tasks]]\nname = \"t\"\n");
    let e = Manifest::parse(&text, Path::new("/p"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key `timeouts.task_hard`") && e.contains("30 days"),
        "{e}"
    );

    let mut headers = Map::new();
    headers.insert("task".into(), json!("t"));
    headers.insert("id".into(), json!("i"));
    headers.insert("timelimit".into(), json!([1e300, null]));
    let env = Envelope {
        headers,
        body: b"[[], {}, {}]",
        content_type: Some("application/json"),
        correlation_id: Some("c"),
        reply_to: Some("r"),
    };
    let e = celery::decode(&env).unwrap_err().to_string();
    assert!(e.contains("`timelimit` is 1e300"), "{e}");
}
