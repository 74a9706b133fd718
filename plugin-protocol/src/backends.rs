//! Queue and result backends (protocol 1.5): a plugin that offers the worker tasks from a
//! queue of its own (`task.offer`), and one that stores the final states of tasks
//! (`result.store`). Opt-in through `provides` in `plugin.toml`; a plugin that provides
//! neither never sees these messages.

use crate::methods::TimeLimits;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a plugin's manifest may `provide` besides tasks.
pub mod provides {
    /// It sends `task.offer` requests.
    pub const QUEUE_BACKEND: &str = "queue_backend";
    /// It is sent `result.store` requests.
    pub const RESULT_BACKEND: &str = "result_backend";
}

/// Longest `task_id` an offer may carry, in bytes.
pub const MAX_OFFER_ID_BYTES: usize = 255;

/// `task.offer` params: one task from the plugin's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOfferParams {
    /// The backend's id for the task; its id in the worker too.
    pub task_id: String,
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    #[serde(default, skip_serializing_if = "TimeLimits::is_empty")]
    pub time_limit: TimeLimits,
    /// Send `offer.progress` notifications while it runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub progress: bool,
    /// Send `offer.stream` notifications while it runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// A task's final state: `SUCCESS` or `FAILURE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinalState {
    #[serde(rename = "SUCCESS")]
    Success,
    #[serde(rename = "FAILURE")]
    Failure,
}

/// Why a task failed, as a queue or result backend is told it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// The worker's failure kind: `raised`, `cancelled`, `not_registered`, `soft_time_limit`,
    /// `hard_time_limit`, `plugin_crashed`, ...
    pub kind: String,
    #[serde(rename = "type")]
    pub exc_type: String,
    #[serde(default)]
    pub module: String,
    pub message: String,
    #[serde(default)]
    pub traceback: Option<String>,
}

/// A final state: the `task.offer` result, and the core of `result.store`'s params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFinal {
    pub task_id: String,
    pub state: FinalState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
}

/// `data` of an offer answered with an error: which task was not taken, and why (`kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferRefusedData {
    pub task_id: String,
    pub kind: String,
}

/// `result.store` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultStoreParams {
    pub task_id: String,
    pub task: String,
    pub state: FinalState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Where the task came from ("control socket pid 42", "amqp: queue celery", ...).
    #[serde(default)]
    pub submitter: String,
    /// Runs it took (more than 1 after a plugin crash).
    #[serde(default = "one")]
    pub attempts: u32,
    /// Seconds since the Unix epoch.
    pub started: f64,
    pub finished: f64,
}

fn one() -> u32 {
    1
}

/// `offer.progress` params are `task.progress`'s, `offer.stream`'s `task.stream`'s.
pub use crate::methods::{
    TaskProgressParams as OfferProgressParams, TaskStreamParams as OfferStreamParams,
};
