//! What a task message says, read and bounded before anything else touches it: the AMQP
//! properties and headers, the body, and the limits every broker user is held to. Pure (no
//! broker, no clock but the one passed in), so the whole decode path, from properties to the
//! request the dispatcher sees, is fuzzed in its test module.
//!
//! Every producer on the broker is untrusted: a message that breaks a limit here is refused
//! (rejected without requeue, one log line) before it can hold memory, a prefetch slot or a
//! lock. Ids must fit AMQP's short string (255 bytes), because the worker publishes them back
//! as one (reply routing key, correlation id), and headers may nest only so deep.

use super::value::{table_to_json, TooDeep};
use crate::source::celery::{CeleryTask, Envelope};
use crate::source::engine::request::{read_task, DeliveryFacts, Unreadable};
use crate::source::engine::ActiveInfo;
use lapin::BasicProperties;

use serde_json::{Map, Value};

/// How deep a header value may nest (tables and arrays); Celery's own headers nest 3 deep.
pub const MAX_HEADER_DEPTH: usize = 32;

/// One delivery's parts, as lapin hands them over.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub redelivered: bool,
    pub properties: &'a BasicProperties,
    pub body: &'a [u8],
}

/// Why a message is refused before it runs (logged with its queue and delivery tag).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the message is {size} bytes, over `max_message_size` ({max} bytes); raise it in worker.toml if such tasks are legitimate")]
    TooLarge { size: usize, max: usize },
    #[error("its headers nest deeper than {MAX_HEADER_DEPTH} levels")]
    HeadersTooDeep,
    /// The connection's frame guard replaced the headers before they were parsed.
    #[error("its headers were dropped unread: {0}")]
    HeadersDropped(String),
    #[error(transparent)]
    Task(#[from] Unreadable),
}

/// Reads a task message, holding it to the limits. `node` is this worker's name (for
/// `inspect active`), `now` the time it arrived (epoch seconds).
pub fn read(
    m: &Inbound,
    max_message_size: usize,
    node: &str,
    now: f64,
) -> Result<(CeleryTask, ActiveInfo), Refusal> {
    if m.body.len() > max_message_size {
        return Err(Refusal::TooLarge {
            size: m.body.len(),
            max: max_message_size,
        });
    }
    let props = m.properties;
    let headers = match props.headers() {
        Some(h) => match table_to_json(h, MAX_HEADER_DEPTH) {
            Ok(Value::Object(map)) => map,
            Ok(_) => Map::new(),
            Err(TooDeep) => return Err(Refusal::HeadersTooDeep),
        },
        None => Map::new(),
    };
    if let Some(reason) = headers.get(super::frame_guard::REFUSED) {
        let reason = reason.as_str().unwrap_or_default().to_string();
        return Err(Refusal::HeadersDropped(reason));
    }
    let delivery_count = headers.get("x-delivery-count").and_then(Value::as_u64);
    let env = Envelope {
        headers,
        body: m.body,
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str()),
    };
    let facts = DeliveryFacts {
        queue: m.queue,
        exchange: m.exchange,
        routing_key: m.routing_key,
        priority: *props.priority(),
        redelivered: m.redelivered,
        delivery_count,
    };
    Ok(read_task(&env, &facts, node, now)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::engine::request::task_request;
    use crate::source::engine::MAX_ID_BYTES;
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    use proptest::prelude::*;
    use serde_json::json;
    use std::time::Duration;

    const MAX: usize = 1 << 20;

    fn inbound<'a>(properties: &'a BasicProperties, body: &'a [u8]) -> Inbound<'a> {
        Inbound {
            queue: "q",
            exchange: "",
            routing_key: "q",
            redelivered: false,
            properties,
            body,
        }
    }

    fn v2(id: &str) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("task".into(), AMQPValue::LongString("t".into()));
        h.insert("id".into(), AMQPValue::LongString(id.into()));
        BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into())
    }

    #[test]
    fn an_ordinary_task_reads_into_the_request_the_dispatcher_sees() {
        let props = v2("abc").with_reply_to("rq".into());
        let (task, info) = read(&inbound(&props, b"[[1], {\"k\": 2}, {}]"), MAX, "n@h", 1.0)
            .expect("a valid task");
        assert_eq!((task.id.as_str(), task.name.as_str()), ("abc", "t"));
        let request = task_request(&task, &info, "amqp", (None, Some(Duration::from_secs(3))));
        assert_eq!(*request.args, vec![json!(1)]);
        assert_eq!(request.kwargs["k"], json!(2));
        assert_eq!(request.hard_time_limit, Some(Duration::from_secs(3)));
        assert_eq!(request.submitter, "amqp: queue q");
    }

    #[test]
    fn long_ids_deep_headers_and_large_bodies_are_refused() {
        let body = b"[[], {}, {}]";
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let refused =
            |p: &BasicProperties, max: usize| read(&inbound(p, body), max, "n", 0.0).map(|_| ());
        assert!(matches!(
            refused(&v2(&long), MAX),
            Err(Refusal::Task(Unreadable::TooLong {
                field: "task id",
                ..
            }))
        ));
        let p = v2("a").with_reply_to(ShortString::from("r".repeat(255)));
        assert!(refused(&p, MAX).is_ok(), "255 bytes fit");
        let p = v2("a").with_correlation_id(ShortString::from("c".repeat(255)));
        assert!(refused(&p, MAX).is_ok());
        let mut h = FieldTable::default();
        h.insert("task".into(), AMQPValue::LongString("t".into()));
        h.insert("id".into(), AMQPValue::LongString("a".into()));
        h.insert(
            "parent_id".into(),
            AMQPValue::LongString(long.clone().into()),
        );
        let p = BasicProperties::default().with_headers(h);
        assert!(matches!(
            refused(&p, MAX),
            Err(Refusal::Task(Unreadable::TooLong {
                field: "parent_id",
                ..
            }))
        ));
        assert_eq!(
            refused(&v2("a"), 4),
            Err(Refusal::TooLarge { size: 12, max: 4 })
        );
        let mut deep = AMQPValue::Void;
        for _ in 0..MAX_HEADER_DEPTH + 1 {
            let mut a = FieldArray::default();
            a.push(deep);
            deep = AMQPValue::FieldArray(a);
        }
        let mut h = FieldTable::default();
        h.insert("task".into(), AMQPValue::LongString("t".into()));
        h.insert("deep".into(), deep);
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(refused(&p, MAX), Err(Refusal::HeadersTooDeep));
    }

    /// Any AMQP value, nested up to `depth` (past the header limit, to hit it).
    fn amqp_value(depth: u32) -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f64>().prop_map(AMQPValue::Double),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            ".{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(depth, 256, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(|v| {
                    let mut a = FieldArray::default();
                    for x in v {
                        a.push(x);
                    }
                    AMQPValue::FieldArray(a)
                }),
                proptest::collection::btree_map("[a-z_]{0,12}", inner, 0..6).prop_map(|m| {
                    let mut t = FieldTable::default();
                    for (k, v) in m {
                        t.insert(ShortString::from(k), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    /// Header values that Celery's decoder reads, mixed with arbitrary ones.
    fn header(key: &'static str) -> impl Strategy<Value = (String, AMQPValue)> {
        let text = prop_oneof![
            "[a-f0-9-]{0,40}",
            Just("2026-12-04T10:00:00+00:00".to_string()),
            Just("9999-99-99".to_string()),
            "x{250,260}",
        ];
        prop_oneof![
            text.prop_map(|s| AMQPValue::LongString(LongString::from(s))),
            amqp_value(40),
        ]
        .prop_map(move |v| (key.to_string(), v))
    }

    fn properties() -> impl Strategy<Value = BasicProperties> {
        let keys = [
            "task",
            "id",
            "eta",
            "expires",
            "timelimit",
            "retries",
            "parent_id",
            "root_id",
            "group",
            "group_index",
            "ignore_result",
            "argsrepr",
        ];
        let headers = keys.map(|k| proptest::option::of(header(k)));
        (
            headers,
            proptest::option::of(prop_oneof![Just("application/json".to_string()), ".{0,20}"]),
            proptest::option::of("[ -~]{0,300}"),
            proptest::option::of("[ -~]{0,300}"),
            proptest::option::of(any::<u8>()),
        )
            .prop_map(|(headers, ct, reply_to, corr, prio)| {
                let mut table = FieldTable::default();
                for (k, v) in headers.into_iter().flatten() {
                    table.insert(ShortString::from(k), v);
                }
                let mut p = BasicProperties::default().with_headers(table);
                if let Some(ct) = ct {
                    p = p.with_content_type(ShortString::from(ct));
                }
                // The broker hands over short strings only; longer ones cannot arrive.
                if let Some(r) = reply_to.filter(|r| r.len() <= 255) {
                    p = p.with_reply_to(ShortString::from(r));
                }
                if let Some(c) = corr.filter(|c| c.len() <= 255) {
                    p = p.with_correlation_id(ShortString::from(c));
                }
                if let Some(prio) = prio {
                    p = p.with_priority(prio);
                }
                p
            })
    }

    /// Bodies: Celery-shaped JSON with arbitrary parts, and arbitrary bytes.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let json_value =
            any::<i64>()
                .prop_map(|n| json!(n))
                .boxed()
                .prop_recursive(6, 64, 4, |inner| {
                    prop_oneof![
                        proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                        proptest::collection::btree_map(
                            prop_oneof![
                                Just("chain".to_string()),
                                Just("callbacks".to_string()),
                                Just("errbacks".to_string()),
                                Just("chord".to_string()),
                                Just("task".to_string()),
                                Just("options".to_string()),
                                Just("args".to_string()),
                                "[a-z]{0,6}"
                            ],
                            inner,
                            0..4
                        )
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                        ".{0,12}".prop_map(Value::String),
                    ]
                });
        prop_oneof![
            json_value
                .prop_map(|v| serde_json::to_vec(&json!([[v.clone()], {"k": v}, {}])).unwrap()),
            proptest::collection::vec(any::<u8>(), 0..200),
            Just(b"[[], {}, {\"chain\": [{\"task\": \"n\", \"options\": {}}]}]".to_vec()),
            "\\[{0,200}".prop_map(String::into_bytes),
        ]
    }

    /// Whatever a producer sends, reading it never panics: it is refused with a reason, or
    /// read into a task whose ids fit a short string and whose request can be built. (Run on
    /// a thread with a large stack: generating 40-deep values recurses through proptest's
    /// strategies, more than a test thread's default stack holds in an unoptimised build.)
    #[test]
    fn any_message_is_read_or_refused_never_a_panic() {
        let run = || {
            let config = ProptestConfig {
                cases: 3000,
                ..ProptestConfig::default()
            };
            let mut runner = proptest::test_runner::TestRunner::new(config);
            let inputs = (properties(), body(), any::<bool>());
            let ran = runner.run(&inputs, |(props, body, redelivered)| {
                let m = Inbound {
                    queue: "q",
                    exchange: "x",
                    routing_key: "k",
                    redelivered,
                    properties: &props,
                    body: &body,
                };
                match read(&m, MAX, "node@host", 1.5) {
                    Ok((task, info)) => {
                        prop_assert!(task.id.len() <= MAX_ID_BYTES && !task.id.is_empty());
                        prop_assert!(task.correlation_id.len() <= MAX_ID_BYTES);
                        let request = task_request(&task, &info, "amqp", (None, None));
                        prop_assert_eq!(&request.id, &task.id);
                        let _ = serde_json::to_string(&info).expect("inspect active serializes");
                    }
                    Err(refusal) => prop_assert!(!refusal.to_string().is_empty()),
                }
                Ok(())
            });
            ran.map_err(|e| e.to_string())
        };
        let outcome = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(run)
            .expect("a test thread")
            .join()
            .expect("no panic");
        outcome.expect("every generated message is read or refused");
    }
}
