//! The Celery engine: what a Celery worker decides and keeps, whatever carries its messages.
//! Who answers each task id ([`ledger`]), the revoked ids ([`revoked`]), what a delivery does
//! before it runs and how its outcome ends on the wire ([`rules`]), and the per-task limits
//! remote control sets ([`task_controls`]), all held in one [`TaskTable`] with what
//! `inspect active` shows of each task ([`ActiveInfo`]). No transport types here: a transport (the AMQP
//! source) carries the decisions out, and everything here is unit-tested without a broker.

/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod ledger;
/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod revoked;
pub(crate) mod rules;
pub(crate) mod task_controls;

use ledger::Ledger;
use revoked::Revoked;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The task ids this worker holds: owners and answered ids, eta tasks being held, and revoked
/// ids; `A` is how the transport acks a message. A source keeps it behind one lock, so a delivery deciding what to do and a revoke marking its
/// tasks can never wait on each other (they once took two locks in opposite orders).
pub(crate) struct TaskTable<A> {
    pub(crate) ledger: Ledger<A, ActiveInfo>,
    pub(crate) reserved: HashMap<String, ActiveInfo>,
    pub(crate) revoked: Revoked,
}

/// What `celery inspect active` shows for a task.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveInfo {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) args: Vec<Value>,
    pub(crate) kwargs: Map<String, Value>,
    #[serde(rename = "type")]
    pub(crate) type_: String,
    pub(crate) hostname: String,
    pub(crate) time_start: f64,
    pub(crate) acknowledged: bool,
    pub(crate) delivery_info: Value,
    pub(crate) worker_pid: u32,
    /// What the plugin is told of where the task came from.
    #[serde(skip)]
    pub(crate) delivery: plugin_protocol::DeliveryInfo,
}
