//! The Celery engine: what a Celery worker decides and keeps, whatever carries its messages.
//! Who answers each task id ([`ledger`]), the revoked ids ([`revoked`]), what a delivery does
//! before it runs and how its outcome ends on the wire ([`rules`]), and the per-task limits
//! remote control sets ([`task_controls`]), all held in one [`TaskTable`] with what
//! `inspect active` shows of each task ([`ActiveInfo`]). No transport types here: a transport (the AMQP
//! source) carries the decisions out, and everything here is unit-tested without a broker.

pub(crate) mod announce;
pub(crate) mod delivery;
pub(crate) mod girder_job;
/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod ledger;
pub(crate) mod monitor;
pub(crate) mod remote;
pub mod request;
pub(crate) mod retry;
/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod revoked;
pub(crate) mod rules;
pub(crate) mod task_controls;
pub mod transport;
pub mod worker;
pub(crate) mod workflow;

#[cfg(test)]
mod tests;

/// The longest id, reply queue or correlation id the worker keeps or sends back (AMQP's short
/// string, which every transport's ids are held to, so a task can move between brokers).
pub const MAX_ID_BYTES: usize = 255;

use ledger::Ledger;
use revoked::Revoked;
use serde::Serialize;
use serde_json::{Map, Value};

/// The task ids this worker holds: owners and answered ids, eta tasks being held, and revoked
/// ids; `A` is how the transport acks a message. A source keeps it behind one lock, so a delivery deciding what to do and a revoke marking its
/// tasks can never wait on each other (they once took two locks in opposite orders).
pub(crate) struct TaskTable<A> {
    pub(crate) ledger: Ledger<A, std::sync::Arc<ActiveInfo>>,
    pub(crate) reserved: crate::idmap::TaskMap<std::sync::Arc<ActiveInfo>>,
    pub(crate) revoked: Revoked,
}

/// What `celery inspect active` shows for a task.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveInfo {
    pub(crate) id: crate::task::TaskId,
    pub(crate) name: String,
    pub(crate) args: std::sync::Arc<Vec<Value>>,
    pub(crate) kwargs: std::sync::Arc<Map<String, Value>>,
    #[serde(rename = "type")]
    pub(crate) type_: String,
    pub(crate) hostname: String,
    pub(crate) time_start: f64,
    pub(crate) acknowledged: bool,
    pub(crate) worker_pid: u32,
    /// What the plugin is told of where the task came from; `inspect active` shows part of it
    /// as `delivery_info`, written only when asked for.
    #[serde(rename = "delivery_info", serialize_with = "inspect_delivery_info")]
    pub(crate) delivery: plugin_protocol::DeliveryInfo,
}

/// `delivery_info` as a Celery worker's `inspect active` shows it.
fn inspect_delivery_info<S: serde::Serializer>(
    d: &plugin_protocol::DeliveryInfo,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(4))?;
    map.serialize_entry("exchange", d.exchange.as_deref().unwrap_or_default())?;
    map.serialize_entry("routing_key", d.routing_key.as_deref().unwrap_or_default())?;
    map.serialize_entry("priority", &d.priority.unwrap_or(0))?;
    map.serialize_entry("redelivered", &d.redelivered.unwrap_or(false))?;
    map.end()
}

/// What a Celery worker keeps while it serves, whatever carries its messages: the dispatcher
/// it hands tasks to, its node name, the task table behind its one lock, remote control's task
/// limits, what it has answered, and the tokens of its stop. `A` is how the transport acks a
/// message.
pub(crate) struct Engine<A> {
    pub(crate) dispatcher: std::sync::Arc<crate::dispatch::Dispatcher>,
    /// Changed once if another worker holds the same name (see the pidbox claim).
    pub(crate) nodename: std::sync::Mutex<String>,
    /// The one lock of the task-id state (owners, held eta tasks, revoked ids). Never held
    /// across an await, and no other lock is taken while it is held, so it is in no cycle.
    pub(crate) tasks: std::sync::Mutex<TaskTable<A>>,
    /// Wakes handlers holding an eta task so they re-check revocations and stops.
    pub(crate) revoke_signal: tokio::sync::Notify,
    /// Graceful stop, phase 1: consume no more.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
    /// Phase 2: every handler is done; disconnect.
    pub(crate) finished: tokio_util::sync::CancellationToken,
    /// Remote control asked the worker to stop.
    pub(crate) shutdown_requested: tokio_util::sync::CancellationToken,
    pub(crate) started: std::time::SystemTime,
    /// Tasks answered, by name (`inspect stats`' `total`).
    pub(crate) totals: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Every message handler, so a stop can wait for them.
    pub(crate) handlers: tokio_util::task::TaskTracker,
    /// Rate and time limits set by remote control.
    pub(crate) controls: task_controls::TaskControls,
}

impl<A> Engine<A> {
    pub(crate) fn new(
        dispatcher: std::sync::Arc<crate::dispatch::Dispatcher>,
        nodename: String,
        result_memory: usize,
    ) -> Engine<A> {
        Engine {
            dispatcher,
            nodename: std::sync::Mutex::new(nodename),
            tasks: std::sync::Mutex::new(TaskTable {
                ledger: Ledger::new(result_memory),
                reserved: Default::default(),
                revoked: Revoked::default(),
            }),
            revoke_signal: tokio::sync::Notify::new(),
            stopping: tokio_util::sync::CancellationToken::new(),
            finished: tokio_util::sync::CancellationToken::new(),
            shutdown_requested: tokio_util::sync::CancellationToken::new(),
            started: std::time::SystemTime::now(),
            totals: std::sync::Mutex::default(),
            handlers: tokio_util::task::TaskTracker::new(),
            controls: task_controls::TaskControls::default(),
        }
    }

    pub(crate) fn nodename(&self) -> String {
        crate::sync::lock(&self.nodename).clone()
    }

    pub(crate) fn tasks(&self) -> std::sync::MutexGuard<'_, TaskTable<A>> {
        crate::sync::lock(&self.tasks)
    }

    /// Counts a task answered (`inspect stats`).
    pub(crate) fn count_answered(&self, task: &str) {
        let mut totals = crate::sync::lock(&self.totals);
        // The name is copied only the first time it is counted.
        match totals.get_mut(task) {
            Some(n) => *n += 1,
            None => {
                totals.insert(task.to_string(), 1);
            }
        }
    }
}
