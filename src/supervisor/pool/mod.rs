//! The pool of one plugin: its instances, its bounded task queue, and its restart policy.
//!
//! The pool actor owns every decision about the plugin as a whole: which ready instance gets
//! the next task (least in flight first), when a crashed instance restarts, and when the
//! plugin gives up (`failed`). It hands tasks to instances and never produces their outcomes,
//! except for tasks it refuses or that never left its queue.

mod placement;
mod report;
mod scale;
mod slots;

pub use scale::{Scale, MAX_INSTANCES};

use placement::Refusal;
use slots::Slot;

use super::instance::{Command, InstanceEvent, Job};
use super::restart::RestartWindow;
use super::status::{InstanceState, PluginState, PluginStatus};
use crate::events::{DeliveryStats, Event, EventBus, Subscription};
use crate::manifest::Manifest;
use crate::task::{Cancellation, Failure, FailureKind, Outcome};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::task::TaskTracker;

/// Exits remembered per instance for `plugins inspect`.
const RECENT_EXITS: usize = 10;

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

/// How far a cancel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// Only a task still waiting in the queue (dropped); a running one is left alone.
    QueuedOnly,
    /// Drop it if queued; if running, send `task.cancel` and let the plugin decide: no kill
    /// follows (Celery's plain `revoke`: the task may still finish with its result).
    Cooperative,
    /// Drop it if queued; if running, `task.cancel`, then kill its process after the plugin's
    /// `cancel_grace` if it has not ended.
    Escalate,
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
    Placements(oneshot::Sender<Vec<(String, u32, Option<u32>)>>),
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
    view: watch::Receiver<PoolView>,
    manifest: Arc<Manifest>,
}

impl PoolHandle {
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Queues a task. Its outcome arrives on `job.reply`, whatever happens to the pool.
    pub async fn run(&self, job: Job) {
        if let Err(mpsc::error::SendError(PoolCommand::Run(job))) =
            self.tx.send(PoolCommand::Run(job)).await
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
    pub async fn placements(&self) -> Vec<(String, u32, Option<u32>)> {
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

/// Starts the pool and its instances; the pool actor runs on `tracker`.
pub fn start(manifest: Arc<Manifest>, options: PoolOptions, tracker: &TaskTracker) -> PoolHandle {
    let (tx, rx) = mpsc::channel(1024);
    let view = PoolView {
        state: PluginState::Starting,
        ready: 0,
        restarts: 0,
        last_exit: None,
    };
    let (view_tx, view_rx) = watch::channel(view);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let slots = (0..manifest.instances)
        .map(|i| Slot::new(i as usize))
        .collect();
    let subscription = (!manifest.events.is_empty()).then(|| {
        options
            .events
            .subscribe(&manifest.events, crate::events::BUFFER)
    });
    let mut pool = Pool {
        event_stats: subscription.as_ref().map(|s| s.stats.clone()),
        manifest: manifest.clone(),
        options,
        slots,
        queue: VecDeque::new(),
        placements: HashMap::new(),
        state: PluginState::Starting,
        window: RestartWindow::default(),
        events_tx,
        view: view_tx,
        stop_waiters: Vec::new(),
        started: Instant::now(),
        retry_failed_at: None,
        last_exit: None,
        frozen: false,
        autoscale: None,
    };
    for i in 0..pool.slots.len() {
        pool.launch(i);
    }
    tracker.spawn(pool.run(rx, events_rx, subscription));
    PoolHandle {
        tx,
        view: view_rx,
        manifest,
    }
}

struct Pool {
    manifest: Arc<Manifest>,
    options: PoolOptions,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    /// Which slot each placed task runs on.
    placements: HashMap<String, usize>,
    state: PluginState,
    window: RestartWindow,
    events_tx: mpsc::UnboundedSender<InstanceEvent>,
    view: watch::Sender<PoolView>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    started: Instant,
    /// While `failed`: when it is tried again on its own (`restart.failed_retry`).
    retry_failed_at: Option<(Instant, SystemTime)>,
    /// The newest crash of any instance.
    last_exit: Option<String>,
    /// Test hook: the actor has stopped answering (see `PoolCommand::Freeze`).
    frozen: bool,
    /// The delivery counts of its event subscription, if it subscribes.
    event_stats: Option<Arc<DeliveryStats>>,
    /// `(min, max)` instances while autoscale is on (see `scale`).
    autoscale: Option<(usize, usize)>,
}

/// The next event of a subscription; never, without one.
async fn next_event(subscription: &mut Option<Subscription>) -> Option<Event> {
    match subscription {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

impl Pool {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<PoolCommand>,
        mut events: mpsc::UnboundedReceiver<InstanceEvent>,
        mut subscription: Option<Subscription>,
    ) {
        let mut events_retry_at: Option<Instant> = None;
        let mut autoscale_at = Instant::now();
        loop {
            let next_restart = self
                .slots
                .iter()
                .filter_map(|s| s.restart_at)
                .chain(self.retry_failed_at.map(|(at, _)| at))
                .min();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        self.on_command(cmd);
                        // A burst of submissions is queued together, then placed once.
                        for _ in 0..256 {
                            match commands.try_recv() {
                                Ok(cmd) => self.on_command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.begin_stop(self.manifest.timeouts.shutdown_grace),
                },
                Some(ev) = events.recv() => {
                    // Handle every event already waiting before placing tasks again.
                    self.on_instance(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.on_instance(ev);
                    }
                }
                _ = sleep_until(next_restart.unwrap_or_else(Instant::now)), if next_restart.is_some() => self.restart_due(),
                // Taken only while an instance can take it; meanwhile the buffer holds (or drops).
                Some(event) = next_event(&mut subscription), if self.takes_events() => {
                    self.deliver_event(event);
                }
                _ = sleep_until(autoscale_at), if self.autoscale.is_some() => {
                    autoscale_at = Instant::now() + scale::AUTOSCALE_TICK;
                    self.autoscale_tick();
                }
                _ = sleep_until(events_retry_at.unwrap_or_else(Instant::now)), if events_retry_at.is_some() => {
                    events_retry_at = None;
                    if let Some(stats) = &self.event_stats {
                        stats.unblock();
                    }
                }
            }
            if events_retry_at.is_none() && self.event_stats.as_ref().is_some_and(|s| s.blocked()) {
                events_retry_at = Some(Instant::now() + crate::events::BLOCKED_RETRY);
            }
            if matches!(self.state, PluginState::Stopping | PluginState::Stopped) {
                // A stopping plugin is told nothing more; its replacement subscribes anew.
                subscription = None;
            }
            if self.frozen {
                std::future::pending::<()>().await;
            }
            self.place_queued();
            self.publish();
            if self.state == PluginState::Stopped {
                for w in self.stop_waiters.drain(..) {
                    let _ = w.send(());
                }
                // Commands that raced the stop still get answers.
                commands.close();
                while let Ok(cmd) = commands.try_recv() {
                    self.on_command(cmd);
                }
                return;
            }
        }
    }

    fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The instance that gets events: the first ready one.
    fn event_taker(&self) -> Option<&super::instance::InstanceHandle> {
        self.slots
            .iter()
            .find(|s| s.state == InstanceState::Ready)
            .and_then(|s| s.handle.as_ref())
    }

    /// Whether the next event may be taken from the buffer now.
    fn takes_events(&self) -> bool {
        self.event_stats.as_ref().is_some_and(|s| !s.blocked()) && self.event_taker().is_some()
    }

    fn deliver_event(&mut self, event: Event) {
        let (Some(stats), Some(taker)) = (&self.event_stats, self.event_taker()) else {
            return;
        };
        let cmd = Command::Event {
            event,
            stats: stats.clone(),
        };
        if taker.send(cmd).is_err() {
            stats.count_drop();
        }
    }

    fn on_command(&mut self, cmd: PoolCommand) {
        match cmd {
            PoolCommand::Run(job) => self.admit(job),
            PoolCommand::Cancel {
                task_id,
                cancel,
                mode,
                reply,
            } => {
                let _ = reply.send(self.cancel(&task_id, cancel, mode));
            }
            PoolCommand::Status(reply) => {
                let _ = reply.send(self.status());
            }
            PoolCommand::Placements(reply) => {
                let placed = self
                    .placements
                    .iter()
                    .map(|(id, &i)| (id.clone(), self.slots[i].index as u32, self.slots[i].pid))
                    .collect();
                let _ = reply.send(placed);
            }
            PoolCommand::Freeze => {
                tracing::warn!(plugin = %self.name(), "test hook: this pool actor freezes for good");
                self.frozen = true;
            }
            PoolCommand::Restart(reply) => {
                let failed = matches!(self.state, PluginState::Failed(_));
                if failed {
                    self.revive("restart requested");
                }
                let _ = reply.send(failed);
            }
            PoolCommand::Scale(scale, reply) => {
                let _ = reply.send(self.scale(scale));
            }
            PoolCommand::Stop { grace, done } => {
                self.stop_waiters.push(done);
                self.begin_stop(grace);
            }
        }
    }

    fn admit(&mut self, job: Job) {
        let capacity = self.options.queue_capacity;
        let failure = match placement::refusal(&self.state, self.queue.len(), capacity) {
            None => return self.queue.push_back(job),
            Some(Refusal::Failed(reason)) => Failure::unavailable(format!(
                "plugin `{}` is failed: {reason}; {}",
                self.name(),
                self.next_try()
            )),
            Some(Refusal::Stopping) => {
                Failure::unavailable(format!("plugin `{}` is stopping", self.name()))
            }
            Some(Refusal::Full { queued }) => Failure::new(
                FailureKind::QueueFull,
                "QueueFull",
                "worker.errors",
                format!(
                    "plugin `{}` has {queued} tasks waiting (queue_capacity); try again later or add instances",
                    self.name(),
                ),
            ),
        };
        job.finish(Outcome::Failure(failure));
    }

    fn cancel(&mut self, task_id: &str, cancel: Cancellation, mode: CancelMode) -> bool {
        if let Some(pos) = self.queue.iter().position(|j| j.request.id == task_id) {
            let job = self.queue.remove(pos).expect("position is in range");
            let failure = Failure::cancelled(cancel.cause, &cancel.reason);
            job.finish(Outcome::Failure(failure));
            return true;
        }
        if mode == CancelMode::QueuedOnly {
            return false;
        }
        let Some(&slot) = self.placements.get(task_id) else {
            return false;
        };
        let cmd = Command::Cancel {
            task_id: task_id.into(),
            cancel,
            escalate: mode == CancelMode::Escalate,
        };
        self.slots[slot]
            .handle
            .as_ref()
            .is_some_and(|h| h.send(cmd).is_ok())
    }

    /// Hands queued tasks to ready instances with room, least loaded first.
    fn place_queued(&mut self) {
        let limit = self.manifest.concurrency as usize;
        while !self.queue.is_empty() {
            let slots = self.slots.iter().map(|s| (s.state, s.in_flight));
            let Some(i) = placement::choose(slots, limit) else {
                return;
            };
            let job = self.queue.pop_front().expect("queue is not empty");
            let task_id = job.request.id.clone();
            let handle = self.slots[i]
                .handle
                .as_ref()
                .expect("a ready slot has a handle");
            match handle.send(Command::Run(job)) {
                Ok(()) => {
                    self.slots[i].in_flight += 1;
                    self.slots[i].idle_since = None;
                    self.placements.insert(task_id, i);
                }
                Err(Command::Run(job)) => {
                    // The instance just ended; its Exited event is on the way.
                    self.slots[i].state = InstanceState::Crashed;
                    self.queue.push_front(job);
                }
                Err(_) => unreachable!("send gives back the command it was given"),
            }
        }
    }

    fn begin_stop(&mut self, grace: Duration) {
        if matches!(self.state, PluginState::Stopping | PluginState::Stopped) {
            return;
        }
        self.state = PluginState::Stopping;
        self.retry_failed_at = None;
        let name = self.manifest.name.clone();
        // Rejected, not failed: the dispatcher reruns them wherever the task is routed now
        // (the replacement after a reload), or ends them if nothing serves it any more.
        for job in self.queue.drain(..) {
            let failure = Failure::rejected(format!(
                "plugin `{name}` stopped before the task could start"
            ));
            job.finish(Outcome::Failure(failure));
        }
        for slot in &mut self.slots {
            slot.restart_at = None;
            match &slot.handle {
                Some(h) => {
                    slot.state = InstanceState::Stopping;
                    let _ = h.send(Command::Stop { grace });
                }
                None => slot.state = InstanceState::Stopped,
            }
        }
        if self.slots.iter().all(|s| s.handle.is_none()) {
            self.state = PluginState::Stopped;
        }
    }
}
