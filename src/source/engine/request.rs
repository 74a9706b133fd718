//! The request the dispatcher sees for a Celery task, whatever broker brought it.

use super::ActiveInfo;
use crate::source::celery::CeleryTask;
use crate::task::TaskRequest;
use plugin_protocol::RequestInfo;
use std::time::{Duration, SystemTime};

/// The request the dispatcher sees for `task`: the message's time limits, else those set by
/// `celery control time_limit` (`controlled`), else the manifest's (applied below).
pub fn task_request(
    task: &CeleryTask,
    info: &ActiveInfo,
    transport: &str,
    controlled: (Option<Duration>, Option<Duration>),
) -> TaskRequest {
    let iso = |t: Option<SystemTime>| {
        t.map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
        })
    };
    TaskRequest {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        soft_time_limit: task.soft_time_limit.or(controlled.0),
        hard_time_limit: task.hard_time_limit.or(controlled.1),
        submitter: format!(
            "{transport}: queue {}",
            info.delivery.queue.as_deref().unwrap_or_default()
        ),
        delivery_info: info.delivery.clone(),
        request_info: RequestInfo {
            retries: task.retries,
            eta: iso(task.eta),
            expires: iso(task.expires),
            parent_id: task.parent_id.clone(),
            root_id: task.root_id.clone(),
            group: task.group.clone(),
            hostname: None,
            headers: task.headers.clone(),
        },
        capture_log: false,
    }
}
