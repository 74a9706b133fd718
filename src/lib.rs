//! `worker`: runs task plugins out of process and routes tasks to them.
//!
//! Data flows one way: a source (the control socket, `worker run`) hands a [`task::TaskRequest`]
//! to the [`dispatch::Dispatcher`], which routes it to the [`supervisor`]'s pool for the plugin
//! that serves it; an instance runs it on a child process and the task ends with exactly one
//! [`task::Outcome`]. See ARCHITECTURE.md for the map and the invariants.

mod allocator;
pub mod broker_status;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dispatch;
pub mod events;
pub mod framed;
pub mod idmap;
pub mod install;
mod json_object;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod offers;
pub mod probe;
pub mod reload;
pub mod results;
pub mod runtime;
pub mod socket;
pub mod source;
pub mod supervisor;
pub mod sync;
pub mod task;
pub mod task_id;

/// The worker's own name and version, sent to plugins at `initialize`.
pub const WORKER_NAME: &str = "worker";
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// This process's id, asked of the kernel once: Celery's task events and requests name it
/// per task, and `getpid` is a system call each time.
pub fn worker_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}
