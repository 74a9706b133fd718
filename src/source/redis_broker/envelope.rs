//! kombu's message envelope on Redis: the JSON text a producer LPUSHes (or PUBLISHes) and a
//! consumer pops, read into a [`KombuMessage`] and written from an [`Outgoing`]. Pure: no
//! Redis, no clock; bounded and strict, so whatever sits in a list is read or refused with a
//! reason, never a panic.
//!
//! The shape (kombu `transport/virtual/base.py`, `Channel.prepare_message` and
//! `_inplace_augment_message`, read back by `Message.__init__`):
//! `{"body": <base64 of the body>, "content-encoding", "content-type", "headers": {...},
//! "properties": {"correlation_id", "reply_to", "delivery_mode", "delivery_info":
//! {"exchange", "routing_key"}, "priority", "body_encoding": "base64", "delivery_tag"}}`.

use crate::source::celery::Envelope;
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

/// A kombu message as a consumer reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct KombuMessage {
    /// The body as the producer serialized it (base64 undone).
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Celery's protocol 2 headers, and whatever else the producer set.
    pub headers: Map<String, Value>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// kombu's per-message uuid: the field of the message in the `unacked` hash.
    pub delivery_tag: String,
    /// Where it was published (`properties.delivery_info`); a restore routes it there again.
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    /// kombu's reading of `properties.priority`: clamped to 0..=9, 0 if absent or unreadable.
    pub priority: u8,
    /// Restored after a worker held it (kombu marks `headers.redelivered` and
    /// `properties.delivery_info.redelivered`).
    pub redelivered: bool,
}

impl KombuMessage {
    /// What our Celery decoder reads ([`crate::source::celery::decode`]).
    pub fn envelope(&self) -> Envelope<'_> {
        Envelope {
            headers: self.headers.clone(),
            body: &self.body,
            content_type: self.content_type.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
        }
    }
}

/// Why a list entry is not a kombu message we can read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error(
        "kombu message of {size} bytes is over the {max}-byte limit; refused unread (raise the \
         message size limit if such tasks are expected)"
    )]
    TooLarge { size: usize, max: usize },
    #[error("kombu message is not JSON ({0}); was it pushed by something other than kombu?")]
    NotJson(String),
    #[error("kombu message is JSON {0}, not the object kombu writes")]
    NotAnObject(&'static str),
    #[error("kombu message has no `properties` object; kombu cannot read it either")]
    NoProperties,
    #[error(
        "kombu message has no `properties.delivery_tag` string, so it cannot be acknowledged; \
         kombu cannot read it either"
    )]
    NoDeliveryTag,
    #[error("kombu message field `{field}` must be {expected}, not {found}")]
    Field {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "kombu message body is not valid base64 although `properties.body_encoding` says so ({0})"
    )]
    Base64(String),
    #[error(
        "kombu message body encoding `{0}` is not supported (kombu writes `base64`); configure \
         the client's transport option `body_encoding` back to base64"
    )]
    BodyEncoding(String),
}

/// Python's `base64.b64decode` accepts non-zero bits after the last symbol; so do we.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `map[key]` as an optional string: absent and null are `None`.
fn opt_str(
    map: Option<&Map<String, Value>>,
    key: &str,
    field: &'static str,
) -> Result<Option<String>, EnvelopeError> {
    match map.and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(EnvelopeError::Field {
            field,
            expected: "a string or null",
            found: kind(other),
        }),
    }
}

/// `map[key]` as an optional object: absent and null are `None`.
fn opt_object(
    map: &mut Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<Map<String, Value>>, EnvelopeError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(EnvelopeError::Field {
            field,
            expected: "an object or null",
            found: kind(&other),
        }),
    }
}

fn is_true(map: Option<&Map<String, Value>>, key: &str) -> bool {
    map.and_then(|m| m.get(key)) == Some(&Value::Bool(true))
}

/// kombu's `_get_message_priority` (Python's `int()` of `properties.priority`, clamped to
/// 0..=9; 0 when it is absent or not a number): a float truncates, a decimal string counts,
/// `true` is 1. The same rule runs in `ops`' Lua when a message is restored.
pub fn message_priority(priority: Option<&Value>) -> u8 {
    let clamp = |n: i128| n.clamp(0, i128::from(super::keys::MAX_PRIORITY)) as u8;
    match priority {
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => clamp(i128::from(i)),
            (None, Some(_), _) => super::keys::MAX_PRIORITY,
            (None, None, Some(f)) => clamp(f.trunc().clamp(-1.0, 10.0) as i128),
            _ => 0,
        },
        Some(Value::Bool(b)) => u8::from(*b),
        Some(Value::String(s)) => {
            let t = s.trim();
            let (negative, digits) = match t.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, t.strip_prefix('+').unwrap_or(t)),
            };
            // A negative number clamps to 0 like anything unreadable.
            if negative || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                0
            } else {
                clamp(digits.parse::<i128>().unwrap_or(i128::MAX))
            }
        }
        _ => 0,
    }
}

/// The body per `properties.body_encoding`, as kombu's `decode_body`: base64 undone, utf-8
/// (or none) taken as it is.
fn body(value: Option<Value>, encoding: Option<&str>) -> Result<Vec<u8>, EnvelopeError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(EnvelopeError::Field {
                field: "body",
                expected: "a string",
                found: kind(&other),
            })
        }
    };
    match encoding {
        None | Some("") => Ok(text.into_bytes()),
        Some(e) if e.eq_ignore_ascii_case("utf-8") => Ok(text.into_bytes()),
        Some("base64") => BASE64
            .decode(text.as_bytes())
            .map_err(|e| EnvelopeError::Base64(e.to_string())),
        Some(other) => Err(EnvelopeError::BodyEncoding(
            other.chars().take(64).collect(),
        )),
    }
}

/// Reads a list entry of at most `max_bytes` (refused before parsing when larger).
pub fn decode(payload: &[u8], max_bytes: usize) -> Result<KombuMessage, EnvelopeError> {
    if payload.len() > max_bytes {
        return Err(EnvelopeError::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let mut top = match value {
        Value::Object(o) => o,
        other => return Err(EnvelopeError::NotAnObject(kind(&other))),
    };
    let properties = match top.remove("properties") {
        Some(Value::Object(p)) => p,
        _ => return Err(EnvelopeError::NoProperties),
    };
    let delivery_tag = match properties.get("delivery_tag") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return Err(EnvelopeError::NoDeliveryTag),
    };
    let info = match properties.get("delivery_info") {
        None | Some(Value::Null) => None,
        Some(Value::Object(i)) => Some(i),
        Some(other) => {
            return Err(EnvelopeError::Field {
                field: "properties.delivery_info",
                expected: "an object or null",
                found: kind(other),
            })
        }
    };
    let headers = opt_object(&mut top, "headers", "headers")?.unwrap_or_default();
    let props = Some(&properties);
    let encoding = opt_str(props, "body_encoding", "properties.body_encoding")?;
    Ok(KombuMessage {
        body: body(top.remove("body"), encoding.as_deref())?,
        content_type: opt_str(Some(&top), "content-type", "content-type")?,
        content_encoding: opt_str(Some(&top), "content-encoding", "content-encoding")?,
        correlation_id: opt_str(props, "correlation_id", "properties.correlation_id")?,
        reply_to: opt_str(props, "reply_to", "properties.reply_to")?,
        exchange: opt_str(info, "exchange", "properties.delivery_info.exchange")?,
        routing_key: opt_str(info, "routing_key", "properties.delivery_info.routing_key")?,
        priority: message_priority(properties.get("priority")),
        redelivered: is_true(Some(&headers), "redelivered")
            || is_true(info, "redelivered")
            || is_true(Some(&top), "redelivered"),
        headers,
        delivery_tag,
    })
}

/// A message we publish, before it gets its delivery tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing<'a> {
    /// The serialized body (JSON for Celery); sent base64-encoded, as kombu does.
    pub body: &'a [u8],
    pub content_type: &'a str,
    pub content_encoding: &'a str,
    pub headers: Map<String, Value>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    /// 0..=9; on Redis a lower number is served first.
    pub priority: u8,
    /// AMQP's 2 (persistent) or 1 (transient); kombu carries it, Redis ignores it.
    pub delivery_mode: u8,
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

impl<'a> Outgoing<'a> {
    /// A Celery task message: JSON body, protocol 2 `headers`, persistent.
    pub fn task(
        body: &'a [u8],
        headers: Map<String, Value>,
        exchange: &'a str,
        routing_key: &'a str,
    ) -> Outgoing<'a> {
        Outgoing {
            body,
            content_type: "application/json",
            content_encoding: "utf-8",
            headers,
            correlation_id: None,
            reply_to: None,
            priority: 0,
            delivery_mode: 2,
            exchange,
            routing_key,
        }
    }

    /// A JSON message without headers: a remote-control reply, an event.
    pub fn plain(body: &'a [u8], exchange: &'a str, routing_key: &'a str) -> Outgoing<'a> {
        Outgoing::task(body, Map::new(), exchange, routing_key)
    }
}

#[derive(Serialize)]
struct WireMessage<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a Map<String, Value>,
    properties: WireProperties<'a>,
}

#[derive(Serialize)]
struct WireProperties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    delivery_mode: u8,
    delivery_info: WireDeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct WireDeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// The list entry (or PUBLISH payload) for `message` with a fresh uuid4 delivery tag, as
/// kombu's `basic_publish` writes it.
pub fn encode(message: &Outgoing) -> Vec<u8> {
    encode_with_tag(message, &uuid::Uuid::new_v4().to_string())
}

/// [`encode`] with a given delivery tag (tests, and re-sending under the same tag).
pub fn encode_with_tag(message: &Outgoing, delivery_tag: &str) -> Vec<u8> {
    let wire = WireMessage {
        body: BASE64.encode(message.body),
        content_encoding: message.content_encoding,
        content_type: message.content_type,
        headers: &message.headers,
        properties: WireProperties {
            correlation_id: message.correlation_id,
            reply_to: message.reply_to,
            delivery_mode: message.delivery_mode,
            delivery_info: WireDeliveryInfo {
                exchange: message.exchange,
                routing_key: message.routing_key,
            },
            priority: message.priority.min(super::keys::MAX_PRIORITY),
            body_encoding: "base64",
            delivery_tag,
        },
    };
    serde_json::to_vec(&wire).expect("strings, small integers and a JSON map always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const MAX: usize = 1 << 20;

    /// What Celery 5.7 / kombu 5.7 LPUSHed for `send_task('t', args=[1], kwargs={'a': 2},
    /// priority=5)`, copied from `redis-cli LRANGE 'celery\x06\x163' 0 -1`.
    const FROM_CELERY: &str = r#"{"body": "W1sxXSwgeyJhIjogMn0sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "t", "id": "067f1e64-c4f0-46b5-bc0f-889bc7d9fc6e", "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "067f1e64-c4f0-46b5-bc0f-889bc7d9fc6e", "parent_id": null, "argsrepr": "[1]", "kwargsrepr": "{'a': 2}", "origin": "gen9977@vm", "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "067f1e64-c4f0-46b5-bc0f-889bc7d9fc6e", "reply_to": "f2516be9-7afb-3f78-a2a8-05c55c3cd0ab", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 5, "body_encoding": "base64", "delivery_tag": "509cab2a-9826-4884-bf9f-390fee459d46"}}"#;

    #[test]
    fn a_message_from_the_celery_client_reads_into_its_task() {
        let m = decode(FROM_CELERY.as_bytes(), MAX).unwrap();
        assert_eq!(
            m.body,
            br#"[[1], {"a": 2}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(m.delivery_tag, "509cab2a-9826-4884-bf9f-390fee459d46");
        assert_eq!(m.exchange.as_deref(), Some(""));
        assert_eq!(m.routing_key.as_deref(), Some("celery"));
        assert_eq!(m.priority, 5);
        assert!(!m.redelivered);
        let task = crate::source::celery::decode(&m.envelope()).unwrap();
        assert_eq!(task.name, "t");
        assert_eq!(task.id, "067f1e64-c4f0-46b5-bc0f-889bc7d9fc6e");
        assert_eq!(*task.args, [json!(1)]);
        assert_eq!(task.kwargs.get("a"), Some(&json!(2)));
        assert_eq!(task.correlation_id, "067f1e64-c4f0-46b5-bc0f-889bc7d9fc6e");
        assert_eq!(
            task.reply_to.as_deref(),
            Some("f2516be9-7afb-3f78-a2a8-05c55c3cd0ab")
        );
    }

    #[test]
    fn what_we_encode_is_kombus_shape_byte_for_byte() {
        let mut headers = Map::new();
        headers.insert("task".into(), json!("t"));
        headers.insert("id".into(), json!("i-1"));
        let mut m = Outgoing::task(br#"[[1], {}, {}]"#, headers, "", "celery");
        m.correlation_id = Some("i-1");
        m.reply_to = Some("r");
        m.priority = 6;
        assert_eq!(
            String::from_utf8(encode_with_tag(&m, "tag-1")).unwrap(),
            r#"{"body":"W1sxXSwge30sIHt9XQ==","content-encoding":"utf-8","content-type":"application/json","headers":{"id":"i-1","task":"t"},"properties":{"correlation_id":"i-1","reply_to":"r","delivery_mode":2,"delivery_info":{"exchange":"","routing_key":"celery"},"priority":6,"body_encoding":"base64","delivery_tag":"tag-1"}}"#
        );
        let plain = Outgoing::plain(b"{}", "celeryev", "worker.heartbeat");
        let text = String::from_utf8(encode_with_tag(&plain, "t")).unwrap();
        assert!(
            text.contains(r#""headers":{},"properties":{"delivery_mode":2,"#),
            "{text}"
        );
    }

    #[test]
    fn encode_then_decode_gives_back_every_field_with_a_fresh_tag() {
        let mut headers = Map::new();
        headers.insert("task".into(), json!("t"));
        let mut m = Outgoing::task(b"\x00\xffnot json at all", headers.clone(), "ex", "rk");
        m.correlation_id = Some("c");
        m.reply_to = Some("r");
        m.priority = 3;
        let (a, b) = (encode(&m), encode(&m));
        let got = decode(&a, MAX).unwrap();
        assert_ne!(got.delivery_tag, decode(&b, MAX).unwrap().delivery_tag);
        assert!(uuid::Uuid::parse_str(&got.delivery_tag).is_ok());
        assert_eq!(got.body, m.body);
        assert_eq!(got.headers, headers);
        assert_eq!(
            (got.correlation_id.as_deref(), got.reply_to.as_deref()),
            (Some("c"), Some("r"))
        );
        assert_eq!(
            (got.exchange.as_deref(), got.routing_key.as_deref()),
            (Some("ex"), Some("rk"))
        );
        assert_eq!(got.priority, 3);
        assert!(!got.redelivered);
    }

    fn with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(FROM_CELERY).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn kombus_restore_marks_read_as_redelivered() {
        let h = with(|v| v["headers"]["redelivered"] = json!(true));
        assert!(decode(&h, MAX).unwrap().redelivered);
        let i = with(|v| v["properties"]["delivery_info"]["redelivered"] = json!(true));
        assert!(decode(&i, MAX).unwrap().redelivered);
        let top = with(|v| v["redelivered"] = json!(true));
        assert!(decode(&top, MAX).unwrap().redelivered);
    }

    #[test]
    fn over_size_is_refused_before_parsing() {
        let e = decode(&[b'x'; 101], 100).unwrap_err();
        assert_eq!(
            e,
            EnvelopeError::TooLarge {
                size: 101,
                max: 100
            }
        );
        assert!(e.to_string().contains("101 bytes"), "{e}");
    }

    #[test]
    fn every_refusal_names_its_cause() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "not JSON"),
            (b"[1, 2]".to_vec(), "JSON an array"),
            (b"{}".to_vec(), "no `properties`"),
            (
                with(|v| v["properties"]["delivery_tag"] = json!(7)),
                "delivery_tag",
            ),
            (
                with(|v| v["properties"]["delivery_tag"] = json!("")),
                "delivery_tag",
            ),
            (with(|v| v["body"] = json!("%%%")), "not valid base64"),
            (
                with(|v| v["properties"]["body_encoding"] = json!("rot13")),
                "`rot13`",
            ),
            (with(|v| v["body"] = json!([1])), "`body` must be a string"),
            (
                with(|v| v["headers"] = json!("h")),
                "`headers` must be an object",
            ),
            (
                with(|v| v["properties"]["reply_to"] = json!(1)),
                "`properties.reply_to`",
            ),
            (
                with(|v| v["properties"]["delivery_info"] = json!([])),
                "`properties.delivery_info` must be",
            ),
            (
                with(|v| v["properties"]["delivery_info"]["exchange"] = json!({})),
                "`properties.delivery_info.exchange`",
            ),
        ];
        for (payload, cause) in cases {
            let e = decode(&payload, MAX).unwrap_err().to_string();
            assert!(e.contains(cause), "{cause:?} not in {e:?}");
        }
    }

    #[test]
    fn a_utf8_body_is_taken_as_it_is_and_null_fields_are_absent() {
        let m = decode(
            &with(|v| {
                v["body"] = json!("[[2], {}, {}]");
                v["properties"]["body_encoding"] = json!("utf-8");
                v["headers"] = Value::Null;
                v["properties"]["reply_to"] = Value::Null;
                v["properties"]
                    .as_object_mut()
                    .unwrap()
                    .remove("delivery_info");
            }),
            MAX,
        )
        .unwrap();
        assert_eq!(m.body, b"[[2], {}, {}]");
        assert!(m.headers.is_empty());
        assert_eq!((m.reply_to, m.exchange, m.routing_key), (None, None, None));
    }

    #[test]
    fn priority_is_read_as_kombus_int_clamped_to_nine() {
        let cases = [
            (json!(5), 5),
            (json!(-3), 0),
            (json!(42), 9),
            (json!(u64::MAX), 9),
            (json!(7.9), 7),
            (json!(-0.5), 0),
            (json!("8"), 8),
            (json!(" +4 "), 4),
            (json!("4.0"), 0),
            (json!("99999999999999999999999999999999999999999"), 9),
            (json!(true), 1),
            (json!(null), 0),
            (json!([5]), 0),
        ];
        for (v, want) in cases {
            assert_eq!(message_priority(Some(&v)), want, "{v}");
        }
        assert_eq!(message_priority(None), 0);
    }

    /// JSON shaped like a kombu envelope, with any part missing, mistyped or arbitrary.
    fn envelope_like() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,16}".prop_map(Value::String),
            "[A-Za-z0-9+/]{0,24}={0,2}".prop_map(Value::String),
        ];
        let any_value = leaf.clone().prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_-]{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let field = |names: &'static [&'static str]| {
            (
                proptest::sample::select(names),
                proptest::option::of(any_value.clone()),
            )
        };
        let props = proptest::collection::vec(
            field(&[
                "delivery_tag",
                "delivery_info",
                "priority",
                "body_encoding",
                "reply_to",
            ]),
            0..6,
        );
        let top = proptest::collection::vec(
            field(&[
                "body",
                "headers",
                "content-type",
                "content-encoding",
                "redelivered",
            ]),
            0..6,
        );
        (top, props, any::<bool>()).prop_map(|(top, props, with_props)| {
            let mut p: Map<String, Value> = Map::new();
            p.insert("delivery_tag".into(), json!("t"));
            for (k, v) in props.into_iter() {
                match v {
                    Some(v) => p.insert(k.to_string(), v),
                    None => p.remove(k),
                };
            }
            let mut t: Map<String, Value> = Map::new();
            if with_props {
                t.insert("properties".into(), Value::Object(p));
            }
            for (k, v) in top.into_iter().flat_map(|(k, v)| v.map(|v| (k, v))) {
                t.insert(k.to_string(), v);
            }
            serde_json::to_vec(&Value::Object(t)).unwrap()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever sits in a list, reading it never panics: it is refused with a reason or
        /// read into a message whose priority is a valid one.
        #[test]
        fn any_entry_is_read_or_refused_never_a_panic(
            payload in prop_oneof![
                envelope_like(),
                proptest::collection::vec(any::<u8>(), 0..300),
                "\\[{0,300}".prop_map(String::into_bytes),
                "\\{\"a\":{0,200}".prop_map(String::into_bytes),
            ],
            max in prop_oneof![Just(MAX), 0usize..64],
        ) {
            match decode(&payload, max) {
                Ok(m) => {
                    prop_assert!(m.priority <= 9);
                    prop_assert!(!m.delivery_tag.is_empty());
                    prop_assert!(payload.len() <= max);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        /// Whatever we send reads back the same.
        #[test]
        fn every_outgoing_message_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            id in "[ -~]{0,40}",
            exchange in "[ -~]{0,20}",
            routing_key in "[ -~]{0,20}",
            reply_to in proptest::option::of("[ -~]{0,40}"),
            priority in 0u8..=9,
        ) {
            let mut headers = Map::new();
            headers.insert("id".into(), json!(id));
            let mut m = Outgoing::task(&body, headers.clone(), &exchange, &routing_key);
            m.reply_to = reply_to.as_deref();
            m.correlation_id = Some(&id);
            m.priority = priority;
            let got = decode(&encode_with_tag(&m, "tag"), MAX).unwrap();
            prop_assert_eq!(got.body, body);
            prop_assert_eq!(got.headers, headers);
            prop_assert_eq!(got.reply_to, reply_to);
            prop_assert_eq!(got.correlation_id.as_deref(), Some(id.as_str()));
            prop_assert_eq!(got.exchange.as_deref(), Some(exchange.as_str()));
            prop_assert_eq!(got.routing_key.as_deref(), Some(routing_key.as_str()));
            prop_assert_eq!(got.priority, priority);
            prop_assert_eq!(got.delivery_tag, "tag");
        }
    }
}
