//! What each moment of a task tells Celery's event stream (`task-received`, `-started`,
//! `-retried`, `-revoked`, `-succeeded`, `-failed`), queued on the worker's
//! [`Monitor`](super::monitor::Monitor) only while task events are on.

use super::monitor::Event;
use super::rules::Settlement;
use super::worker::{Transport, Worker};
use crate::source::celery::{state, CeleryTask};
use crate::source::pyrepr::{args_repr, exception_repr, kwargs_repr, repr};
use serde_json::Value;
use std::time::SystemTime;

/// A `worker-online`, `-heartbeat` or `-offline` event for `shared`, with the state Flower
/// shows.
pub(crate) fn worker_event<T: Transport>(shared: &Worker<T>, kind: &str) -> Event {
    shared
        .monitor
        .worker_event(&shared.engine.nodename(), shared.active_count(), kind)
}

/// Queues `task-retried` (then `task-started` again) for a task the dispatcher runs again
/// after its plugin's process died under it (`reason` as the exception, as Celery's `Retry`
/// carries it).
pub(crate) fn rerun<T: Transport>(shared: &Worker<T>, task: &CeleryTask, reason: &str) {
    let node = shared.engine.nodename();
    shared.monitor.task(&node, "retried", &task.id, |f| {
        f.field("exception", &exception_repr("Retry", reason))
            .field("traceback", "");
    });
    shared.monitor.task(&node, "started", &task.id, |_| {});
}

/// `task-received` and `task-started` for Flower and `celery events` (when task events are on).
pub(crate) fn start<T: Transport>(shared: &Worker<T>, task: &CeleryTask) {
    shared.monitor.count_started();
    // Off (the default): nothing built on a task's way, not even the node name.
    if !shared.monitor.task_events() {
        return;
    }
    let node = shared.engine.nodename();
    shared.monitor.task(&node, "received", &task.id, |f| {
        let iso = |t: Option<SystemTime>| {
            t.map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
        };
        f.field("name", &task.name)
            .field("args", &args_repr(&task.args))
            .field("kwargs", &kwargs_repr(&task.kwargs))
            .field("root_id", task.root_id.as_deref().unwrap_or(&task.id))
            .field("parent_id", &task.parent_id)
            .field("retries", &task.retries)
            .field("eta", &iso(task.eta))
            .field("expires", &iso(task.expires));
    });
    shared.monitor.task(&node, "started", &task.id, |_| {});
}

/// `task-retried` for a task its plugin asked to run again later.
pub(crate) fn retried<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    result: &Value,
    traceback: Option<&str>,
) {
    if !shared.monitor.task_events() {
        return;
    }
    let exc_type = result["exc_type"].as_str().unwrap_or("Retry");
    let message = result["exc_message"][0].as_str().unwrap_or_default();
    let exception = exception_repr(exc_type, message);
    shared
        .monitor
        .task(&shared.engine.nodename(), "retried", &task.id, |f| {
            f.field("exception", &exception)
                .field("traceback", traceback.unwrap_or_default());
        });
}

/// `task-revoked` for a task revoked or expired before it started.
pub(crate) fn revoked<T: Transport>(shared: &Worker<T>, task: &CeleryTask, reason: &str) {
    shared
        .monitor
        .task(&shared.engine.nodename(), "revoked", &task.id, |f| {
            f.field("terminated", &false)
                .field("signum", &())
                .field("expired", &(reason == "expired"));
        });
}

/// `task-succeeded`, `task-failed` or `task-revoked` for a task that ran; nothing for one
/// given back to the queue.
pub(crate) fn end<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    settlement: &Settlement,
    runtime: std::time::Duration,
) {
    let Settlement::Answer {
        status,
        result,
        traceback,
        ..
    } = settlement
    else {
        return;
    };
    if !shared.monitor.task_events() {
        return;
    }
    let node = shared.engine.nodename();
    match *status {
        state::SUCCESS => shared.monitor.task(&node, "succeeded", &task.id, |f| {
            f.field("result", &repr(result))
                .field("runtime", &runtime.as_secs_f64());
        }),
        state::REVOKED => {
            let terminated = result["exc_message"]
                .as_array()
                .and_then(|m| m.first())
                .and_then(Value::as_str)
                == Some("terminated");
            shared.monitor.task(&node, "revoked", &task.id, |f| {
                f.field("terminated", &terminated)
                    .field("signum", &terminated.then_some(15))
                    .field("expired", &false);
            })
        }
        _ => {
            let exc_type = result["exc_type"].as_str().unwrap_or("Exception");
            let message = match &result["exc_message"] {
                Value::Array(parts) => parts.first().and_then(Value::as_str).unwrap_or_default(),
                Value::String(m) => m.as_str(),
                _ => "",
            };
            shared.monitor.task(&node, "failed", &task.id, |f| {
                f.field("exception", &exception_repr(exc_type, message))
                    .field("traceback", traceback.as_deref().unwrap_or_default());
            })
        }
    }
}
