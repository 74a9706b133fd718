//! The JSON-RPC 2.0 envelope: requests, notifications and responses as plain data.
//!
//! Parsing is strict about the envelope (it must be an object with `"jsonrpc": "2.0"` and the
//! members of exactly one message kind) and lenient about everything else: unknown members are
//! ignored so a newer peer never breaks an older one within the same major version.

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// A request id. The worker always uses numbers and never reuses one on a connection;
/// plugins may use strings for their own requests (they have none in v1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Num(u64),
    Str(String),
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Num(n) => write!(f, "{n}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A call that expects a [`Response`] with the same id.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Id,
    pub method: String,
    pub params: Value,
}

/// A one-way message: no id, no response.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Value,
}

/// The answer to a [`Request`]: exactly one of a result or an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// `None` only for errors about a message whose id could not be read.
    pub id: Option<Id>,
    pub result: Result<Value, ErrorObject>,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// Any one protocol line.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request(Request),
    Notification(Notification),
    Response(Response),
}

/// Why a line is not a JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not UTF-8 JSON at all (typically a stray `print` on the plugin's stdout).
    NotJson(String),
    /// JSON, but not a JSON-RPC 2.0 message; the id is kept when one could be read.
    NotJsonRpc { id: Option<Id>, reason: String },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotJson(e) => write!(f, "not JSON: {e}"),
            ParseError::NotJsonRpc { reason, .. } => {
                write!(f, "not a JSON-RPC 2.0 message: {reason}")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Distinguishes a member that is present with `null` from one that is absent.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Marks a member as present, whatever its value (`null` included), without building it.
fn present_any<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    IgnoredAny::deserialize(d).map(|_| Some(()))
}

/// A line read only as far as telling whether it is a `task.run` request; its params stay
/// JSON text.
#[derive(Deserialize)]
struct TaskRunProbe<'a> {
    #[serde(borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    id: Option<Id>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "present_any")]
    result: Option<()>,
    #[serde(default, deserialize_with = "present_any")]
    error: Option<()>,
}

/// The id and params (as JSON text) of a line that is a well-formed `task.run` request, so
/// that the params are parsed once, straight into their own type, with no [`Value`] tree in
/// between: a plugin's hot path. `None` for every other line, which [`Message::parse`] then
/// reads and judges as usual.
pub fn task_run_request(line: &[u8]) -> Option<(Id, &RawValue)> {
    let probe: TaskRunProbe = serde_json::from_slice(line).ok()?;
    let well_formed = probe.jsonrpc.as_deref() == Some("2.0")
        && probe.method.as_deref() == Some(crate::methods::method::TASK_RUN)
        && probe.result.is_none()
        && probe.error.is_none();
    Some((probe.id.filter(|_| well_formed)?, probe.params?))
}

/// The `jsonrpc` member, read only as far as whether it says "2.0" (no string kept).
struct Version2(bool);

impl<'de> Deserialize<'de> for Version2 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Version2;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Version2, E> {
                Ok(Version2(v == "2.0"))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[derive(Deserialize)]
struct RawMessage {
    jsonrpc: Option<Version2>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    method: Option<String>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Value>,
    #[serde(default)]
    error: Option<ErrorObject>,
}

impl Message {
    /// Parses one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Message, ParseError> {
        // Invalid UTF-8 inside a string is decoded lossily (U+FFFD), as stderr is, rather than
        // losing the whole message; valid lines pay nothing for this.
        let parsed = serde_json::from_slice::<RawMessage>(line).or_else(|e| {
            match std::str::from_utf8(line) {
                Ok(_) => Err(e),
                Err(_) => serde_json::from_str(&String::from_utf8_lossy(line)),
            }
        });
        let raw: RawMessage = match parsed {
            Ok(raw) => raw,
            Err(e) if e.is_data() => {
                return Err(ParseError::NotJsonRpc {
                    id: None,
                    reason: e.to_string(),
                })
            }
            Err(e) => return Err(ParseError::NotJson(e.to_string())),
        };
        let id = match raw.id {
            None | Some(Value::Null) => None,
            Some(v) => match serde_json::from_value::<Id>(v) {
                Ok(id) => Some(id),
                Err(_) => {
                    return Err(ParseError::NotJsonRpc {
                        id: None,
                        reason: "id must be a non-negative integer or a string".into(),
                    })
                }
            },
        };
        let invalid = |reason: &str| ParseError::NotJsonRpc {
            id: id.clone(),
            reason: reason.to_string(),
        };
        if !matches!(raw.jsonrpc, Some(Version2(true))) {
            return Err(invalid("missing \"jsonrpc\": \"2.0\""));
        }
        match (raw.method, raw.result, raw.error) {
            (Some(method), None, None) => {
                let params = raw.params.unwrap_or(Value::Null);
                Ok(match id {
                    Some(id) => Message::Request(Request { id, method, params }),
                    None => Message::Notification(Notification { method, params }),
                })
            }
            (None, Some(result), None) => Ok(Message::Response(Response {
                id,
                result: Ok(result),
            })),
            (None, None, Some(error)) => Ok(Message::Response(Response {
                id,
                result: Err(error),
            })),
            (None, None, None) => Err(invalid("no method, result or error")),
            _ => Err(invalid("more than one of method, result and error")),
        }
    }

    /// Serializes to one line, newline included. Written straight from the message (no
    /// intermediate `Value`, no copy of params or result): this is every line's hot path.
    pub fn to_line(&self) -> Vec<u8> {
        crate::codec::encode_line(self)
    }

    /// The wire form as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut obj = serde_json::Map::new();
        obj.insert("jsonrpc".into(), Value::from("2.0"));
        match self {
            Message::Request(r) => {
                obj.insert(
                    "id".into(),
                    serde_json::to_value(&r.id).expect("id serializes"),
                );
                obj.insert("method".into(), Value::from(r.method.clone()));
                if !r.params.is_null() {
                    obj.insert("params".into(), r.params.clone());
                }
            }
            Message::Notification(n) => {
                obj.insert("method".into(), Value::from(n.method.clone()));
                if !n.params.is_null() {
                    obj.insert("params".into(), n.params.clone());
                }
            }
            Message::Response(r) => {
                obj.insert(
                    "id".into(),
                    serde_json::to_value(&r.id).expect("id serializes"),
                );
                match &r.result {
                    Ok(v) => obj.insert("result".into(), v.clone()),
                    Err(e) => obj.insert(
                        "error".into(),
                        serde_json::to_value(e).expect("error serializes"),
                    ),
                };
            }
        }
        Value::Object(obj)
    }
}

/// The wire form, keys in the order JSON-RPC examples use (`jsonrpc`, `id`, `method`,
/// `params` / `result` / `error`); the same members as [`Message::to_value`].
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("jsonrpc", "2.0")?;
        match self {
            Message::Request(r) => {
                map.serialize_entry("id", &r.id)?;
                map.serialize_entry("method", &r.method)?;
                if !r.params.is_null() {
                    map.serialize_entry("params", &r.params)?;
                }
            }
            Message::Notification(n) => {
                map.serialize_entry("method", &n.method)?;
                if !n.params.is_null() {
                    map.serialize_entry("params", &n.params)?;
                }
            }
            Message::Response(r) => {
                map.serialize_entry("id", &r.id)?;
                match &r.result {
                    Ok(v) => map.serialize_entry("result", v)?,
                    Err(e) => map.serialize_entry("error", e)?,
                }
            }
        }
        map.end()
    }
}

/// One request line straight from typed params (no `Value` in between): the worker's path
/// for every `task.run`. The same line as `Message::Request(Request::new(..)).to_line()` for
/// params that serialize to an object (null params are written, not left out).
pub fn request_line(id: &Id, method: &str, params: &impl Serialize) -> Vec<u8> {
    request_line_with(id, method, |out| put_json(out, params))
}

/// One request line whose params `write_params` appends itself (one JSON value): for a
/// caller that writes its hot params by hand.
pub fn request_line_with(
    id: &Id,
    method: &str,
    write_params: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(crate::codec::LINE_CAPACITY);
    append_request_line(&mut out, id, method, write_params);
    out
}

/// Appends the same line to `out`: for a writer that queues lines in one buffer of its own.
pub fn append_request_line(
    out: &mut Vec<u8>,
    id: &Id,
    method: &str,
    write_params: impl FnOnce(&mut Vec<u8>),
) {
    // The envelope's keys are written as they are, not escaped one by one.
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    put_json(out, id);
    out.extend_from_slice(br#","method":"#);
    put_json(out, method);
    out.extend_from_slice(br#","params":"#);
    write_params(out);
    out.extend_from_slice(b"}\n");
}

fn put_json(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
    serde_json::to_writer(out, value).expect("protocol values always serialize");
}

impl Request {
    pub fn new(id: Id, method: &str, params: impl Serialize) -> Self {
        Request {
            id,
            method: method.to_string(),
            params: serde_json::to_value(params).expect("params serialize"),
        }
    }
}

impl Notification {
    pub fn new(method: &str, params: impl Serialize) -> Self {
        Notification {
            method: method.to_string(),
            params: serde_json::to_value(params).expect("params serialize"),
        }
    }
}

impl Response {
    pub fn ok(id: Id, result: impl Serialize) -> Self {
        Response {
            id: Some(id),
            result: Ok(serde_json::to_value(result).expect("result serializes")),
        }
    }

    pub fn err(id: Option<Id>, error: ErrorObject) -> Self {
        Response {
            id,
            result: Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_well_formed_task_run_request_is_read_by_the_probe() {
        let params = r#"{"task_id":"t1","task":"x","args":[1,"a\"b"],"kwargs":{}}"#;
        let line = format!(r#"{{"jsonrpc":"2.0","id":4,"method":"task.run","params":{params}}}"#);
        let (id, raw) = task_run_request(line.as_bytes()).expect("a task.run request");
        assert_eq!((id, raw.get()), (Id::Num(4), params));
        // Members in any order, an escaped method name, a string id, unknown members.
        let line = r#"{"params":{},"x":1,"method":"task.run","id":"s","jsonrpc":"2.0"}"#;
        assert_eq!(
            task_run_request(line.as_bytes()).unwrap().0,
            Id::Str("s".into())
        );
        // Everything else goes to `Message::parse`, which judges it as before.
        for line in [
            r#"{"jsonrpc":"2.0","method":"task.run","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"task.run","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":-1,"method":"task.run","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"task.run"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"task.run","params":null}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"task.run","params":{},"result":null}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"task.run","params":{},"error":{}}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"task.run","params":{}}"#,
            r#"{"id":1,"method":"task.run","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"task.run","params":{}}"#,
            r#"[1]"#,
            "not json",
        ] {
            assert!(task_run_request(line.as_bytes()).is_none(), "{line}");
        }
        let mut invalid_utf8 =
            br#"{"jsonrpc":"2.0","id":1,"method":"task.run","params":{"a":""#.to_vec();
        invalid_utf8.extend_from_slice(b"\xff\"}}");
        assert!(task_run_request(&invalid_utf8).is_none());
    }

    /// The direct serialization writes what `to_value` describes, and parses back the same.
    #[test]
    fn a_line_is_the_wire_value_and_parses_back() {
        let messages = [
            Message::Request(Request::new(
                Id::Num(7),
                "task.run",
                json!({"a": [1, {"b": null}]}),
            )),
            Message::Request(Request::new(Id::Str("x".into()), "ping", Value::Null)),
            Message::Notification(Notification::new("task.progress", json!({"done": 1}))),
            Message::Notification(Notification::new("exit", Value::Null)),
            Message::Response(Response::ok(Id::Num(3), Value::Null)),
            Message::Response(Response::ok(Id::Str("s".into()), json!({"r": [true]}))),
            Message::Response(Response::err(None, ErrorObject::new(-32700, "bad"))),
            Message::Response(Response::err(
                Some(Id::Num(4)),
                ErrorObject::new(-32000, "no"),
            )),
        ];
        for m in messages {
            let line = m.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            let as_value: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(as_value, m.to_value(), "{m:?}");
            assert_eq!(Message::parse(&line[..line.len() - 1]).unwrap(), m);
        }
    }

    #[test]
    fn typed_lines_are_the_same_as_messages() {
        let params = json!({"task_id": "t\"\n", "args": [1]});
        for id in [Id::Num(9), Id::Str("a \"quoted\" id".into())] {
            for method in ["task.run", "odd \"method\"\u{1}"] {
                assert_eq!(
                    request_line(&id, method, &params),
                    Message::Request(Request::new(id.clone(), method, &params)).to_line()
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_in_a_string_is_decoded_lossily() {
        let mut line = br#"{"jsonrpc":"2.0","id":3,"result":"caf"#.to_vec();
        line.extend([0xC3, 0x28]);
        line.extend(br#""}"#);
        match Message::parse(&line).expect("parses") {
            Message::Response(r) => {
                assert_eq!(r.id, Some(Id::Num(3)));
                assert_eq!(r.result.unwrap(), json!("caf\u{FFFD}("));
            }
            other => panic!("{other:?}"),
        }
    }

    fn roundtrip(v: Value) {
        let msg = Message::parse(v.to_string().as_bytes()).expect("parses");
        assert_eq!(msg.to_value(), v);
    }

    #[test]
    fn kinds_round_trip() {
        roundtrip(json!({"jsonrpc":"2.0","id":1,"method":"ping"}));
        roundtrip(json!({"jsonrpc":"2.0","id":"a","method":"x","params":{"k":[1]}}));
        roundtrip(json!({"jsonrpc":"2.0","method":"log","params":{"level":"info"}}));
        roundtrip(json!({"jsonrpc":"2.0","id":7,"result":null}));
        roundtrip(json!({"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"no"}}));
        roundtrip(
            json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse","data":{"x":1}}}),
        );
    }

    #[test]
    fn null_result_is_a_response() {
        let msg = Message::parse(br#"{"jsonrpc":"2.0","id":3,"result":null}"#).unwrap();
        assert_eq!(
            msg,
            Message::Response(Response {
                id: Some(Id::Num(3)),
                result: Ok(Value::Null)
            })
        );
    }

    #[test]
    fn unknown_members_are_ignored() {
        let msg = Message::parse(br#"{"jsonrpc":"2.0","method":"log","params":{},"extra":1}"#);
        assert!(matches!(msg, Ok(Message::Notification(_))));
    }

    #[test]
    fn rejects_non_json_and_non_jsonrpc() {
        assert!(matches!(
            Message::parse(b"hello"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(
            Message::parse(b"[1,2]"),
            Err(ParseError::NotJsonRpc { .. })
        ));
        assert!(matches!(
            Message::parse(br#"{"id":1,"method":"x"}"#),
            Err(ParseError::NotJsonRpc {
                id: Some(Id::Num(1)),
                ..
            })
        ));
        assert!(matches!(
            Message::parse(
                br#"{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":""}}"#
            ),
            Err(ParseError::NotJsonRpc { .. })
        ));
        // The version must be the string "2.0" (escapes allowed), nothing else.
        for line in [
            r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            r#"{"jsonrpc":2,"id":1,"method":"x"}"#,
            r#"{"jsonrpc":null,"id":1,"method":"x"}"#,
        ] {
            assert!(
                matches!(
                    Message::parse(line.as_bytes()),
                    Err(ParseError::NotJsonRpc { .. })
                ),
                "{line}"
            );
        }
        let escaped = br#"{"jsonrpc":"2\u002e0","id":1,"method":"x"}"#;
        assert!(matches!(Message::parse(escaped), Ok(Message::Request(_))));
    }
}
