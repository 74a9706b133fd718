//! A Celery task message read into the task, what `inspect active` shows of it and the
//! request the dispatcher sees, whatever broker brought it. Each transport reads its own
//! wire (properties, envelope) into an [`Envelope`] and [`DeliveryFacts`] first.

use super::{ActiveInfo, MAX_ID_BYTES};
use crate::source::celery::{self, CeleryTask, Envelope};
use crate::task::TaskRequest;
use plugin_protocol::RequestInfo;
use std::time::{Duration, SystemTime};

/// Where a message came from and how, as its transport saw it.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryFacts<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub priority: Option<u8>,
    /// The broker says it delivered this message before.
    pub redelivered: bool,
    /// How many times a quorum queue delivered it before (`x-delivery-count`).
    pub delivery_count: Option<u64>,
}

/// Why a message is not a task this worker can take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unreadable {
    #[error("its {field} is {len} bytes, over AMQP's short-string limit of {MAX_ID_BYTES}; ids and reply queues are answered as short strings")]
    TooLong { field: &'static str, len: usize },
    #[error("it is not a readable Celery task: {0}")]
    Decode(#[from] celery::DecodeError),
}

/// Reads the task of `env`. `node` is this worker's name (for `inspect active`), `now` the
/// time it arrived (epoch seconds).
pub fn read_task(
    env: &Envelope,
    facts: &DeliveryFacts,
    node: &str,
    now: f64,
) -> Result<(CeleryTask, ActiveInfo), Unreadable> {
    let task = celery::decode(env)?;
    check_ids(&task)?;
    let info = ActiveInfo {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        type_: task.name.clone(),
        hostname: node.to_string(),
        time_start: now,
        acknowledged: false,
        worker_pid: crate::worker_pid(),
        delivery: plugin_protocol::DeliveryInfo {
            queue: Some(facts.queue.to_string()),
            exchange: Some(facts.exchange.to_string()),
            routing_key: Some(facts.routing_key.to_string()),
            serializer: Some(task.serializer.to_string()),
            priority: facts.priority,
            redelivered: Some(facts.redelivered),
            delivery_count: facts.delivery_count,
        },
    };
    Ok((task, info))
}

/// Every id the worker keeps or publishes back must fit a short string.
fn check_ids(task: &CeleryTask) -> Result<(), Unreadable> {
    let fields = [
        ("task id", Some(task.id.as_str())),
        ("reply_to", task.reply_to.as_deref()),
        ("correlation_id", Some(task.correlation_id.as_str())),
        ("parent_id", task.parent_id.as_deref()),
        ("root_id", task.root_id.as_deref()),
        ("group", task.group.as_deref()),
    ];
    for (field, value) in fields {
        if let Some(v) = value.filter(|v| v.len() > MAX_ID_BYTES) {
            return Err(Unreadable::TooLong {
                field,
                len: v.len(),
            });
        }
    }
    Ok(())
}

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
