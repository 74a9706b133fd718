//! The one task type that travels from a source to a plugin, and the one outcome it ends with.

use plugin_protocol::{DeliveryInfo, RequestInfo};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;

pub use crate::task_id::TaskId;
use std::time::Duration;

/// A task as a source hands it to the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    /// Unique id; the source picks it (Celery's task id) or the dispatcher makes one.
    pub id: TaskId,
    pub name: String,
    /// Shared, not copied, by whoever else keeps them (a Celery source's `inspect active`).
    pub args: Arc<Vec<Value>>,
    pub kwargs: Arc<Map<String, Value>>,
    /// Overrides of the manifest's time limits (e.g. from a Celery header).
    pub soft_time_limit: Option<Duration>,
    pub hard_time_limit: Option<Duration>,
    /// Who submitted it, for `worker task list` ("control socket pid 42", "amqp: queue celery").
    pub submitter: String,
    /// Where it came from, passed to the plugin (`task.run` `delivery_info`).
    pub delivery_info: DeliveryInfo,
    /// The request's facts, passed to the plugin (`task.run` `request`; the instance adds the
    /// worker's node name).
    pub request_info: RequestInfo,
    /// The plugin's log lines while it runs come back as [`TaskEvent::Log`] (a Girder job's
    /// log): its `log` notifications naming the task, and its stderr lines while it is the
    /// process's only task. Lines the submitter has no room for are dropped, never waited for.
    pub capture_log: bool,
}

impl TaskRequest {
    pub fn new(name: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        TaskRequest {
            id: new_task_id().into(),
            name: name.into(),
            args: Arc::new(args),
            kwargs: Arc::new(kwargs),
            soft_time_limit: None,
            hard_time_limit: None,
            submitter: "local".into(),
            delivery_info: DeliveryInfo::default(),
            request_info: RequestInfo::default(),
            capture_log: false,
        }
    }
}

/// Longest duration any input may set (30 days): bounded so no deadline arithmetic can overflow.
pub const MAX_DURATION_SECS: f64 = 30.0 * 24.0 * 3600.0;

/// A duration given in seconds by a peer, checked: finite, above zero, at most 30 days. The
/// error names the field and the allowed range.
pub fn time_limit(field: &str, secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_DURATION_SECS {
        Ok(Duration::from_secs_f64(secs))
    } else {
        // Huge values print as 1e308, not 309 digits.
        let shown = match secs.abs() >= 1e9 {
            true => format!("{secs:e}"),
            false => format!("{secs}"),
        };
        Err(format!(
            "`{field}` is {shown}; it must be a number of seconds above 0 and at most {MAX_DURATION_SECS} (30 days)"
        ))
    }
}

/// A fresh task id: a random UUID (version 4), as Celery's own ids are.
pub fn new_task_id() -> String {
    // A version-4 UUID from the thread's fast generator: an id must be unique, not secret
    // (whoever may cancel a task by id may list the ids anyway), and asking the kernel for
    // randomness cost a system call per task.
    let bytes = fastrand::u128(..).to_le_bytes();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Where a running task's events go to its submitter: bounded, one channel per task. Each
/// event is boxed because tokio allocates a channel's first block of 32 slots when it is made:
/// a queued task then holds 32 pointers for it rather than 32 events (1.5 KiB).
pub type EventSender = tokio::sync::mpsc::Sender<Box<TaskEvent>>;
pub type EventReceiver = tokio::sync::mpsc::Receiver<Box<TaskEvent>>;

/// Something a running task reports before it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum TaskEvent {
    Progress {
        done: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Stream {
        items: Vec<Value>,
    },
    /// A line the plugin logged while running the task; only for a request with
    /// `capture_log`.
    Log {
        line: String,
    },
    /// The dispatcher runs the task again after attempt `attempt` failed for `reason` (the
    /// plugin's process died under it): what came before is void, a new run starts.
    Retrying {
        attempt: u32,
        reason: String,
    },
}

/// How a task ended. Every task gets exactly one.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    Failure(Failure),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success(_))
    }

    /// `success`, or the failure's kind in snake case (`raised`, `hard_time_limit`, ...): the
    /// `outcome` label of the task metrics.
    pub fn kind(&self) -> &'static str {
        let Outcome::Failure(failure) = self else {
            return "success";
        };
        match failure.kind {
            FailureKind::Raised { .. } => "raised",
            FailureKind::Cancelled(_) => "cancelled",
            FailureKind::RetryRequested => "retry",
            FailureKind::SoftTimeLimit => "soft_time_limit",
            FailureKind::HardTimeLimit => "hard_time_limit",
            FailureKind::PluginCrashed => "plugin_crashed",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Rejected => "rejected",
            FailureKind::NotRegistered => "not_registered",
            FailureKind::PluginUnavailable => "plugin_unavailable",
            FailureKind::QueueFull => "queue_full",
            FailureKind::ShuttingDown => "shutting_down",
        }
    }
}

/// Why a task failed, in terms a user can act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// Exception type name shown to the caller (`ValueError`, `PluginCrashed`, ...).
    #[serde(rename = "type")]
    pub exc_type: String,
    pub message: String,
    /// Where `exc_type` comes from (Python module for Celery clients).
    pub module: String,
    pub traceback: Option<String>,
    /// The plugin asked to run the task again later (kind `Retry`): when, and how often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Box<plugin_protocol::TaskRetryData>>,
}

/// The failure categories the worker reacts to differently.
///
/// On the control API's wire a kind keeps the shape it had before causes were carried
/// (`"cancelled"`, not the cause): clients compare it as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "KindOnWire", into = "KindOnWire")]
pub enum FailureKind {
    /// The task raised; `retryable` is the plugin's own judgement.
    Raised { retryable: bool },
    /// Stopped on request; the cause says whose, so each source reports it its own way.
    Cancelled(CancelCause),
    /// The plugin asked to run it again later (`failure.retry` says when); a source with a
    /// broker publishes it again, the others report it as this failure.
    #[serde(rename = "retry")]
    RetryRequested,
    /// Stopped after its soft time limit.
    SoftTimeLimit,
    /// Its process was killed at the hard time limit.
    HardTimeLimit,
    /// The process under it died; the dispatcher may run it again elsewhere.
    PluginCrashed,
    /// The worker itself stopped or replaced the process under it (a reload, an uninstall,
    /// a stop): run again without spending an attempt, since the plugin did nothing wrong.
    Interrupted,
    /// The plugin refused it because it is shutting down; safe to run elsewhere.
    Rejected,
    /// No plugin serves this task name.
    NotRegistered,
    /// The plugin serving it is in the `failed` state or stopped.
    PluginUnavailable,
    /// The plugin's queue is full.
    QueueFull,
    /// The worker is stopping and accepts no new tasks.
    ShuttingDown,
}

/// Why a task was asked to stop. It travels with the cancel to the task's failure, so a
/// source reads how to report it off the outcome (a Celery revoke ends REVOKED, a cancel
/// through the control socket a failure) instead of remembering it beside the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelCause {
    /// Through the control socket, `worker task cancel`, Ctrl-C of `worker run`, or by the
    /// task's queue backend.
    Requested,
    /// A broker's revoke: asked to stop, not forced (Celery's plain `revoke`).
    Revoked,
    /// A broker's revoke with `terminate`: stopped, killed after the cancel grace.
    Terminated,
    /// The task's soft time limit ran out (it ends as a soft-time-limit failure).
    SoftTimeLimit,
    /// The plugin answered the task cancelled without being asked.
    ByPlugin,
}

impl CancelCause {
    /// The word Celery's REVOKED result carries (`TaskRevokedError(...)`), for the causes a
    /// revoke gives; `None` for the others, which are failures.
    pub fn revoke_word(self) -> Option<&'static str> {
        match self {
            CancelCause::Revoked => Some("revoked"),
            CancelCause::Terminated => Some("terminated"),
            _ => None,
        }
    }
}

/// A request to stop a task: why, and the words the plugin is sent (`task.cancel`'s reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    pub cause: CancelCause,
    pub reason: String,
}

impl Cancellation {
    pub fn new(cause: CancelCause, reason: impl Into<String>) -> Cancellation {
        Cancellation {
            cause,
            reason: reason.into(),
        }
    }

    /// A cancel someone asked for (the control socket, `worker task cancel`, Ctrl-C).
    pub fn requested(reason: impl Into<String>) -> Cancellation {
        Cancellation::new(CancelCause::Requested, reason)
    }
}

/// [`FailureKind`] as the control API writes and reads it: a cancel is `"cancelled"`
/// whatever its cause, as before causes were carried; one read back is `Requested`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindOnWire {
    Raised {
        retryable: bool,
    },
    Cancelled,
    #[serde(rename = "retry")]
    RetryRequested,
    SoftTimeLimit,
    HardTimeLimit,
    PluginCrashed,
    Interrupted,
    Rejected,
    NotRegistered,
    PluginUnavailable,
    QueueFull,
    ShuttingDown,
}

impl From<FailureKind> for KindOnWire {
    fn from(kind: FailureKind) -> KindOnWire {
        match kind {
            FailureKind::Raised { retryable } => KindOnWire::Raised { retryable },
            FailureKind::Cancelled(_) => KindOnWire::Cancelled,
            FailureKind::RetryRequested => KindOnWire::RetryRequested,
            FailureKind::SoftTimeLimit => KindOnWire::SoftTimeLimit,
            FailureKind::HardTimeLimit => KindOnWire::HardTimeLimit,
            FailureKind::PluginCrashed => KindOnWire::PluginCrashed,
            FailureKind::Interrupted => KindOnWire::Interrupted,
            FailureKind::Rejected => KindOnWire::Rejected,
            FailureKind::NotRegistered => KindOnWire::NotRegistered,
            FailureKind::PluginUnavailable => KindOnWire::PluginUnavailable,
            FailureKind::QueueFull => KindOnWire::QueueFull,
            FailureKind::ShuttingDown => KindOnWire::ShuttingDown,
        }
    }
}

impl From<KindOnWire> for FailureKind {
    fn from(kind: KindOnWire) -> FailureKind {
        match kind {
            KindOnWire::Raised { retryable } => FailureKind::Raised { retryable },
            KindOnWire::Cancelled => FailureKind::Cancelled(CancelCause::Requested),
            KindOnWire::RetryRequested => FailureKind::RetryRequested,
            KindOnWire::SoftTimeLimit => FailureKind::SoftTimeLimit,
            KindOnWire::HardTimeLimit => FailureKind::HardTimeLimit,
            KindOnWire::PluginCrashed => FailureKind::PluginCrashed,
            KindOnWire::Interrupted => FailureKind::Interrupted,
            KindOnWire::Rejected => FailureKind::Rejected,
            KindOnWire::NotRegistered => FailureKind::NotRegistered,
            KindOnWire::PluginUnavailable => FailureKind::PluginUnavailable,
            KindOnWire::QueueFull => FailureKind::QueueFull,
            KindOnWire::ShuttingDown => FailureKind::ShuttingDown,
        }
    }
}

impl Failure {
    pub fn new(
        kind: FailureKind,
        exc_type: &str,
        module: &str,
        message: impl Into<String>,
    ) -> Self {
        Failure {
            kind,
            exc_type: exc_type.to_string(),
            message: message.into(),
            module: module.to_string(),
            traceback: None,
            retry: None,
        }
    }

    pub fn crashed(message: impl Into<String>) -> Self {
        Failure::new(
            FailureKind::PluginCrashed,
            "PluginCrashed",
            "worker.errors",
            message,
        )
    }

    pub fn not_registered(task: &str) -> Self {
        Failure::new(
            FailureKind::NotRegistered,
            "NotRegistered",
            "worker.errors",
            task,
        )
    }

    /// Refused before it reached a process (the instance was ending, the plugin shutting
    /// down): the dispatcher runs it elsewhere without spending an attempt.
    pub fn rejected(message: impl Into<String>) -> Self {
        Failure::new(
            FailureKind::Rejected,
            "PluginRejected",
            "worker.errors",
            message,
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Failure::new(
            FailureKind::PluginUnavailable,
            "PluginUnavailable",
            "worker.errors",
            message,
        )
    }

    pub fn interrupted(message: impl Into<String>) -> Self {
        Failure::new(
            FailureKind::Interrupted,
            "PluginInterrupted",
            "worker.errors",
            message,
        )
    }

    pub fn shutting_down() -> Self {
        Failure::new(
            FailureKind::ShuttingDown,
            "WorkerShuttingDown",
            "worker.errors",
            "the worker is shutting down and accepts no new tasks",
        )
    }

    pub fn cancelled(cause: CancelCause, reason: &str) -> Self {
        Failure::new(
            FailureKind::Cancelled(cause),
            "TaskCancelled",
            "worker.errors",
            format!("cancelled: {reason}"),
        )
    }

    /// True if running the task again on a healthy process may succeed without side effects
    /// the task did not already allow for.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::PluginCrashed | FailureKind::Rejected | FailureKind::Interrupted
        )
    }

    /// The task did not run to a state of its own and belongs back in its queue, to run
    /// later here or elsewhere: the worker was stopping (`stopping`: what a stop interrupted
    /// too), its plugin is unavailable or full, or a task with its id was running. Queue
    /// backends offer such a task again, and no result backend stores it.
    pub fn belongs_back(&self, stopping: bool) -> bool {
        match self.kind {
            FailureKind::ShuttingDown | FailureKind::PluginUnavailable | FailureKind::QueueFull => {
                true
            }
            FailureKind::Interrupted | FailureKind::Rejected | FailureKind::PluginCrashed => {
                stopping
            }
            FailureKind::Raised { .. } => self.exc_type == DUPLICATE_TASK_ID,
            _ => false,
        }
    }
}

/// The exception type of a task refused because a task with its id is running.
pub const DUPLICATE_TASK_ID: &str = "DuplicateTaskId";

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_are_bounded_and_say_so() {
        assert_eq!(time_limit("t", 1.5), Ok(Duration::from_millis(1500)));
        for bad in [
            0.0,
            -1.0,
            1e300,
            f64::INFINITY,
            f64::NAN,
            MAX_DURATION_SECS * 2.0,
        ] {
            let e = time_limit("hard_time_limit", bad).unwrap_err();
            assert!(
                e.contains("`hard_time_limit`") && e.contains("30 days"),
                "{e}"
            );
        }
    }

    /// The control API shows a cancel as `"cancelled"` whatever its cause, and every other
    /// kind as it always did.
    #[test]
    fn failure_kinds_keep_their_wire_shape() {
        let wire = |k: FailureKind| serde_json::to_value(k).unwrap();
        for cause in [CancelCause::Requested, CancelCause::Terminated] {
            assert_eq!(wire(FailureKind::Cancelled(cause)), "cancelled");
        }
        assert_eq!(
            wire(FailureKind::Raised { retryable: true }),
            serde_json::json!({"raised": {"retryable": true}})
        );
        assert_eq!(wire(FailureKind::RetryRequested), "retry");
        assert_eq!(wire(FailureKind::HardTimeLimit), "hard_time_limit");
        for kind in [
            FailureKind::Cancelled(CancelCause::Requested),
            FailureKind::QueueFull,
            FailureKind::Raised { retryable: false },
        ] {
            assert_eq!(
                serde_json::from_value::<FailureKind>(wire(kind)).unwrap(),
                kind
            );
        }
    }

    #[test]
    fn task_ids_look_like_uuids_and_differ() {
        let a = new_task_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert_ne!(a, new_task_id());
    }
}
