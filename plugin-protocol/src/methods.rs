//! Typed parameters and results of every protocol v1 method, and the error codes.
//!
//! Field names are the wire names. Optional members are omitted when empty and default when
//! absent; unknown members are ignored (forward compatibility within a major version).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this crate speaks. Peers must agree on the major number.
pub const PROTOCOL_VERSION: &str = "1.5";

/// The major number of a `"MAJOR.MINOR"` version string, if it has one.
pub fn protocol_major(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// Method names.
/// Capability names a plugin may list in its `initialize` reply.
pub mod capability {
    /// The plugin handles `task.cancel`.
    pub const CANCEL: &str = "cancel";
    /// The plugin sends `task.progress`.
    pub const PROGRESS: &str = "progress";
    /// The plugin sends `task.stream`.
    pub const STREAM: &str = "stream";
    /// The plugin answers `ping` while tasks run (it reads stdin concurrently with running
    /// tasks). Without it the worker pings the plugin only while it has no task in flight.
    pub const PING_WHILE_BUSY: &str = "ping_while_busy";
}

pub mod method {
    /// worker -> plugin request: the first message on every connection.
    pub const INITIALIZE: &str = "initialize";
    /// worker -> plugin notification: the handshake is complete, tasks may follow.
    pub const INITIALIZED: &str = "initialized";
    /// worker -> plugin request: run one task.
    pub const TASK_RUN: &str = "task.run";
    /// worker -> plugin notification: stop a running task early.
    pub const TASK_CANCEL: &str = "task.cancel";
    /// plugin -> worker notification: how far a task has come.
    pub const TASK_PROGRESS: &str = "task.progress";
    /// plugin -> worker notification: partial results, in order, before the response.
    pub const TASK_STREAM: &str = "task.stream";
    /// plugin -> worker notification: a structured log record.
    pub const LOG: &str = "log";
    /// worker -> plugin request: health check.
    pub const PING: &str = "ping";
    /// worker -> plugin request: finish in-flight tasks, accept no more, then reply.
    pub const SHUTDOWN: &str = "shutdown";
    /// worker -> plugin notification: exit now.
    pub const EXIT: &str = "exit";
    /// worker -> plugin notification (1.3): something happened in the worker; sent only to a
    /// plugin whose manifest subscribes (`events = [...]`).
    pub const EVENT: &str = "event";
    /// plugin -> worker request (1.5): a queue backend offers one task from its queue.
    pub const TASK_OFFER: &str = "task.offer";
    /// worker -> plugin notification (1.5): progress of an offered task that asked for it.
    pub const OFFER_PROGRESS: &str = "offer.progress";
    /// worker -> plugin notification (1.5): stream items of an offered task that asked.
    pub const OFFER_STREAM: &str = "offer.stream";
    /// worker -> plugin request (1.5): a result backend stores one final state.
    pub const RESULT_STORE: &str = "result.store";
}

/// Error codes used in responses.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The task ran and raised; `data` is a [`TaskErrorData`](super::TaskErrorData).
    pub const TASK_FAILED: i64 = -32000;
    /// The task stopped because of `task.cancel`.
    pub const TASK_CANCELLED: i64 = -32001;
    /// The plugin is shutting down and accepts no new task.
    pub const SHUTTING_DOWN: i64 = -32002;
    /// The plugin does not serve the task name it was sent.
    pub const UNKNOWN_TASK: i64 = -32003;
    /// The task asks to be run again later (1.4); `data` is a
    /// [`TaskRetryData`](super::TaskRetryData).
    pub const TASK_RETRY: i64 = -32004;
    /// A `task.offer` beyond the window `initialize` gave (1.5); nothing was run.
    pub const OFFER_WINDOW_FULL: i64 = -32005;
}

/// Name and version of either peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub version: String,
}

/// Which plugin instance a process is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRef {
    /// The plugin's name from its manifest.
    pub name: String,
    /// 0-based instance number within the plugin.
    pub instance: u32,
}

/// Limits the plugin must respect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest line the worker accepts on stdout, in bytes (newline excluded).
    pub max_line_bytes: u64,
    /// Most `task.run` requests the worker keeps in flight on this process.
    pub concurrency: u32,
}

/// `initialize` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitializeParams {
    pub protocol_version: String,
    pub worker: PeerInfo,
    pub plugin: InstanceRef,
    /// The `[settings]` table of the plugin's manifest, as JSON.
    #[serde(default)]
    pub settings: Map<String, Value>,
    pub limits: Limits,
    /// Sent only to a queue backend (1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_backend: Option<QueueBackendInit>,
}

/// `initialize` params' `queue_backend` (1.5): sent only to a queue backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueBackendInit {
    /// How many `task.offer` requests the process may have unanswered at once.
    pub window: u32,
}

/// One task a plugin serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema for the task's params, informational in v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

/// `initialize` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitializeResult {
    pub protocol_version: String,
    pub plugin: PeerInfo,
    pub tasks: Vec<TaskInfo>,
    /// Free-form capability names (`"cancel"`, `"progress"`, `"stream"`, ...); unknown
    /// names are kept and ignored.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// Time limits for one task, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeLimits {
    /// After this long the worker sends `task.cancel` (reason `"soft time limit"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<f64>,
    /// After this long the worker kills the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<f64>,
}

impl TimeLimits {
    pub fn is_empty(&self) -> bool {
        self.soft.is_none() && self.hard.is_none()
    }
}

/// `task.run` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRunParams {
    pub task_id: String,
    /// The task name, one the plugin announced at `initialize`.
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// 1 on the first run; higher when a task is retried after a plugin crash.
    #[serde(default = "one")]
    pub attempt: u32,
    #[serde(default)]
    pub time_limit: TimeLimits,
    /// Where the task came from (1.2). Absent from a 1.1 worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_info: Option<DeliveryInfo>,
    /// Facts of the request (1.2), from the Celery message where there is one. Absent from a
    /// 1.1 worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestInfo>,
}

/// `task.run`'s `delivery_info`: the queue, exchange and routing key a broker delivered the
/// task with; all null for a task from the control socket or `worker run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryInfo {
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub exchange: Option<String>,
    #[serde(default)]
    pub routing_key: Option<String>,
    /// How the message body was encoded (1.4): `json`, or `jsonpickle` (Girder Worker's
    /// `girder_io`), whose tags other than `py/tuple` reach the plugin intact. Absent for a
    /// task from the control socket or `worker run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serializer: Option<String>,
    /// The message's priority (0-255; only a queue with `x-max-priority` orders by it) (1.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// The broker delivered it before, to this or another consumer (1.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<bool>,
    /// How often a quorum queue delivered it before (`x-delivery-count`; RabbitMQ 4 drops or
    /// dead-letters it past the queue's delivery limit) (1.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_count: Option<u64>,
}

/// `task.run`'s `request`: Celery's request facts (null where the message has none) and the
/// node name of the worker running it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// Celery retries so far (0 on the first delivery).
    #[serde(default)]
    pub retries: u64,
    /// ISO 8601, when the task was scheduled for.
    #[serde(default)]
    pub eta: Option<String>,
    /// ISO 8601, after which the task is not run.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub root_id: Option<String>,
    /// The id of the group the task belongs to.
    #[serde(default)]
    pub group: Option<String>,
    /// The worker's node name, e.g. `worker@host`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The message's own headers besides Celery's protocol fields (1.4), e.g. Girder's
    /// `jobInfoSpec` and `girder_client_token`. Absent when there are none.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String, Value>,
}

fn one() -> u32 {
    1
}

/// `data` of a [`code::TASK_FAILED`] or [`code::TASK_CANCELLED`] error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskErrorData {
    /// The exception type name, e.g. `"ValueError"`.
    #[serde(rename = "type")]
    pub exc_type: String,
    pub message: String,
    /// Where the type comes from (e.g. Python's `builtins`), if the plugin knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    /// True if running the task again could succeed.
    #[serde(default)]
    pub retryable: bool,
}

/// `data` of a [`code::TASK_RETRY`] error (1.4): run the task again later, as Celery's
/// `self.retry(countdown=..., eta=..., max_retries=..., exc=...)` does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRetryData {
    /// Seconds from now; absent (and no `eta`): Celery's default, 180.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countdown: Option<f64>,
    /// ISO 8601, when to run it again (`countdown` wins when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// How many retries in all; absent: Celery's default, 3. Past it the task fails with
    /// `exc` (or `MaxRetriesExceededError`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u64>,
    /// Why: the exception reported with the RETRY state, and as the failure once no retry is
    /// left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exc: Option<TaskErrorData>,
}

/// `task.progress` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgressParams {
    pub task_id: String,
    pub done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `task.stream` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStreamParams {
    pub task_id: String,
    pub items: Vec<Value>,
}

/// `task.cancel` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCancelParams {
    pub task_id: String,
    pub reason: String,
}

/// Severity of a `log` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    #[serde(alias = "warning")]
    Warn,
    #[serde(alias = "critical")]
    Error,
}

/// `log` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogParams {
    pub level: LogLevel,
    pub message: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de>>(v: Value) {
        let typed: T = serde_json::from_value(v.clone()).expect("deserializes");
        assert_eq!(serde_json::to_value(typed).unwrap(), v);
    }

    #[test]
    fn every_method_round_trips() {
        roundtrip::<InitializeParams>(json!({
            "protocol_version": "1.0",
            "worker": {"name": "worker", "version": "0.1.0"},
            "plugin": {"name": "fib", "instance": 0},
            "settings": {"depth": 3},
            "limits": {"max_line_bytes": 16777216, "concurrency": 4}
        }));
        roundtrip::<InitializeResult>(json!({
            "protocol_version": "1.0",
            "plugin": {"name": "fib", "version": "1.2.0"},
            "tasks": [{"name": "fibonacci", "description": "n-th number", "params": {"type": "array"}}],
            "capabilities": ["cancel", "progress", "stream", "future-thing"]
        }));
        roundtrip::<TaskRunParams>(json!({
            "task_id": "t1", "task": "fibonacci", "args": [26], "kwargs": {"x": 1},
            "attempt": 2, "time_limit": {"soft": 1.5, "hard": 3.0}
        }));
        roundtrip::<TaskErrorData>(json!({
            "type": "ValueError", "message": "bad", "module": "builtins",
            "traceback": "Traceback...", "retryable": false
        }));
        roundtrip::<TaskProgressParams>(
            json!({"task_id": "t1", "done": 3, "total": 10, "message": "m"}),
        );
        roundtrip::<TaskStreamParams>(json!({"task_id": "t1", "items": [1, "two"]}));
        roundtrip::<TaskCancelParams>(json!({"task_id": "t1", "reason": "soft time limit"}));
        roundtrip::<LogParams>(json!({"level": "warn", "message": "hi", "fields": {"k": "v"}}));
    }

    #[test]
    fn defaults_fill_in_optional_members() {
        let p: TaskRunParams =
            serde_json::from_value(json!({"task_id": "a", "task": "t"})).unwrap();
        assert_eq!(p.attempt, 1);
        assert!(p.args.is_empty() && p.kwargs.is_empty());
        let l: LogParams =
            serde_json::from_value(json!({"level": "warning", "message": "m"})).unwrap();
        assert_eq!(l.level, LogLevel::Warn);
    }

    #[test]
    fn major_version() {
        assert_eq!(protocol_major("1.0"), Some(1));
        assert_eq!(protocol_major("2"), Some(2));
        assert_eq!(protocol_major("x"), None);
    }
}

/// `event` params (1.3): what happened (`event`, e.g. `task.succeeded`), when (`time`, seconds
/// since the Unix epoch), how many events this subscriber missed since the last one it was sent
/// (`dropped`), and the kind's own fields (`task_id`, `plugin`, `instance`, `runtime`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventParams {
    pub event: String,
    pub time: f64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}
