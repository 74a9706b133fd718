//! The words a transport answers the Celery engine in (see
//! [`Transport`](super::worker::Transport)): how a reply or a publish ended, and what remote
//! control is shown of the broker.

use serde_json::{Map, Value};

/// A queue remote control asks to consume (`add_consumer`), as Celery names its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedQueue {
    pub name: String,
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: String,
}

/// What `inspect stats` and `inspect conf` show of the broker.
pub struct BrokerSettings {
    /// The broker URL in use (its password is masked where it is shown).
    pub url: String,
    pub prefetch: u16,
    /// The queues consumed now.
    pub queues: Vec<String>,
    /// The transport's own entries of `inspect conf`.
    pub conf: Map<String, Value>,
}

/// How a final-state reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The broker confirmed it into the reply queue (or the result backend stored it).
    Confirmed,
    /// The reply queue did not exist for `result_retry_timeout`; logged as undeliverable.
    Undeliverable,
    /// The reply queue does not exist (returned at once); asked not to wait for it.
    Returned,
    /// The worker is stopping for good before it could be confirmed.
    GaveUp,
}

/// What a final-state reply does when the broker returns it (no such reply queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returns {
    /// Say so at once (`Delivered::Returned`): the caller frees the task's message first.
    Report,
    /// Retry with backoff for `result_retry_timeout`.
    Retry,
}

/// How publishing a task message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Confirmed,
    /// The broker refused it (no such exchange, access refused...), or it cannot be sent at
    /// all (a name longer than the wire allows): the step's workflow fails with this reason.
    Refused(String),
    /// The worker is stopping for good before it could be confirmed.
    Stopped,
}
