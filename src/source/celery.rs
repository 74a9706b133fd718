//! Celery's wire format, as pure functions: task messages (protocol v2, and v1 bodies) in,
//! rpc:// result bodies out. No AMQP client types here: headers arrive as JSON, so every rule
//! is unit-tested. The facts these follow come from Celery's and kombu's sources
//! (`celery/app/amqp.py`, `celery/backends/rpc.py`, `kombu/messaging.py`).

use crate::task::{Failure, FailureKind};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime};

/// What a Celery task message says, decoded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CeleryTask {
    /// Shared, not copied, with the dispatcher's request, `inspect active` and the ledger.
    pub id: crate::task::TaskId,
    pub name: String,
    /// Shared, never copied, with what `inspect active` shows and the dispatcher's request.
    pub args: std::sync::Arc<Vec<Value>>,
    pub kwargs: std::sync::Arc<Map<String, Value>>,
    pub eta: Option<SystemTime>,
    pub expires: Option<SystemTime>,
    pub hard_time_limit: Option<Duration>,
    pub soft_time_limit: Option<Duration>,
    pub retries: u64,
    /// The workflow this task is part of (protocol 2 headers; v1 has only the group).
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub group: Option<String>,
    /// Its place in its group (protocol 2's `group_index`): a chord's parts are ordered by it.
    pub group_index: Option<u64>,
    pub ignore_result: bool,
    /// Where results go (the client's reply queue); `None` publishes nothing.
    pub reply_to: Option<String>,
    pub correlation_id: String,
    /// Workflow steps to carry on after it (protocol 2's embed; empty for v1).
    pub embed: crate::source::embed::Embed,
    /// How the body was encoded: [`JSON`], or [`JSONPICKLE`] (Girder Worker's `girder_io`).
    pub serializer: &'static str,
    /// The message's own headers: every header but Celery's protocol fields and the broker's
    /// `x-` ones (Girder's `jobInfoSpec`, `girder_client_token`, ...). Empty for v1.
    pub headers: Map<String, Value>,
}

/// [`CeleryTask::serializer`] of a JSON body.
pub const JSON: &str = "json";
/// [`CeleryTask::serializer`] of a jsonpickle body (`{"py/tuple": [args, kwargs, embed]}`).
pub const JSONPICKLE: &str = "jsonpickle";

/// Celery's own protocol 2 headers (celery/app/amqp.py `as_task_v2`): everything else a
/// client set in `headers=` or as an unknown `apply_async` option reaches the plugin.
const PROTOCOL_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
];

/// The headers a plugin is given: `h` without Celery's protocol fields and the broker's own.
fn own_headers(h: &Map<String, Value>) -> Map<String, Value> {
    h.iter()
        .filter(|(k, _)| !PROTOCOL_HEADERS.contains(&k.as_str()) && !k.starts_with("x-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The parts of an AMQP message the decoder needs, headers already converted to JSON.
#[derive(Debug, Default)]
pub struct Envelope<'a> {
    pub headers: Map<String, Value>,
    pub body: &'a [u8],
    pub content_type: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
}

pub use super::decode_error::DecodeError;

fn shape(msg: impl Into<String>) -> DecodeError {
    DecodeError::Shape(msg.into())
}

/// Decodes a task message. v2 is recognised by the `task` header; otherwise the body must be
/// a v1 dict.
pub fn decode(env: &Envelope) -> Result<CeleryTask, DecodeError> {
    match env.content_type {
        None | Some("application/json") | Some("") => {}
        Some(other) => return Err(DecodeError::ContentType(other.to_string())),
    }
    let reply_to = env.reply_to.filter(|r| !r.is_empty()).map(str::to_string);
    if env.headers.contains_key("task") {
        // The parts as the text they came as: a chain's remaining steps are carried on as
        // text, never built into a tree (a 100,000-step chain is one message).
        let parts: Vec<&RawValue> = match serde_json::from_slice(env.body) {
            Ok(parts) => parts,
            Err(e) => match serde_json::from_slice::<PickledBody>(env.body) {
                // Girder Worker's `girder_io` serializer: jsonpickle under application/json.
                Ok(pickled) => {
                    // jsonpickle's `py/id` counts lists but not tuples: where the body holds
                    // references, inner tuples stay tagged so the plugin's jsonpickle can
                    // resolve them (only the args tuple becomes an array).
                    let tuples = match env.body.windows(7).any(|w| w == b"\"py/id\"") {
                        true => Tuples::ArgsOnly,
                        false => Tuples::Arrays,
                    };
                    return decode_v2(
                        &env.headers,
                        &pickled.parts,
                        tuples,
                        reply_to,
                        env.correlation_id,
                    );
                }
                Err(_) => {
                    return Err(
                        match serde_json::from_slice::<serde::de::IgnoredAny>(env.body) {
                            Ok(_) => shape("a v2 body must be a JSON array [args, kwargs, embed]"),
                            Err(_) => DecodeError::NotJson(e.to_string()),
                        },
                    )
                }
            },
        };
        decode_v2(
            &env.headers,
            &parts,
            Tuples::Json,
            reply_to,
            env.correlation_id,
        )
    } else {
        let body: Value =
            serde_json::from_slice(env.body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        decode_v1(body, reply_to, env.correlation_id)
    }
}

/// What becomes of jsonpickle's tuples in a v2 body's args and kwargs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tuples {
    /// A JSON body: there are none.
    Json,
    /// Every `{"py/tuple": [...]}` becomes an array, as a JSON client would have sent it.
    Arrays,
    /// Only the args tuple becomes an array: the body holds `py/id` references, which count
    /// objects as jsonpickle does (lists but not tuples), so inner tuples keep their tag.
    ArgsOnly,
}

/// A v2 body as jsonpickle writes Python's tuple `(args, kwargs, embed)`:
/// `{"py/tuple": [args, kwargs, embed]}` (Girder Worker's `girder_io` serializer, sent under
/// content type `application/json`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PickledBody<'a> {
    #[serde(rename = "py/tuple", borrow)]
    parts: Vec<&'a RawValue>,
}

/// jsonpickle's tuples (`{"py/tuple": [...]}`), wherever they are, as arrays, as a JSON client
/// would have sent them; every other jsonpickle tag (`py/object`, `py/id`, ...) is left as it
/// is for the plugin.
fn untuple(v: Value) -> Value {
    match v {
        Value::Object(mut o) if o.len() == 1 && o.get("py/tuple").is_some_and(Value::is_array) => {
            match o.remove("py/tuple") {
                Some(Value::Array(items)) => Value::Array(items.into_iter().map(untuple).collect()),
                _ => unreachable!("checked to be an array"),
            }
        }
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, untuple(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(untuple).collect()),
        other => other,
    }
}

/// One part of a v2 body as JSON (`null` when absent); jsonpickle's tuples as arrays if the
/// body was pickled.
fn part(parts: &[&RawValue], i: usize, tuples: Tuples) -> Result<Value, DecodeError> {
    let Some(raw) = parts.get(i) else {
        return Ok(Value::Null);
    };
    let v = serde_json::from_str(raw.get()).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    Ok(match (tuples, v) {
        (Tuples::Json, v) => v,
        (Tuples::Arrays, v) => untuple(v),
        (Tuples::ArgsOnly, Value::Object(mut o))
            if o.len() == 1 && o.get("py/tuple").is_some_and(Value::is_array) =>
        {
            o.remove("py/tuple").unwrap_or_default()
        }
        (Tuples::ArgsOnly, v) => v,
    })
}

fn decode_v2(
    h: &Map<String, Value>,
    parts: &[&RawValue],
    tuples: Tuples,
    reply_to: Option<String>,
    corr: Option<&str>,
) -> Result<CeleryTask, DecodeError> {
    let name = string(h.get("task")).ok_or_else(|| shape("header `task` must be a string"))?;
    let id = string(h.get("id")).ok_or_else(|| shape("header `id` must be a string"))?;
    let args = match part(parts, 0, tuples)? {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err(shape("body[0] (args) must be an array")),
    };
    let kwargs = match part(parts, 1, tuples)? {
        Value::Object(k) => k,
        Value::Null => Map::new(),
        _ => return Err(shape("body[1] (kwargs) must be an object")),
    };
    let embed = crate::source::embed::Embed::from_raw(parts.get(2).copied())?;
    let (hard, soft) = time_limits(h.get("timelimit"))?;
    Ok(CeleryTask {
        embed,
        correlation_id: corr.map(str::to_string).unwrap_or_else(|| id.to_string()),
        args: untag_all(args)?.into(),
        kwargs: untag_map(kwargs)?.into(),
        eta: time(h.get("eta"), "eta")?,
        expires: time(h.get("expires"), "expires")?,
        hard_time_limit: hard,
        soft_time_limit: soft,
        retries: h.get("retries").and_then(Value::as_f64).unwrap_or(0.0) as u64,
        parent_id: string(h.get("parent_id")),
        root_id: string(h.get("root_id")),
        group: string(h.get("group")),
        group_index: h.get("group_index").and_then(Value::as_u64),
        ignore_result: h
            .get("ignore_result")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        reply_to,
        id: id.into(),
        name,
        serializer: match tuples {
            Tuples::Json => JSON,
            Tuples::Arrays | Tuples::ArgsOnly => JSONPICKLE,
        },
        headers: own_headers(h),
    })
}

fn decode_v1(
    body: Value,
    reply_to: Option<String>,
    corr: Option<&str>,
) -> Result<CeleryTask, DecodeError> {
    let Value::Object(b) = body else {
        return Err(shape(
            "no `task` header, and the body is not a protocol v1 object",
        ));
    };
    let name = string(b.get("task")).ok_or_else(|| shape("v1 body: `task` must be a string"))?;
    let id = string(b.get("id")).ok_or_else(|| shape("v1 body: `id` must be a string"))?;
    let args = match b.get("args") {
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(shape("v1 body: `args` must be an array")),
    };
    let kwargs = match b.get("kwargs") {
        Some(Value::Object(k)) => k.clone(),
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(shape("v1 body: `kwargs` must be an object")),
    };
    let (hard, soft) = time_limits(b.get("timelimit"))?;
    Ok(CeleryTask {
        correlation_id: corr.map(str::to_string).unwrap_or_else(|| id.to_string()),
        args: untag_all(args)?.into(),
        kwargs: untag_map(kwargs)?.into(),
        eta: time(b.get("eta"), "eta")?,
        expires: time(b.get("expires"), "expires")?,
        hard_time_limit: hard,
        soft_time_limit: soft,
        retries: b.get("retries").and_then(Value::as_f64).unwrap_or(0.0) as u64,
        parent_id: None,
        root_id: None,
        group: string(b.get("taskset")),
        group_index: None,
        ignore_result: false,
        reply_to,
        id: id.into(),
        name,
        embed: Default::default(),
        serializer: JSON,
        headers: Map::new(),
    })
}

fn string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `timelimit` is `[hard, soft]`; either may be null, an int or a float.
fn time_limits(v: Option<&Value>) -> Result<(Option<Duration>, Option<Duration>), DecodeError> {
    let secs = |v: Option<&Value>| -> Result<Option<Duration>, DecodeError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                // Zero or negative means "no limit" to Celery.
                Some(s) if s <= 0.0 => Ok(None),
                Some(s) => crate::task::time_limit("timelimit", s)
                    .map(Some)
                    .map_err(shape),
                None => Err(shape("`timelimit` entries must be numbers or null")),
            },
        }
    };
    match v {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(a)) => Ok((secs(a.first())?, secs(a.get(1))?)),
        Some(_) => Err(shape("`timelimit` must be [hard, soft]")),
    }
}

/// ISO-8601 with or without an offset (naive means UTC), or null.
fn time(v: Option<&Value>, key: &str) -> Result<Option<SystemTime>, DecodeError> {
    let text = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Object(o)) if o.get("__type__").and_then(Value::as_str) == Some("datetime") => {
            o.get("__value__")
                .and_then(Value::as_str)
                .unwrap_or_default()
        }
        Some(_) => return Err(shape(format!("`{key}` must be an ISO-8601 string or null"))),
    };
    parse_time(text)
        .map(Some)
        .ok_or_else(|| shape(format!("`{key}` is not an ISO-8601 time: {text:?}")))
}

pub fn parse_time(text: &str) -> Option<SystemTime> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.into());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, fmt) {
            return Some(t.and_utc().into());
        }
    }
    chrono::DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z")
        .ok()
        .map(Into::into)
}

/// kombu's JSON tags (`{"__type__": T, "__value__": V}`) become their plain value; an unknown
/// tag is an error, as it is for kombu.
fn untag(v: Value) -> Result<Value, DecodeError> {
    Ok(match v {
        Value::Object(o)
            if o.len() == 2 && o.contains_key("__type__") && o.contains_key("__value__") =>
        {
            let tag = o
                .get("__type__")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            match tag.as_str() {
                "datetime" | "date" | "time" | "uuid" | "decimal" | "bytes" => {
                    o.get("__value__").cloned().unwrap_or(Value::Null)
                }
                other => return Err(shape(format!("unknown kombu JSON type `{other}`"))),
            }
        }
        Value::Object(o) => Value::Object(untag_map(o)?),
        Value::Array(a) => Value::Array(untag_all(a)?),
        other => other,
    })
}

fn untag_all(a: Vec<Value>) -> Result<Vec<Value>, DecodeError> {
    a.into_iter().map(untag).collect()
}

fn untag_map(m: Map<String, Value>) -> Result<Map<String, Value>, DecodeError> {
    m.into_iter().map(|(k, v)| Ok((k, untag(v)?))).collect()
}

/// Task states as Celery names them.
pub mod state {
    pub const SUCCESS: &str = "SUCCESS";
    pub const FAILURE: &str = "FAILURE";
    pub const REVOKED: &str = "REVOKED";
    /// Published again to run later (`Task.retry`); not final.
    pub const RETRY: &str = "RETRY";
    /// Custom state carrying `task.progress`: `{done, total, message}`.
    pub const PROGRESS: &str = "PROGRESS";
    /// Custom state carrying `task.stream` items: `{items: [...]}`.
    pub const STREAM: &str = "STREAM";
}

/// A task's progress or streamed items as the custom state a Celery client reads (`PROGRESS`
/// `{done, total, message}`, `STREAM` `{items}`); none for a log line.
pub fn event_state(ev: crate::task::TaskEvent) -> Option<(&'static str, Value)> {
    use crate::task::TaskEvent;
    match ev {
        TaskEvent::Progress {
            done,
            total,
            message,
        } => Some((
            state::PROGRESS,
            json!({ "done": done, "total": total, "message": message }),
        )),
        TaskEvent::Stream { items } => Some((state::STREAM, json!({ "items": items }))),
        TaskEvent::Log { .. } | TaskEvent::Retrying { .. } => None,
    }
}

/// The exact body Celery's rpc backend reads, written field by field (one per task: a map
/// built only to be serialized cost ten allocations). Keys in sorted order, as a map wrote them.
pub fn result_body(task_id: &str, status: &str, result: Value, traceback: Option<&str>) -> Vec<u8> {
    let date_done = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let mut body = crate::json_object::ObjectWriter::with_capacity(160 + task_id.len());
    body.field("children", &[] as &[Value]);
    body.field("date_done", &date_done);
    body.field("result", &result);
    body.field("status", status);
    body.field("task_id", task_id);
    body.field("traceback", &traceback);
    body.finish()
}

/// The `result` of a FAILURE (or REVOKED) state: the exception as the client rebuilds it.
pub fn exception(exc_type: &str, message: &str, module: &str) -> Value {
    // `__main__` means "the plugin's script", which the client must not look up in its own.
    let module = if module.is_empty() || module == "__main__" {
        "worker.errors"
    } else {
        module
    };
    json!({ "exc_type": exc_type, "exc_message": [message], "exc_module": module })
}

/// A failure as Celery's FAILURE result. The worker's own failure kinds get the exception
/// classes a Celery client knows (so `except SoftTimeLimitExceeded` works); a plugin's
/// exception keeps the type and module the plugin gave.
pub fn failure_result(f: &Failure) -> Value {
    let (exc_type, module) = match f.kind {
        FailureKind::HardTimeLimit => ("TimeLimitExceeded", "billiard.exceptions"),
        FailureKind::SoftTimeLimit => ("SoftTimeLimitExceeded", "celery.exceptions"),
        FailureKind::NotRegistered => ("NotRegistered", "celery.exceptions"),
        _ => (f.exc_type.as_str(), f.module.as_str()),
    };
    exception(exc_type, &f.message, module)
}

pub fn revoked_result(reason: &str) -> Value {
    exception("TaskRevokedError", reason, "celery.exceptions")
}

/// Celery's `Retry` for a retry the plugin gave no exception for (the RETRY state's result).
pub fn retry_exception() -> Value {
    exception("Retry", "Retry in the future", "celery.exceptions")
}

/// Celery's `MaxRetriesExceededError` for `task`.
pub fn max_retries_exceeded(task: &CeleryTask) -> Value {
    let args: Vec<String> = task.args.iter().map(super::pyrepr::repr).collect();
    let message = format!(
        "Can't retry {}[{}] args:({}) kwargs:{}",
        task.name,
        task.id,
        args.join(", "),
        super::pyrepr::repr(&Value::Object((*task.kwargs).clone()))
    );
    exception("MaxRetriesExceededError", &message, "celery.exceptions")
}

/// Celery's `ChordError`: the chord's body fails because a header part did (`why`).
pub fn chord_error(why: &str) -> Value {
    exception("ChordError", why, "celery.exceptions")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::FailureKind;

    fn headers(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn env<'a>(h: Value, body: &'a [u8]) -> Envelope<'a> {
        Envelope {
            headers: headers(h),
            body,
            content_type: Some("application/json"),
            correlation_id: Some("abc"),
            reply_to: Some("reply-q"),
        }
    }

    #[test]
    fn decodes_a_v2_message_as_the_python_client_sends_it() {
        let h = json!({
            "lang": "py", "task": "fibonacci", "id": "abc", "shadow": null, "eta": null,
            "expires": "2030-01-01T00:00:00.000000+00:00", "group": null, "group_index": null,
            "retries": 0, "timelimit": [10, 5.5], "root_id": "abc", "parent_id": null,
            "argsrepr": "(26,)", "kwargsrepr": "{}", "origin": "gen1@host", "ignore_result": false,
            "stamped_headers": null, "stamps": {}, "replaced_task_nesting": 0
        });
        let body = br#"[[26], {"k": {"__type__": "uuid", "__value__": "u-1"}}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
        let t = decode(&env(h, body)).unwrap();
        assert_eq!(t.name, "fibonacci");
        assert_eq!(t.id, "abc");
        assert_eq!(*t.args, vec![json!(26)]);
        assert_eq!(t.kwargs["k"], json!("u-1"));
        assert_eq!(t.hard_time_limit, Some(Duration::from_secs(10)));
        assert_eq!(t.soft_time_limit, Some(Duration::from_secs_f64(5.5)));
        assert_eq!(t.reply_to.as_deref(), Some("reply-q"));
        let expires = t
            .expires
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(expires, 1_893_456_000);
    }

    /// What Girder Worker 5.0.21's client publishes (captured from `Task.apply_async`): the
    /// body is jsonpickle's tuple under application/json.
    #[test]
    fn decodes_girder_workers_jsonpickle_body() {
        let h = json!({"task": "gw.add", "id": "a37e"});
        let body = br#"{"py/tuple": [{"py/tuple": [{"py/tuple": [2, 3]}, 4]}, {"k": [1, 2], "obj": {"py/object": "girder_worker_utils.transforms.girder_io.GirderFileId", "file_id": "f1"}}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]}"#;
        let t = decode(&env(h, body)).unwrap();
        assert_eq!(*t.args, vec![json!([2, 3]), json!(4)]);
        assert_eq!(t.kwargs["k"], json!([1, 2]));
        assert_eq!(
            t.kwargs["obj"]["py/object"], "girder_worker_utils.transforms.girder_io.GirderFileId",
            "other jsonpickle tags reach the plugin as they are"
        );
        assert_eq!(t.serializer, JSONPICKLE);
        let other = br#"{"py/tuple": [[1], {}, {}], "x": 1}"#;
        assert!(matches!(
            decode(&env(json!({"task": "t", "id": "i"}), other)),
            Err(DecodeError::Shape(_))
        ));
    }

    /// jsonpickle numbers `py/id` targets counting lists but not tuples: a body with
    /// references keeps its inner tuples tagged, so the plugin's jsonpickle resolves them.
    #[test]
    fn a_jsonpickle_body_with_references_keeps_its_inner_tuples() {
        let h = json!({"task": "gw.add", "id": "a37e"});
        let body = br#"{"py/tuple": [{"py/tuple": [{"py/tuple": [3, 4]}, ["a"]]}, {"same": {"py/id": 2}}, {}]}"#;
        let t = decode(&env(h, body)).unwrap();
        assert_eq!(*t.args, vec![json!({"py/tuple": [3, 4]}), json!(["a"])]);
        assert_eq!(t.kwargs["same"], json!({"py/id": 2}));
        assert_eq!(t.serializer, JSONPICKLE);
    }

    /// Girder's headers (and any a client added) reach the plugin; Celery's own and the
    /// broker's `x-` headers do not.
    #[test]
    fn a_messages_own_headers_are_kept_for_the_plugin() {
        let h = json!({
            "lang": "py", "task": "t", "id": "i", "argsrepr": "()", "stamps": {},
            "x-death": [{"count": 1}],
            "jobInfoSpec": {"url": "http://g/api/v1/job/1", "method": "PUT"},
            "girder_client_token": "tok"
        });
        let t = decode(&env(h, b"[[], {}, {}]")).unwrap();
        let keys: Vec<&str> = t.headers.keys().map(String::as_str).collect();
        assert_eq!(keys, ["girder_client_token", "jobInfoSpec"]);
        assert_eq!(t.serializer, JSON);
    }

    #[test]
    fn decodes_a_v1_body() {
        let body = br#"{"task": "add", "id": "x1", "args": [1, 2], "kwargs": {}, "retries": 1, "eta": "2030-01-01T00:00:00", "timelimit": [null, 3]}"#;
        let t = decode(&env(json!({}), body)).unwrap();
        assert_eq!(
            (t.name.as_str(), t.id.as_str(), t.retries),
            ("add", "x1", 1)
        );
        assert_eq!(*t.args, vec![json!(1), json!(2)]);
        assert!(t.eta.is_some());
        assert_eq!(
            (t.hard_time_limit, t.soft_time_limit),
            (None, Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn rejects_what_it_cannot_read_with_a_reason() {
        let e = decode(&Envelope {
            content_type: Some("application/x-python-serialize"),
            body: b"x",
            ..Default::default()
        });
        assert!(matches!(e, Err(DecodeError::ContentType(_))));
        assert!(matches!(
            decode(&env(json!({"task": "t", "id": "i"}), b"{not json")),
            Err(DecodeError::NotJson(_))
        ));
        let e = decode(&env(json!({"task": "t", "id": "i"}), b"{\"a\": 1}")).unwrap_err();
        assert!(
            e.to_string().contains("v2 body must be a JSON array"),
            "{e}"
        );
        let e = decode(&env(json!({"task": "t"}), b"[[], {}, {}]")).unwrap_err();
        assert!(e.to_string().contains("`id`"), "{e}");
        let e = decode(&env(
            json!({"task": "t", "id": "i"}),
            br#"[[{"__type__": "pickle", "__value__": 1}], {}, {}]"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown kombu JSON type"), "{e}");
        let e = decode(&env(
            json!({"task": "t", "id": "i", "eta": "tomorrow"}),
            b"[[], {}, {}]",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("eta"), "{e}");
        assert!(decode(&env(json!({}), b"[1]")).is_err());
    }

    #[test]
    fn times_with_offsets_and_naive_times() {
        let a = parse_time("2026-11-23T10:00:00+01:00").unwrap();
        let b = parse_time("2026-11-23T09:00:00").unwrap();
        let c = parse_time("2026-11-23T09:00:00.000000Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
    }

    #[test]
    fn result_bodies_have_the_rpc_backend_shape() {
        let body: Value =
            serde_json::from_slice(&result_body("t1", state::SUCCESS, json!(121393), None))
                .unwrap();
        assert_eq!(body["task_id"], "t1");
        assert_eq!(body["status"], "SUCCESS");
        assert_eq!(body["result"], 121393);
        assert_eq!(body["traceback"], Value::Null);
        assert_eq!(body["children"], json!([]));
        // Byte for byte what serializing the same fields as a map gives.
        let written = result_body("t\"2", state::FAILURE, json!({"a": [1]}), Some("tb\n"));
        let mut map: Value = serde_json::from_slice(&written).unwrap();
        let date_done = map["date_done"].as_str().unwrap().to_string();
        assert!(
            date_done.ends_with("+00:00") && date_done.len() == 32,
            "{date_done}"
        );
        map["date_done"] = json!(date_done);
        assert_eq!(written, serde_json::to_vec(&map).unwrap());
        assert_eq!(map["task_id"], "t\"2");
        assert_eq!(map["traceback"], "tb\n");
        let f = Failure::new(
            FailureKind::Raised { retryable: false },
            "ValueError",
            "builtins",
            "bad",
        );
        assert_eq!(
            failure_result(&f),
            json!({"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"})
        );
        assert_eq!(
            exception("Boom", "x", "__main__")["exc_module"],
            "worker.errors"
        );
        assert_eq!(revoked_result("terminated")["exc_type"], "TaskRevokedError");
    }
}
