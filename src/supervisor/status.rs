//! Status reports of plugins and instances, as shown by `worker plugins list` and the
//! control API. Plain serializable data.

use serde::{Deserialize, Serialize};

/// The state of a whole plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    /// No instance has finished its handshake yet.
    Starting,
    /// At least one instance has been ready.
    Running,
    /// Gave up restarting (or incompatible); tasks fail fast with this reason until it is
    /// tried again: after `restart.failed_retry`, on reload, or on `plugins restart`.
    Failed(String),
    Stopping,
    Stopped,
}

impl std::fmt::Display for PluginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginState::Starting => f.write_str("starting"),
            PluginState::Running => f.write_str("running"),
            PluginState::Failed(_) => f.write_str("failed"),
            PluginState::Stopping => f.write_str("stopping"),
            PluginState::Stopped => f.write_str("stopped"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Ready,
    /// Died; the restart is scheduled (or the exit is being processed).
    Crashed,
    /// Waiting out the restart backoff.
    Backoff,
    Stopping,
    Stopped,
    Failed,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub index: u32,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub uptime_secs: Option<f64>,
    pub restarts: u32,
    pub in_flight: usize,
    pub done: u64,
    pub failed: u64,
    /// Stray (non-protocol) lines the process wrote to stdout.
    pub stray_stdout_lines: u64,
    /// Processes of this instance ended for breaking the protocol.
    #[serde(default)]
    pub protocol_violations: u64,
    pub last_exit: Option<String>,
    /// The last few exits (newest last), for `plugins inspect`.
    #[serde(default)]
    pub recent_exits: Vec<ExitRecord>,
    pub stderr_tail: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub state: PluginState,
    pub tasks: Vec<String>,
    pub queued: usize,
    pub uptime_secs: f64,
    pub instances: Vec<InstanceStatus>,
    /// When a `failed` plugin is tried again on its own (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_try_at: Option<f64>,
    /// Its event subscription, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsStatus>,
    /// The queue and result backends it provides, if any (protocol 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<BackendsStatus>,
}

/// A queue or result backend's work so far: offers taken and answered, results stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendsStatus {
    /// `queue_backend`, `result_backend`.
    pub provides: Vec<String>,
    /// Offers each process may have unanswered (`queue_backend.window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    /// Offered tasks running or waiting for their results to be stored.
    pub offers_in_flight: u64,
    /// Offers answered with a final state.
    pub offers_answered: u64,
    /// Offers answered "not run, offer again later" (stopping, plugin unavailable, ...).
    pub offers_not_taken: u64,
    /// Offers refused as malformed or beyond the window.
    pub offers_refused: u64,
    /// Final states it stored.
    pub results_stored: u64,
    /// `result.store` attempts that failed (each retried with backoff).
    pub result_store_failures: u64,
    /// Final states waiting to be stored (their tasks not answered or acked yet).
    pub results_pending: u64,
}

/// What a subscribing plugin was sent and what it missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsStatus {
    pub subscribed: Vec<String>,
    pub delivered: u64,
    /// Dropped because its buffer or its stdin was full (it was not keeping up).
    pub dropped: u64,
}

/// One past exit of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub reason: String,
}
