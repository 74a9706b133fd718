//! The pool of one plugin: its instances, its bounded task queue, and its restart policy.
//!
//! The pool actor owns every decision about the plugin as a whole: which ready instance gets
//! the next task (least in flight first), when a crashed instance restarts, and when the
//! plugin gives up (`failed`). It hands tasks to instances and never produces their outcomes,
//! except for tasks it refuses or that never left its queue.

use super::instance::{
    self, Command, EventKind, ExitReason, InstanceEvent, InstanceHandle, Job, LaunchSpec,
};
use super::process::StderrTail;
use super::restart::{self, Backoff, Decision, RestartWindow};
use super::status::{ExitRecord, InstanceState, InstanceStatus, PluginState, PluginStatus};
use crate::manifest::Manifest;
use crate::task::{Failure, FailureKind, Outcome};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// Exits remembered per instance for `plugins inspect`.
const RECENT_EXITS: usize = 10;

/// Options that come from the worker rather than the manifest.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub worker_name: String,
    pub max_line_bytes: usize,
    pub queue_capacity: usize,
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
        reason: String,
        queued_only: bool,
        reply: oneshot::Sender<bool>,
    },
    Status(oneshot::Sender<PluginStatus>),
    /// Where each task placed on an instance runs: (task id, instance index, pid).
    Placements(oneshot::Sender<Vec<(String, u32, Option<u32>)>>),
    /// Clear the `failed` state and start the instances again; answers whether it was failed.
    Restart(oneshot::Sender<bool>),
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
    pub async fn cancel(&self, task_id: &str, reason: &str, queued_only: bool) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = PoolCommand::Cancel {
            task_id: task_id.into(),
            reason: reason.into(),
            queued_only,
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

    /// Starts a `failed` plugin again at once. False if it was not failed (nothing done).
    pub async fn restart(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(PoolCommand::Restart(tx)).await.is_ok() && rx.await.unwrap_or(false)
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
    pub async fn settle(&self, deadline: Instant) -> Result<(), PluginState> {
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

/// Starts the pool and its instances.
pub fn start(manifest: Arc<Manifest>, options: PoolOptions) -> (PoolHandle, JoinHandle<()>) {
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
    let mut pool = Pool {
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
    };
    for i in 0..pool.slots.len() {
        pool.launch(i);
    }
    let handle = tokio::spawn(pool.run(rx, events_rx));
    (
        PoolHandle {
            tx,
            view: view_rx,
            manifest,
        },
        handle,
    )
}

struct Slot {
    index: usize,
    /// Bumped at each start, so events from a previous process are recognised as stale.
    generation: u64,
    state: InstanceState,
    handle: Option<InstanceHandle>,
    task: Option<JoinHandle<()>>,
    pid: Option<u32>,
    plugin_version: Option<String>,
    started_at: Option<(Instant, SystemTime)>,
    in_flight: usize,
    done: u64,
    failed: u64,
    restarts: u32,
    last_exit: Option<String>,
    recent_exits: VecDeque<ExitRecord>,
    backoff: Backoff,
    restart_at: Option<Instant>,
    stderr: StderrTail,
    stray_lines: Arc<AtomicU64>,
}

impl Slot {
    fn new(index: usize) -> Slot {
        Slot {
            index,
            generation: 0,
            state: InstanceState::Starting,
            handle: None,
            task: None,
            pid: None,
            plugin_version: None,
            started_at: None,
            in_flight: 0,
            done: 0,
            failed: 0,
            restarts: 0,
            last_exit: None,
            recent_exits: VecDeque::new(),
            backoff: Backoff::default(),
            restart_at: None,
            stderr: StderrTail::default(),
            stray_lines: Arc::new(AtomicU64::new(0)),
        }
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
}

impl Pool {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<PoolCommand>,
        mut events: mpsc::UnboundedReceiver<InstanceEvent>,
    ) {
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
            }
            self.pump();
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

    fn launch(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.state = InstanceState::Starting;
        slot.restart_at = None;
        slot.pid = None;
        slot.started_at = Some((Instant::now(), SystemTime::now()));
        let spec = LaunchSpec {
            manifest: self.manifest.clone(),
            index: slot.index as u32,
            slot: i,
            generation: slot.generation,
            worker_name: self.options.worker_name.clone(),
            max_line_bytes: self.options.max_line_bytes,
            stderr: slot.stderr.clone(),
            stray_lines: slot.stray_lines.clone(),
        };
        let (handle, task) = instance::start(spec, self.events_tx.clone());
        slot.handle = Some(handle);
        slot.task = Some(task);
    }

    fn on_command(&mut self, cmd: PoolCommand) {
        match cmd {
            PoolCommand::Run(job) => self.admit(job),
            PoolCommand::Cancel {
                task_id,
                reason,
                queued_only,
                reply,
            } => {
                let _ = reply.send(self.cancel(&task_id, &reason, queued_only));
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
            PoolCommand::Restart(reply) => {
                let failed = matches!(self.state, PluginState::Failed(_));
                if failed {
                    self.revive("restart requested");
                }
                let _ = reply.send(failed);
            }
            PoolCommand::Stop { grace, done } => {
                self.stop_waiters.push(done);
                self.begin_stop(grace);
            }
        }
    }

    fn admit(&mut self, job: Job) {
        let refusal = match &self.state {
            PluginState::Failed(reason) => Some(Failure::unavailable(format!("plugin `{}` is failed: {reason}; {}", self.name(), self.next_try()))),
            PluginState::Stopping | PluginState::Stopped => Some(Failure::unavailable(format!("plugin `{}` is stopping", self.name()))),
            _ if self.queue.len() >= self.options.queue_capacity => Some(Failure::new(
                FailureKind::QueueFull,
                "QueueFull",
                "worker.errors",
                format!(
                    "plugin `{}` has {} tasks waiting (queue_capacity); try again later or add instances",
                    self.name(),
                    self.queue.len()
                ),
            )),
            _ => None,
        };
        match refusal {
            Some(f) => job.finish(Outcome::Failure(f)),
            None => self.queue.push_back(job),
        }
    }

    fn cancel(&mut self, task_id: &str, reason: &str, queued_only: bool) -> bool {
        if let Some(pos) = self.queue.iter().position(|j| j.request.id == task_id) {
            let job = self.queue.remove(pos).expect("position is in range");
            job.finish(Outcome::Failure(Failure::cancelled(reason)));
            return true;
        }
        if queued_only {
            return false;
        }
        let Some(&slot) = self.placements.get(task_id) else {
            return false;
        };
        let cmd = Command::Cancel {
            task_id: task_id.into(),
            reason: reason.into(),
        };
        self.slots[slot]
            .handle
            .as_ref()
            .is_some_and(|h| h.send(cmd).is_ok())
    }

    /// Hands queued tasks to ready instances with room, least loaded first.
    fn pump(&mut self) {
        let limit = self.manifest.concurrency as usize;
        while !self.queue.is_empty() {
            let best = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == InstanceState::Ready && s.in_flight < limit)
                .min_by_key(|(_, s)| s.in_flight)
                .map(|(i, _)| i);
            let Some(i) = best else { return };
            let job = self.queue.pop_front().expect("queue is not empty");
            let task_id = job.request.id.clone();
            let handle = self.slots[i]
                .handle
                .as_ref()
                .expect("a ready slot has a handle");
            match handle.send(Command::Run(job)) {
                Ok(()) => {
                    self.slots[i].in_flight += 1;
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

    fn on_instance(&mut self, ev: InstanceEvent) {
        let Some(slot) = self.slots.get_mut(ev.slot) else {
            return;
        };
        if ev.generation != slot.generation {
            return;
        }
        match ev.kind {
            EventKind::Ready {
                pid,
                plugin_version,
            } => {
                slot.pid = Some(pid);
                slot.plugin_version = Some(plugin_version);
                if slot.state == InstanceState::Starting {
                    slot.state = InstanceState::Ready;
                }
                if self.state == PluginState::Starting {
                    self.state = PluginState::Running;
                }
            }
            EventKind::Finished { task_id, ok } => {
                slot.in_flight = slot.in_flight.saturating_sub(1);
                if ok {
                    slot.done += 1;
                } else {
                    slot.failed += 1;
                }
                self.placements.remove(&task_id);
            }
            EventKind::Exited { reason, ran_for } => self.on_exit(ev.slot, reason, ran_for),
        }
    }

    fn on_exit(&mut self, i: usize, reason: ExitReason, ran_for: Duration) {
        let slot = &mut self.slots[i];
        slot.handle = None;
        slot.task = None;
        slot.in_flight = 0;
        self.placements.retain(|_, s| *s != i);
        let stopping = matches!(self.state, PluginState::Stopping | PluginState::Stopped);
        let described = match &reason {
            ExitReason::Stopped => "stopped".to_string(),
            ExitReason::Crashed(m) | ExitReason::Incompatible(m) => m.clone(),
        };
        if slot.recent_exits.len() == RECENT_EXITS {
            slot.recent_exits.pop_front();
        }
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        slot.recent_exits.push_back(ExitRecord {
            at,
            reason: described,
        });
        let failed = matches!(self.state, PluginState::Failed(_));
        match reason {
            // Stopped while the plugin is live again (revived while this one was stopping).
            ExitReason::Stopped if !stopping && !failed => self.launch(i),
            ExitReason::Stopped => slot.state = InstanceState::Stopped,
            _ if stopping => slot.state = InstanceState::Stopped,
            ExitReason::Incompatible(msg) => {
                slot.last_exit = Some(msg.clone());
                self.last_exit = Some(msg.clone());
                slot.state = InstanceState::Failed;
                self.fail(msg);
            }
            ExitReason::Crashed(msg) => {
                slot.last_exit = Some(msg.clone());
                self.last_exit = Some(msg.clone());
                let decision = restart::decide(
                    &self.manifest.restart,
                    &mut slot.backoff,
                    &mut self.window,
                    Instant::now().into_std(),
                    ran_for,
                    fastrand::f64(),
                );
                match decision {
                    Decision::Restart { after } => {
                        slot.restarts += 1;
                        if after.is_zero() {
                            self.launch(i);
                        } else {
                            tracing::info!(plugin = %self.manifest.name, instance = i, "restarting in {after:?}");
                            slot.state = InstanceState::Backoff;
                            slot.restart_at = Some(Instant::now() + after);
                        }
                    }
                    Decision::GiveUp { restarts, window } => {
                        slot.state = InstanceState::Failed;
                        self.fail(format!("restarted {restarts} times within {window:?} (restart.max_restarts); last exit: {msg}"));
                    }
                }
            }
        }
        if self.state == PluginState::Stopping && self.slots.iter().all(|s| s.handle.is_none()) {
            self.state = PluginState::Stopped;
        }
    }

    /// Puts the plugin in the `failed` state: no restarts until `restart.failed_retry` has
    /// passed (or a reload or `plugins restart`); queued and new tasks fail fast.
    fn fail(&mut self, reason: String) {
        let retry = self.manifest.restart.failed_retry;
        self.retry_failed_at = Some((Instant::now() + retry, SystemTime::now() + retry));
        tracing::error!(plugin = %self.name(), "plugin failed: {reason}; it will be tried again in {retry:?} (`restart.failed_retry`), on reload, or with `worker plugins restart {}`", self.name());
        self.state = PluginState::Failed(reason.clone());
        let next = self.next_try();
        for job in self.queue.drain(..) {
            job.finish(Outcome::Failure(Failure::unavailable(format!(
                "plugin `{}` is failed: {reason}; {next}",
                self.manifest.name
            ))));
        }
        let grace = self.manifest.timeouts.shutdown_grace;
        for slot in &mut self.slots {
            slot.restart_at = None;
            if slot.state == InstanceState::Backoff {
                slot.state = InstanceState::Failed;
            }
            if let Some(h) = &slot.handle {
                let _ = h.send(Command::Stop { grace });
            }
        }
    }

    /// "next try in 4m 59s (restart.failed_retry)" for a failed plugin's refusals.
    fn next_try(&self) -> String {
        match self.retry_failed_at {
            Some((at, _)) => {
                let left = at.saturating_duration_since(Instant::now()).as_secs();
                format!(
                    "next try in {}m {}s (`restart.failed_retry`; or `worker plugins restart {}`)",
                    left / 60,
                    left % 60,
                    self.name()
                )
            }
            None => "no automatic retry".to_string(),
        }
    }

    /// Leaves the `failed` state: a fresh restart budget, and every instance started again.
    fn revive(&mut self, why: &str) {
        tracing::info!(plugin = %self.name(), "trying the failed plugin again: {why}");
        self.retry_failed_at = None;
        self.state = PluginState::Starting;
        self.window = RestartWindow::default();
        for i in 0..self.slots.len() {
            self.slots[i].backoff = Backoff::default();
            if self.slots[i].handle.is_none() {
                self.launch(i);
            }
        }
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        if self.retry_failed_at.is_some_and(|(at, _)| at <= now) {
            let retry = self.manifest.restart.failed_retry;
            self.revive(&format!("{retry:?} passed (`restart.failed_retry`)"));
        }
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].restart_at.is_some_and(|t| t <= now))
            .collect();
        for i in due {
            self.launch(i);
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

    fn publish(&self) {
        let view = PoolView {
            state: self.state.clone(),
            ready: self
                .slots
                .iter()
                .filter(|s| s.state == InstanceState::Ready)
                .count(),
            restarts: self.slots.iter().map(|s| s.restarts as u64).sum(),
            last_exit: self.last_exit.clone(),
        };
        self.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    fn status(&self) -> PluginStatus {
        let m = &self.manifest;
        PluginStatus {
            name: m.name.clone(),
            version: m.version.clone(),
            state: self.state.clone(),
            tasks: m.task_names().map(str::to_string).collect(),
            queued: self.queue.len(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            next_try_at: self.retry_failed_at.map(|(_, at)| {
                at.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            }),
            instances: self
                .slots
                .iter()
                .map(|s| InstanceStatus {
                    index: s.index as u32,
                    state: s.state,
                    pid: s.pid.filter(|_| s.handle.is_some()),
                    uptime_secs: s
                        .started_at
                        .filter(|_| s.handle.is_some())
                        .map(|(t, _)| t.elapsed().as_secs_f64()),
                    restarts: s.restarts,
                    in_flight: s.in_flight,
                    done: s.done,
                    failed: s.failed,
                    stray_stdout_lines: s.stray_lines.load(Ordering::Relaxed),
                    last_exit: s.last_exit.clone(),
                    recent_exits: s.recent_exits.iter().cloned().collect(),
                    stderr_tail: s.stderr.lines(s.pid),
                })
                .collect(),
        }
    }
}
