//! What each moment of a task tells Celery's event stream (`task-received`, `-started`,
//! `-retried`, `-revoked`, `-succeeded`, `-failed`), queued on the worker's
//! [`Monitor`](super::monitor::Monitor) only while task events are on.

use super::monitor::Event;
use super::rules::Settlement;
use super::worker::{Transport, Worker};
use crate::source::celery::{state, CeleryTask};
use crate::source::pyrepr::{args_repr, exception_repr, kwargs_repr, repr};
use serde_json::{json, Map, Value};
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
    shared.monitor.task(&node, "retried", &task.id, || {
        let mut f = Map::new();
        f.insert("exception".into(), json!(exception_repr("Retry", reason)));
        f.insert("traceback".into(), json!(""));
        f
    });
    shared.monitor.task(&node, "started", &task.id, Map::new);
}

/// `task-received` and `task-started` for Flower and `celery events` (when task events are on).
pub(crate) fn start<T: Transport>(shared: &Worker<T>, task: &CeleryTask) {
    shared.monitor.count_started();
    // Off (the default): nothing built on a task's way, not even the node name.
    if !shared.monitor.task_events() {
        return;
    }
    let node = shared.engine.nodename();
    shared.monitor.task(&node, "received", &task.id, || {
        let iso = |t: Option<SystemTime>| {
            t.map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
        };
        let mut f = Map::new();
        f.insert("name".into(), json!(task.name));
        f.insert("args".into(), json!(args_repr(&task.args)));
        f.insert("kwargs".into(), json!(kwargs_repr(&task.kwargs)));
        f.insert(
            "root_id".into(),
            json!(task.root_id.as_deref().unwrap_or(&task.id)),
        );
        f.insert("parent_id".into(), json!(task.parent_id));
        f.insert("retries".into(), json!(task.retries));
        f.insert("eta".into(), json!(iso(task.eta)));
        f.insert("expires".into(), json!(iso(task.expires)));
        f
    });
    shared.monitor.task(&node, "started", &task.id, Map::new);
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
        .task(&shared.engine.nodename(), "retried", &task.id, || {
            let mut f = Map::new();
            f.insert("exception".into(), json!(exception));
            f.insert("traceback".into(), json!(traceback.unwrap_or_default()));
            f
        });
}

/// `task-revoked` for a task revoked or expired before it started.
pub(crate) fn revoked<T: Transport>(shared: &Worker<T>, task: &CeleryTask, reason: &str) {
    shared
        .monitor
        .task(&shared.engine.nodename(), "revoked", &task.id, || {
            let mut f = Map::new();
            f.insert("terminated".into(), json!(false));
            f.insert("signum".into(), Value::Null);
            f.insert("expired".into(), json!(reason == "expired"));
            f
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
    let mut f = Map::new();
    let kind = match *status {
        state::SUCCESS => {
            f.insert("result".into(), json!(repr(result)));
            f.insert("runtime".into(), json!(runtime.as_secs_f64()));
            "succeeded"
        }
        state::REVOKED => {
            let terminated = result["exc_message"]
                .as_array()
                .and_then(|m| m.first())
                .and_then(Value::as_str)
                == Some("terminated");
            f.insert("terminated".into(), json!(terminated));
            f.insert(
                "signum".into(),
                if terminated { json!(15) } else { Value::Null },
            );
            f.insert("expired".into(), json!(false));
            "revoked"
        }
        _ => {
            let exc_type = result["exc_type"].as_str().unwrap_or("Exception");
            let message = match &result["exc_message"] {
                Value::Array(parts) => parts
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Value::String(m) => m.clone(),
                _ => String::new(),
            };
            f.insert(
                "exception".into(),
                json!(exception_repr(exc_type, &message)),
            );
            f.insert(
                "traceback".into(),
                json!(traceback.clone().unwrap_or_default()),
            );
            "failed"
        }
    };
    shared.monitor.task(&node, kind, &task.id, || f);
}
