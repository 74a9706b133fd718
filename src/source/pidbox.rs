//! Celery remote control ("pidbox"): `celery inspect ...`, `celery status`, `celery control
//! revoke`. Requests arrive on the fanout exchange `celery.pidbox`; replies go to the exchange
//! and routing key the request names, as `{nodename: result}`.

use crate::supervisor::pool::Scale;
use serde_json::{json, Map, Value};
use std::future::Future;

/// What remote control needs from the worker, and nothing more.
pub trait RemoteWorker {
    /// Sorted names of the tasks the plugins serve.
    fn registered(&self) -> Vec<String>;
    /// `inspect active`: the tasks running, in Celery's shape.
    fn active(&self) -> Vec<Value>;
    /// `inspect reserved|scheduled`: tasks held until their eta.
    fn reserved(&self) -> Vec<Value>;
    fn active_queues(&self) -> Vec<Value>;
    fn stats(&self) -> impl Future<Output = Value> + Send;
    /// Remembers the ids as revoked; with `terminate`, running ones are stopped.
    fn revoke(&self, ids: &[String], terminate: bool) -> impl Future<Output = ()> + Send;
    fn request_shutdown(&self);
    /// `enable_events` / `disable_events`: Celery's reply for the change (or none).
    fn enable_events(&self) -> Value;
    fn disable_events(&self) -> Value;
    /// `heartbeat`: send one worker heartbeat now (monitors ask when they start).
    fn heartbeat(&self);
    /// `inspect revoked`: the revoked ids remembered, oldest first.
    fn revoked(&self) -> Vec<String>;
    /// `inspect query_task`: `[state, info]` of each id this worker holds (`active`, `reserved`).
    fn query_task(&self, ids: &[String]) -> Map<String, Value>;
    /// `inspect conf`: this worker's settings that a Celery user would recognise, secrets masked.
    fn conf(&self) -> Map<String, Value>;
    /// `inspect report`: the worker, its software and its settings, as text.
    fn report(&self) -> String;
    /// `control rate_limit TASK RATE`: Celery's reply.
    fn rate_limit(&self, task: &str, rate: &Value) -> Value;
    /// `control time_limit TASK SOFT HARD`: Celery's reply.
    fn time_limit(&self, task: &str, soft: &Value, hard: &Value) -> Value;
    /// `control add_consumer QUEUE [EXCHANGE [TYPE [ROUTING_KEY]]]`: start consuming it.
    /// Celery's error reply if the broker refuses the queue (it is declared on a channel of its
    /// own first, so a refusal never touches the running consumers).
    fn add_consumer(
        &self,
        queue: &str,
        exchange: Option<&str>,
        kind: Option<&str>,
        key: Option<&str>,
    ) -> impl Future<Output = Value> + Send;
    /// `control cancel_consumer QUEUE`: stop consuming it.
    fn cancel_consumer(&self, queue: &str) -> Value;
    /// `pool_grow` / `pool_shrink` / `autoscale`: each plugin's answer (count or refusal).
    fn scale(&self, scale: Scale) -> impl Future<Output = Vec<Result<usize, String>>> + Send;
}

/// A decoded control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    pub method: String,
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    pub ticket: Option<String>,
    /// `(exchange, routing_key)` when a reply is wanted.
    pub reply_to: Option<(String, String)>,
}

/// Why a remote-control message was ignored.
#[derive(Debug, thiserror::Error)]
pub enum ControlRequestError {
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("no `method`")]
    NoMethod,
}

pub fn parse(body: &[u8]) -> Result<ControlRequest, ControlRequestError> {
    let v: Value = serde_json::from_slice(body)?;
    let method = v["method"]
        .as_str()
        .ok_or(ControlRequestError::NoMethod)?
        .to_string();
    let destination = match &v["destination"] {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ),
        Value::String(s) => Some(vec![s.clone()]),
        _ => None,
    };
    let reply_to = match (&v["reply_to"]["exchange"], &v["reply_to"]["routing_key"]) {
        (Value::String(e), Value::String(k)) => Some((e.clone(), k.clone())),
        _ => None,
    };
    Ok(ControlRequest {
        method,
        arguments: v["arguments"].as_object().cloned().unwrap_or_default(),
        destination,
        pattern: v["pattern"].as_str().map(str::to_string),
        matcher: v["matcher"].as_str().map(str::to_string),
        ticket: v["ticket"].as_str().map(str::to_string),
        reply_to,
    })
}

/// True if the request is for `nodename`: no destination means everyone.
pub fn addressed_to(req: &ControlRequest, nodename: &str) -> bool {
    if let Some(pattern) = &req.pattern {
        return match req.matcher.as_deref() {
            // kombu's "pcre" matcher is `re.match`: anchored at the start.
            Some("pcre") => {
                regex::Regex::new(&format!("^(?:{pattern})")).is_ok_and(|re| re.is_match(nodename))
            }
            _ => glob_regex(pattern).is_ok_and(|re| re.is_match(nodename)),
        };
    }
    match &req.destination {
        None => true,
        Some(names) => names.iter().any(|n| n == nodename),
    }
}

/// A shell glob (`*`, `?`) as an anchored regex.
fn glob_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let escaped = regex::escape(pattern)
        .replace(r"\*", ".*")
        .replace(r"\?", ".");
    regex::Regex::new(&format!("^{escaped}$"))
}

/// The reply to a remote-control message, for its transport to send.
pub struct Reply {
    /// The method answered, for log lines.
    pub method: String,
    pub exchange: String,
    pub routing_key: String,
    /// `{node: result}`, as Celery's mailbox reads it.
    pub body: Vec<u8>,
    /// The `ticket` header the client matches replies with.
    pub ticket: Option<String>,
}

/// Reads a remote-control message (its body) and answers it, if it is for `nodename` and
/// wants a reply; one that cannot be read is logged and ignored.
pub async fn answer(body: &[u8], nodename: &str, worker: &impl RemoteWorker) -> Option<Reply> {
    let req = match parse(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("ignoring a remote control message that cannot be read: {e}");
            return None;
        }
    };
    if !addressed_to(&req, nodename) {
        return None;
    }
    tracing::debug!(method = %req.method, "remote control request");
    let result = handle(&req, worker).await?;
    let (exchange, routing_key) = req.reply_to?;
    Some(Reply {
        body: serde_json::to_vec(&json!({ nodename: result })).expect("reply serializes"),
        method: req.method,
        exchange,
        routing_key,
        ticket: req.ticket,
    })
}

/// Answers one request; `None` means no reply (the method asks for none or is ignored).
pub async fn handle(req: &ControlRequest, worker: &impl RemoteWorker) -> Option<Value> {
    let result = match req.method.as_str() {
        "ping" => json!({ "ok": "pong" }),
        "registered" => json!(worker.registered()),
        "active" => json!(worker.active()),
        "reserved" | "scheduled" => json!(worker.reserved()),
        "stats" => worker.stats().await,
        "active_queues" => json!(worker.active_queues()),
        "revoked" | "dump_revoked" => json!(worker.revoked()),
        "query_task" => Value::Object(worker.query_task(&ids(req.arguments.get("ids")))),
        "conf" | "dump_conf" => Value::Object(worker.conf()),
        "add_consumer" | "cancel_consumer" => {
            let arg = |k: &str| {
                req.arguments
                    .get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            };
            match (req.method.as_str(), arg("queue")) {
                (_, None) => json!({ "error": "give the queue's name (`queue`)" }),
                ("add_consumer", Some(q)) => {
                    worker
                        .add_consumer(q, arg("exchange"), arg("exchange_type"), arg("routing_key"))
                        .await
                }
                (_, Some(q)) => worker.cancel_consumer(q),
            }
        }
        "pool_grow" | "pool_shrink" | "autoscale" => scale(req, worker).await,
        "rate_limit" => {
            let task = req
                .arguments
                .get("task_name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let rate = req.arguments.get("rate_limit").unwrap_or(&Value::Null);
            worker.rate_limit(task, rate)
        }
        "time_limit" => {
            let arg = |k: &str| req.arguments.get(k).unwrap_or(&Value::Null);
            let task = arg("task_name").as_str().unwrap_or_default();
            worker.time_limit(task, arg("soft"), arg("hard"))
        }
        "report" => json!({ "ok": worker.report() }),
        // `celery control terminate SIGNAL ID` is revoke with terminate.
        "revoke" | "terminate" => revoke(req, worker).await,
        "shutdown" => {
            worker.request_shutdown();
            json!({ "ok": "shutting down" })
        }
        "enable_events" => worker.enable_events(),
        "disable_events" => worker.disable_events(),
        // Celery's handler returns nothing: `null` to whoever asked for a reply.
        "heartbeat" => {
            worker.heartbeat();
            Value::Null
        }
        // Sent by other workers; nothing to do.
        "hello" | "clock" => return None,
        other => json!({ "error": format!("No such control command: {other}") }),
    };
    Some(result)
}

/// `pool_grow N`, `pool_shrink N` (each plugin by N instances, within 1..=64) and
/// `autoscale MAX MIN` (each plugin between them, following its load), answered as Celery's
/// worker answers them.
async fn scale(req: &ControlRequest, worker: &impl RemoteWorker) -> Value {
    let number = |k: &str| {
        req.arguments.get(k).and_then(|v| match v {
            Value::String(s) => s.trim().parse::<u64>().ok(),
            other => other.as_u64(),
        })
    };
    let (scale, done) = match req.method.as_str() {
        "pool_grow" => (
            Scale::By(number("n").unwrap_or(1).min(64) as i64),
            "pool will grow".to_string(),
        ),
        "pool_shrink" => (
            Scale::By(-(number("n").unwrap_or(1).min(64) as i64)),
            "pool will shrink".to_string(),
        ),
        _ => {
            let Some(max) = number("max") else {
                return json!({ "error": "give the most instances (`max`), e.g. `celery control autoscale 10 2`" });
            };
            let min = number("min").unwrap_or(1).min(max);
            let (max, min) = (max.clamp(1, 64), min.clamp(1, 64));
            (
                Scale::Auto {
                    min: min as usize,
                    max: max as usize,
                },
                format!("autoscale now max={max} min={min}"),
            )
        }
    };
    let answers = worker.scale(scale).await;
    match answers.iter().find_map(|a| a.as_ref().err()) {
        Some(_) => {
            json!({ "error": format!("{} is not supported with autoscale. Adjust autoscale range instead.", req.method) })
        }
        None => json!({ "ok": done }),
    }
}

/// Task ids given as one id or a list (the CLI may nest them one level).
fn ids(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .flat_map(|v| match v {
                Value::Array(inner) => inner.clone(),
                other => vec![other.clone()],
            })
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// `revoke` (and `terminate`, which is revoke with terminate), answered in Celery's words: a
/// Python set of the ids, or the ids terminated.
async fn revoke(req: &ControlRequest, worker: &impl RemoteWorker) -> Value {
    let ids = ids(req.arguments.get("task_id"));
    let terminate = req.method == "terminate"
        || req
            .arguments
            .get("terminate")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    worker.revoke(&ids, terminate).await;
    match terminate {
        true if ids.is_empty() => json!({ "ok": "terminate: tasks unknown" }),
        true => json!({ "ok": format!("terminate: {}", ids.join(", ")) }),
        false => {
            let set: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
            json!({ "ok": format!("tasks {{{}}} flagged as revoked", set.join(", ")) })
        }
    }
}

#[cfg(test)]
pub(in crate::source) mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inspect_ping_as_the_cli_sends_it() {
        let body = br#"{"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null, "ticket": "t-1", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k-1"}}"#;
        let r = parse(body).unwrap();
        assert_eq!(r.method, "ping");
        assert_eq!(r.ticket.as_deref(), Some("t-1"));
        assert_eq!(
            r.reply_to,
            Some(("reply.celery.pidbox".into(), "k-1".into()))
        );
        assert!(addressed_to(&r, "worker@a"));
    }

    #[test]
    fn destination_and_patterns_select_nodes() {
        let mut r = parse(br#"{"method": "ping", "destination": ["worker@a"]}"#).unwrap();
        assert!(addressed_to(&r, "worker@a"));
        assert!(!addressed_to(&r, "worker@b"));
        r.destination = None;
        r.pattern = Some("worker@*".into());
        assert!(addressed_to(&r, "worker@b"));
        assert!(!addressed_to(&r, "celery@b"));
        r.matcher = Some("pcre".into());
        r.pattern = Some("work.r@[ab]".into());
        assert!(addressed_to(&r, "worker@b"));
        assert!(!addressed_to(&r, "xworker@b"));
        assert!(parse(b"nope").is_err());
        assert!(parse(br#"{"arguments": {}}"#).is_err());
    }

    #[test]
    fn a_storm_of_remote_control_requests_never_panics() {
        let worker = fuzz::FakeWorker {
            rate_limit: Box::new(|task, rate| json!({"ok": format!("{task} {rate}")})),
            time_limit: Box::new(|task, soft, hard| json!({"ok": [task, soft, hard]})),
        };
        fuzz::storm(&worker, 1000);
    }
}
