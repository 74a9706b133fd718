//! The pool of one plugin: its instances, its bounded task queue, and its restart policy.
//!
//! The pool decides everything about the plugin as a whole: which ready instance gets the
//! next task (least in flight first), when a crashed instance restarts, and when the plugin
//! gives up (`failed`). Those decisions are the pure [`core`]; the actor (`actor.rs`) feeds
//! it commands, instance reports and timers and carries out its effects. The pool hands tasks
//! to instances and never produces their outcomes, except for tasks it refuses or that never
//! left its queue.

mod actor;
mod core;
mod placement;
mod report;
mod shared;

pub use actor::start;

pub use self::core::{CancelMode, Scale, MAX_INSTANCES};

use super::instance::Job;
use super::status::{PluginState, PluginStatus};
use crate::events::EventBus;
use crate::manifest::Manifest;
use crate::task::{Cancellation, Failure, Outcome};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Options that come from the worker rather than the manifest.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub worker_name: String,
    pub max_line_bytes: usize,
    pub queue_capacity: usize,
    /// Where each plugin's writable data directory is made (`<state_dir>/data/<name>/`);
    /// `None` (tests, benches): no data directory.
    pub state_dir: Option<std::path::PathBuf>,
    /// `plugin_user` of the worker config (see `identity`).
    pub plugin_user: Option<String>,
    /// Where what happens is told to subscribing plugins (see `events`).
    pub events: Arc<EventBus>,
    /// Where each plugin process gets a cgroup of its own, if the worker has one to manage.
    pub cgroups: Option<Arc<super::cgroup::CgroupTree>>,
    /// Where queue backends' offers go (none taken by default).
    pub offers: super::offer::OfferInbox,
}

/// A cheap summary others can wait on (e.g. "ready", "failed").
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    pub state: PluginState,
    pub ready: usize,
    /// Restarts so far, all instances together.
    pub restarts: u64,
    /// Why an instance last crashed, if one did: the cause to report when it never got ready.
    pub last_exit: Option<String>,
}

#[derive(Debug)]
enum PoolCommand {
    Run(Job),
    Cancel {
        task_id: String,
        cancel: Cancellation,
        mode: CancelMode,
        reply: oneshot::Sender<bool>,
    },
    Status(oneshot::Sender<PluginStatus>),
    /// Where each task placed on an instance runs: (task id, instance index, pid).
    Placements(oneshot::Sender<Vec<(crate::task::TaskId, u32, Option<u32>)>>),
    /// Test hook: the actor stops handling anything, as a wedged one would.
    Freeze,
    /// Clear the `failed` state and start the instances again; answers whether it was failed.
    Restart(oneshot::Sender<bool>),
    /// Change the instance count (see `scale`); answers the count now wanted.
    Scale(Scale, oneshot::Sender<Result<usize, String>>),
    Stop {
        grace: Duration,
        done: oneshot::Sender<()>,
    },
}

/// The rest of the worker's side of a pool.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<PoolCommand>,
    /// Where a task is placed without a turn of the actor (see `shared::Shared`).
    shared: Arc<shared::Shared>,
    view: watch::Receiver<PoolView>,
    manifest: Arc<Manifest>,
}

impl PoolHandle {
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Queues a task. Its outcome arrives on `job.reply`, whatever happens to the pool.
    pub async fn run(&self, job: Job) {
        let job = match self.shared.run(job) {
            Ok(()) => return,
            Err(job) => job,
        };
        // The actor's channel, as for a wedged or stopped pool. Usually there is room at once.
        // Otherwise the send is boxed, so that the future of every task does not hold room
        // for that wait.
        let cmd = match self.tx.try_send(PoolCommand::Run(job)) {
            Ok(()) => return,
            // A closed channel refuses the send below at once.
            Err(mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd)) => {
                cmd
            }
        };
        if let Err(mpsc::error::SendError(PoolCommand::Run(job))) =
            Box::pin(self.tx.send(cmd)).await
        {
            let name = &self.manifest.name;
            job.finish(Outcome::Failure(Failure::unavailable(format!(
                "plugin `{name}` is stopped"
            ))));
        }
    }

    /// Asks the task to stop, wherever it is in this pool (with `queued_only`, only if it has
    /// not started yet). False if the pool does not hold it (so).
    pub async fn cancel(&self, task_id: &str, cancel: Cancellation, mode: CancelMode) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = PoolCommand::Cancel {
            task_id: task_id.into(),
            cancel,
            mode,
            reply,
        };
        self.tx.send(cmd).await.is_ok() && rx.await.unwrap_or(false)
    }

    pub async fn status(&self) -> Option<PluginStatus> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(PoolCommand::Status(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Tasks running on this plugin's instances: (task id, instance index, pid).
    pub async fn placements(&self) -> Vec<(crate::task::TaskId, u32, Option<u32>)> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(PoolCommand::Placements(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Test hook: wedges the pool actor (see `Dispatcher::freeze`).
    pub async fn freeze(&self) {
        let _ = self.tx.send(PoolCommand::Freeze).await;
    }

    /// Starts a `failed` plugin again at once. False if it was not failed (nothing done).
    pub async fn restart(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(PoolCommand::Restart(tx)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Grows or shrinks the instance count, or sets autoscale bounds (see `scale`): the count
    /// now wanted, or why it was refused.
    pub async fn scale(&self, scale: Scale) -> Result<usize, String> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(PoolCommand::Scale(scale, tx)).await.is_err() {
            return Err(format!("plugin `{}` is stopped", self.manifest.name));
        }
        rx.await
            .unwrap_or_else(|_| Err(format!("plugin `{}` is stopped", self.manifest.name)))
    }

    /// Stops every instance (see `instance::Command::Stop`) and fails queued tasks.
    pub async fn stop(&self, grace: Duration) {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(PoolCommand::Stop { grace, done })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Waits until an instance is ready (Ok) or the plugin has failed or stopped, up to
    /// `deadline`; otherwise returns the state it is still in.
    pub async fn wait_ready(&self, deadline: Instant) -> Result<(), PluginState> {
        let mut view = self.view();
        let settled = tokio::time::timeout_at(
            deadline,
            view.wait_for(|v| {
                v.ready > 0 || matches!(v.state, PluginState::Failed(_) | PluginState::Stopped)
            }),
        )
        .await;
        let ready = matches!(&settled, Ok(Ok(v)) if v.ready > 0);
        drop(settled);
        let state = view.borrow().state.clone();
        if ready {
            Ok(())
        } else {
            Err(state)
        }
    }

    pub fn view(&self) -> watch::Receiver<PoolView> {
        self.view.clone()
    }
}
