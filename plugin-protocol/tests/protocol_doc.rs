//! Every message shown in PROTOCOL.md parses, round-trips byte-for-byte as JSON, and fits the
//! typed params/results of its method, so the spec and the code cannot drift apart.

use plugin_protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// `(kind, line)` for each ```json wire=KIND block.
fn examples() -> Vec<(String, String)> {
    let doc = include_str!("../PROTOCOL.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(kind) = line.strip_prefix("```json wire=") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            assert_eq!(body.len(), 1, "one message per block ({kind})");
            out.push((kind.to_string(), body[0].to_string()));
        }
    }
    out
}

fn typed<T: Serialize + DeserializeOwned>(v: &Value) {
    let t: T =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v} does not fit: {e}"));
    assert_eq!(
        &serde_json::to_value(t).unwrap(),
        v,
        "round trip through the typed form"
    );
}

#[test]
fn every_documented_message_matches_the_types() {
    let examples = examples();
    assert!(
        examples.len() >= 15,
        "found only {} examples",
        examples.len()
    );
    for (kind, line) in examples {
        let msg = Message::parse(line.as_bytes()).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let original: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(msg.to_value(), original, "{kind} round-trips");
        let (method, part) = kind
            .rsplit_once('.')
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .unwrap_or((kind.clone(), String::new()));
        match (msg, part.as_str()) {
            (Message::Request(r), "params") => {
                assert_eq!(r.method, method);
                match method.as_str() {
                    method::INITIALIZE => typed::<InitializeParams>(&r.params),
                    method::TASK_RUN => typed::<TaskRunParams>(&r.params),
                    method::TASK_OFFER => typed::<TaskOfferParams>(&r.params),
                    method::RESULT_STORE => typed::<ResultStoreParams>(&r.params),
                    method::PING | method::SHUTDOWN => {}
                    other => panic!("undocumented request {other}"),
                }
            }
            (Message::Response(r), "result") => {
                let v = r.result.expect("a result");
                match method.as_str() {
                    method::INITIALIZE => typed::<InitializeResult>(&v),
                    method::TASK_OFFER => typed::<TaskFinal>(&v),
                    _ => {}
                }
            }
            (Message::Response(r), "error") => {
                let e = r.result.expect_err("an error");
                let data = e.data.as_ref().expect("error data");
                match e.code {
                    code::TASK_FAILED | code::TASK_CANCELLED => typed::<TaskErrorData>(data),
                    code::TASK_RETRY => typed::<TaskRetryData>(data),
                    code::SHUTTING_DOWN if method == method::TASK_OFFER => {
                        typed::<OfferRefusedData>(data)
                    }
                    other => panic!("undocumented error code {other}"),
                }
            }
            (Message::Notification(n), _) => {
                // Notification kinds carry no part suffix except dotted method names.
                let method = kind.clone();
                assert_eq!(n.method, method);
                match n.method.as_str() {
                    method::TASK_PROGRESS => typed::<TaskProgressParams>(&n.params),
                    method::TASK_STREAM => typed::<TaskStreamParams>(&n.params),
                    method::TASK_CANCEL => typed::<TaskCancelParams>(&n.params),
                    method::LOG => typed::<LogParams>(&n.params),
                    method::EVENT => typed::<EventParams>(&n.params),
                    method::OFFER_PROGRESS => typed::<OfferProgressParams>(&n.params),
                    method::OFFER_STREAM => typed::<OfferStreamParams>(&n.params),
                    method::INITIALIZED | method::EXIT => {}
                    other => panic!("undocumented notification {other}"),
                }
            }
            (other, _) => panic!("{kind}: unexpected message {other:?}"),
        }
    }
}
