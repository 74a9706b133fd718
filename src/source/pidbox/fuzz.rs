//! A storm of remote-control requests for tests: arbitrary bodies shaped like Celery's pidbox
//! messages (and arbitrary bytes) through `parse`, `addressed_to` and `handle`.

use super::*;
use crate::supervisor::pool::Scale;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Every method `handle` knows, and the ones other workers send.
const METHODS: &[&str] = &[
    "ping",
    "registered",
    "active",
    "reserved",
    "scheduled",
    "stats",
    "active_queues",
    "revoked",
    "dump_revoked",
    "query_task",
    "conf",
    "dump_conf",
    "add_consumer",
    "cancel_consumer",
    "pool_grow",
    "pool_shrink",
    "autoscale",
    "rate_limit",
    "time_limit",
    "report",
    "revoke",
    "terminate",
    "shutdown",
    "enable_events",
    "disable_events",
    "heartbeat",
    "hello",
    "clock",
];
/// Every argument a method reads.
const ARGUMENTS: &[&str] = &[
    "task_name",
    "rate_limit",
    "soft",
    "hard",
    "n",
    "max",
    "min",
    "queue",
    "exchange",
    "exchange_type",
    "routing_key",
    "task_id",
    "ids",
    "terminate",
    "signal",
];
const STRINGS: &[&str] = &[
    "",
    "t",
    "tasks.add",
    "10/s",
    "1e-300/s",
    "1e-19/s",
    "1e-300",
    "1e300/s",
    "1e-400/s",
    "inf",
    "-inf",
    "nan",
    "NaN",
    "-1/s",
    "1/d",
    "1/",
    "/",
    "0",
    "-0",
    "0.0001/h",
    "1/hour",
    "9999999999999999999999",
    "-9223372036854775809",
    "worker@a",
    "worker@*",
    "(",
    "\u{0}",
    "'",
    "\"",
    "é/s",
];
const NUMBERS: &[f64] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e-300,
    1e-19,
    1e300,
    -1e300,
    f64::MAX,
    f64::MIN,
    5e-324,
    f64::EPSILON,
    86_400.0,
    2_592_000.0,
    2_592_000.5,
    1e9,
    4.2e18,
    1.9e19,
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        // NaN and the infinities become null, as JSON has no word for them.
        1 => any::<f64>().prop_map(Value::from),
        2 => prop::sample::select(NUMBERS).prop_map(Value::from),
        3 => prop::sample::select(STRINGS).prop_map(Value::from),
        1 => ".{0,24}".prop_map(Value::from),
        1 => ("[0-9e./smh-]{1,4}", 0..20_000usize).prop_map(|(s, n)| Value::from(s.repeat(n))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn name(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_string),
        1 => ".{0,16}",
    ]
}

fn arguments() -> impl Strategy<Value = Value> {
    prop_oneof![
        9 => prop::collection::btree_map(name(ARGUMENTS), value(), 0..6)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => value(),
    ]
}

/// A body shaped like Celery's pidbox message, any field missing or of the wrong type.
fn body() -> impl Strategy<Value = Value> {
    let field = |s: BoxedStrategy<Value>| prop::option::weighted(0.8, s);
    let request = (
        field(prop_oneof![9 => name(METHODS).prop_map(Value::from), 1 => value()].boxed()),
        field(arguments().boxed()),
        field(value().boxed()),
        field(
            prop_oneof![
                (".{0,12}", ".{0,12}").prop_map(|(e, k)| json!({"exchange": e, "routing_key": k})),
                value(),
            ]
            .boxed(),
        ),
        field(value().boxed()),
        field(
            prop_oneof![
                Just(json!("worker@*")),
                Just(json!("(")),
                ".{0,12}".prop_map(Value::from)
            ]
            .boxed(),
        ),
        field(prop_oneof![Just(json!("pcre")), Just(json!("glob")), value()].boxed()),
    )
        .prop_map(
            |(method, args, destination, reply_to, ticket, pattern, matcher)| {
                let mut m = Map::new();
                for (k, v) in [
                    ("method", method),
                    ("arguments", args),
                    ("destination", destination),
                    ("reply_to", reply_to),
                    ("ticket", ticket),
                    ("pattern", pattern),
                    ("matcher", matcher),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                Value::Object(m)
            },
        );
    // Most of the values that reach the worker's own state: task limits.
    let limits = (
        prop::sample::select(&["rate_limit", "time_limit"][..]),
        name(&["t", "tasks.add"]),
        value(),
        value(),
        value(),
    )
        .prop_map(|(method, task, rate, soft, hard)| {
            json!({
                "method": method,
                "arguments": {"task_name": task, "rate_limit": rate, "soft": soft, "hard": hard},
                "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"},
                "ticket": "t-1",
            })
        });
    prop_oneof![12 => request, 6 => limits, 1 => value()]
}

/// A worker that answers everything from memory; `rate_limit` and `time_limit` go to the
/// given functions, so a test can put the real task controls behind them.
pub(in crate::source) struct FakeWorker<'a> {
    pub rate_limit: Box<RateLimit<'a>>,
    pub time_limit: Box<TimeLimit<'a>>,
}

/// `rate_limit(task, rate)`'s reply.
pub(in crate::source) type RateLimit<'a> = dyn Fn(&str, &Value) -> Value + Sync + 'a;
/// `time_limit(task, soft, hard)`'s reply.
pub(in crate::source) type TimeLimit<'a> = dyn Fn(&str, &Value, &Value) -> Value + Sync + 'a;

impl RemoteWorker for FakeWorker<'_> {
    fn registered(&self) -> Vec<String> {
        vec!["t".into(), "tasks.add".into()]
    }
    fn active(&self) -> Vec<Value> {
        vec![json!({"id": "1", "name": "t"})]
    }
    fn reserved(&self) -> Vec<Value> {
        Vec::new()
    }
    fn active_queues(&self) -> Vec<Value> {
        vec![json!({"name": "celery"})]
    }
    async fn stats(&self) -> Value {
        json!({"total": {}})
    }
    async fn revoke(&self, _ids: &[String], _terminate: bool) {}
    fn request_shutdown(&self) {}
    fn enable_events(&self) -> Value {
        json!({"ok": "task events enabled"})
    }
    fn disable_events(&self) -> Value {
        json!({"ok": "task events disabled"})
    }
    fn heartbeat(&self) {}
    fn revoked(&self) -> Vec<String> {
        vec!["1".into()]
    }
    fn query_task(&self, ids: &[String]) -> Map<String, Value> {
        ids.iter()
            .map(|id| (id.clone(), json!(["active", {"id": id}])))
            .collect()
    }
    fn conf(&self) -> Map<String, Value> {
        Map::from_iter([(
            "broker_url".to_string(),
            json!("amqp://guest:**@localhost//"),
        )])
    }
    fn report(&self) -> String {
        "software -> worker".into()
    }
    fn rate_limit(&self, task: &str, rate: &Value) -> Value {
        (self.rate_limit)(task, rate)
    }
    fn time_limit(&self, task: &str, soft: &Value, hard: &Value) -> Value {
        (self.time_limit)(task, soft, hard)
    }
    async fn add_consumer(
        &self,
        queue: &str,
        _exchange: Option<&str>,
        _kind: Option<&str>,
        _key: Option<&str>,
    ) -> Value {
        json!({"ok": format!("add consumer {queue}")})
    }
    fn cancel_consumer(&self, queue: &str) -> Value {
        json!({"ok": format!("no longer consuming from {queue}")})
    }
    async fn scale(&self, scale: Scale) -> Vec<Result<usize, String>> {
        match scale {
            Scale::By(n) => vec![Ok(n.unsigned_abs() as usize)],
            Scale::Auto { max, .. } => vec![Ok(max), Err("fixed".into())],
        }
    }
}

/// Runs `cases` arbitrary requests (each also as arbitrary bytes and cut short) through
/// `parse`, `addressed_to` and `handle`, failing on a panic or a reply that is not JSON.
pub(in crate::source) fn storm(worker: &impl RemoteWorker, cases: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let noise = prop::collection::vec(any::<u8>(), 0..256);
    let result = TestRunner::new(config).run(
        &(body(), noise, any::<prop::sample::Index>()),
        |(body, noise, cut)| {
            let bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
            answer(&rt, worker, &bytes)?;
            answer(&rt, worker, &noise)?;
            answer(&rt, worker, &bytes[..cut.index(bytes.len() + 1)])
        },
    );
    if let Err(e) = result {
        panic!("remote control storm: {e}");
    }
}

fn answer(
    rt: &tokio::runtime::Runtime,
    worker: &impl RemoteWorker,
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    let Ok(req) = parse(bytes) else {
        return Ok(());
    };
    addressed_to(&req, "worker@a");
    if let Some(reply) = rt.block_on(handle(&req, worker)) {
        let sent = json!([{ "worker@a": reply }]);
        serde_json::to_vec(&sent).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    Ok(())
}
