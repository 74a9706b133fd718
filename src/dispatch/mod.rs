//! The dispatcher: admission, routing and retries. Every task any source submits passes
//! here and leaves with exactly one [`Outcome`].
//!
//! A task whose process crashed under it is run again (on whichever instance is ready) while
//! its plugin's `max_attempts` allows; every other failure is final. The dispatcher also
//! counts tasks in flight, which is what a graceful stop drains.

mod retry;

use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::supervisor::instance::Job;
use crate::supervisor::pool::{CancelMode, PoolHandle};
use crate::supervisor::status::{PluginState, PluginStatus};
use crate::supervisor::{ReloadReport, Supervisor};
use crate::task::{
    Cancellation, EventReceiver, EventSender, Failure, FailureKind, Outcome, TaskEvent, TaskRequest,
};
use retry::{retry, Retry};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Progress and stream events a task may have waiting for its submitter. When they are not
/// read, the instance running the task stops reading its plugin's stdout: the plugin blocks on
/// its pipe, and the worker's memory stays bounded however fast it streams.
pub const EVENT_BUFFER: usize = 16;

/// What a running task reports to its submitter, in this order: its events, then its outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskUpdate {
    Event(TaskEvent),
    Done(Outcome),
}

/// The submitter's side of one task: a bounded stream of [`TaskUpdate`]s ending with exactly
/// one `Done`. It must be read to its end (every source does): the task lives in it.
pub struct TaskRun<'a> {
    run: Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>,
    events: EventReceiver,
    outcome: Option<Outcome>,
    finished: bool,
}

impl TaskRun<'_> {
    /// The next update, or `None` after `Done`. Events always precede `Done`: the outcome is
    /// handed out only once every event sender (the dispatcher's and each attempt's) is gone.
    pub async fn next(&mut self) -> Option<TaskUpdate> {
        loop {
            if self.finished {
                return None;
            }
            if self.outcome.is_some() {
                return Some(match self.events.recv().await {
                    Some(ev) => TaskUpdate::Event(*ev),
                    None => {
                        self.finished = true;
                        TaskUpdate::Done(self.outcome.take().expect("checked above"))
                    }
                });
            }
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => return Some(TaskUpdate::Event(*ev)),
                outcome = &mut self.run => self.outcome = Some(outcome),
            }
        }
    }

    /// Runs to the end, handing each event to `on_event`; returns the outcome.
    pub async fn outcome(mut self, mut on_event: impl FnMut(TaskEvent)) -> Outcome {
        loop {
            match self.next().await {
                Some(TaskUpdate::Event(ev)) => on_event(ev),
                Some(TaskUpdate::Done(outcome)) => return outcome,
                None => unreachable!("a task run ends with Done"),
            }
        }
    }
}

/// Routes tasks to plugin pools and owns their fate until they end.
#[derive(Debug)]
pub struct Dispatcher {
    supervisor: Arc<Supervisor>,
    metrics: Metrics,
    /// Tasks between submit and outcome.
    active: Mutex<crate::idmap::TaskMap<Active>>,
    accepting: AtomicBool,
    in_flight: watch::Sender<usize>,
}

/// A task between submit and outcome.
#[derive(Debug)]
struct Active {
    /// Shared with every attempt: its name and submitter are listed from here.
    request: Arc<TaskRequest>,
    since: Instant,
    attempt: u32,
    /// The pool of the current attempt: where a cancel goes.
    pool: Option<PoolHandle>,
    /// A cancel request, if one was made.
    cancel: Option<Cancellation>,
}

/// One in-flight task, as `worker task list` (control method `task.list`) shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskListing {
    pub task_id: String,
    pub task: String,
    /// The plugin serving it; instance and pid once it runs on a process.
    pub plugin: Option<String>,
    pub instance: Option<u32>,
    pub pid: Option<u32>,
    pub attempt: u32,
    /// `running` on a process, or `queued` (waiting for a free instance or between attempts).
    pub state: String,
    pub age_secs: f64,
    pub submitter: String,
}

/// Removes a task from the active set when its submit ends, however it ends.
struct ActiveGuard<'a> {
    dispatcher: &'a Dispatcher,
    /// Its id is the key to remove (shared, not copied: one allocation less per task).
    request: Arc<TaskRequest>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut active = crate::sync::lock(&self.dispatcher.active);
        active.remove(&self.request.id);
        self.dispatcher.count_in_flight(active.len());
    }
}

impl Dispatcher {
    pub fn new(supervisor: Arc<Supervisor>) -> Dispatcher {
        Dispatcher {
            supervisor,
            metrics: Metrics::new(),
            active: Mutex::new(Default::default()),
            accepting: AtomicBool::new(true),
            in_flight: watch::channel(0).0,
        }
    }

    /// What this daemon counts (see [`crate::metrics`]).
    /// The worker's event bus (what plugins subscribe to; Celery's event stream reads it too).
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        self.supervisor.events()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// False once a stop began: new tasks are refused.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Grows or shrinks every plugin's instances, or sets autoscale bounds on each (Celery's
    /// `pool_grow`, `pool_shrink`, `autoscale`): each plugin's instance count now wanted, or
    /// why it refused.
    pub async fn scale(
        &self,
        scale: crate::supervisor::pool::Scale,
    ) -> Vec<(String, Result<usize, String>)> {
        let mut out = Vec::new();
        for pool in self.supervisor.plugins() {
            out.push((pool.manifest().name.clone(), pool.scale(scale).await));
        }
        out
    }

    /// Every task name some plugin serves, sorted.
    pub fn task_names(&self) -> Vec<String> {
        let mut names = self.supervisor.task_names();
        names.sort();
        names
    }

    /// The status of every plugin, sorted by name.
    pub async fn status(&self) -> Vec<PluginStatus> {
        self.supervisor.status().await
    }

    /// Tasks the plugins can run at once (instances x concurrency, all plugins).
    pub fn capacity(&self) -> usize {
        self.supervisor
            .plugins()
            .iter()
            .map(|p| p.manifest().capacity())
            .sum()
    }

    /// Waits until every plugin has a ready instance or has failed, up to `timeout`; returns
    /// those that have not.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<(String, PluginState)> {
        self.supervisor.wait_ready(timeout).await
    }

    /// Test hook (`WORKER_TEST_HOOKS=1`): wedges a plugin's pool actor for good, so a test can
    /// see the watchdog stop. False if no plugin has that name.
    pub async fn freeze(&self, plugin: &str) -> bool {
        match self.supervisor.plugin(plugin) {
            Some(pool) => {
                pool.freeze().await;
                true
            }
            None => false,
        }
    }

    /// The manifests of the plugins running now.
    pub fn manifests(&self) -> Vec<Arc<Manifest>> {
        self.supervisor
            .plugins()
            .iter()
            .map(|p| p.manifest().clone())
            .collect()
    }

    /// Applies a new set of plugins (see [`Supervisor::reload`]).
    pub async fn reload(
        &self,
        manifests: Vec<Manifest>,
        drain: Duration,
        wait: bool,
    ) -> ReloadReport {
        self.supervisor.reload(manifests, drain, wait).await
    }

    /// Starts a `failed` plugin again now: `Some((restarted, state))`, `None` if no plugin has
    /// that name.
    pub async fn restart(&self, plugin: &str) -> Option<(bool, PluginState)> {
        let pool = self.supervisor.plugin(plugin)?;
        let restarted = pool.restart().await;
        let state = pool.view().borrow().state.clone();
        Some((restarted, state))
    }

    /// Starts `request`; read the returned [`TaskRun`] to its end for its events and outcome.
    pub fn submit(&self, request: TaskRequest) -> TaskRun<'_> {
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        // Shared before the future is made: a future keeps room for its arguments, and a
        // request by value would be 424 bytes more in every queued task.
        let request = Arc::new(request);
        TaskRun {
            run: Box::pin(self.run_to_end(request, events)),
            events: rx,
            outcome: None,
            finished: false,
        }
    }

    /// Runs `request` to its end and counts how it ended.
    async fn run_to_end(&self, request: Arc<TaskRequest>, events: EventSender) -> Outcome {
        let since = Instant::now();
        let (outcome, attempt, pool, guard) = match self.admit(&request, since) {
            Ok((guard, pool)) => {
                let (outcome, attempt, pool) = self.run_attempts(&request, events, pool).await;
                (outcome, attempt, pool, Some(guard))
            }
            Err(refused) => (refused, 0, self.supervisor.route(&request.name), None),
        };
        // Labelled only with names a manifest declares: a name nobody serves counts as "".
        let (plugin, task) = match &pool {
            Some(pool) => (pool.manifest().name.as_str(), request.name.as_str()),
            None => ("", ""),
        };
        let runtime = since.elapsed();
        self.metrics
            .task_ended(plugin, task, outcome.kind(), runtime);
        self.publish_end(&request, plugin, attempt, &outcome, runtime);
        if guard.is_some() {
            // Still counted in flight: a graceful stop waits for the store as for the task.
            let ended = crate::results::Ended {
                request: &request,
                outcome: &outcome,
                attempts: attempt,
                runtime,
                stopping: !self.accepting.load(Ordering::SeqCst),
            };
            crate::results::store(&self.supervisor, ended).await;
        }
        drop(guard);
        outcome
    }

    /// Tells event subscribers how a task ended: succeeded, revoked (cancelled) or failed.
    fn publish_end(
        &self,
        request: &TaskRequest,
        plugin: &str,
        attempt: u32,
        outcome: &Outcome,
        runtime: Duration,
    ) {
        let kind = match outcome {
            Outcome::Success(_) => "task.succeeded",
            Outcome::Failure(f) if matches!(f.kind, FailureKind::Cancelled(_)) => "task.revoked",
            Outcome::Failure(_) => "task.failed",
        };
        self.supervisor.events().publish(kind, |f| {
            f.field("task_id", &request.id)
                .field("task", &request.name)
                .field("plugin", plugin)
                .field("attempt", &attempt)
                .field("runtime", &runtime.as_secs_f64())
                .field("outcome", outcome.kind());
            if let Outcome::Failure(failure) = outcome {
                f.field("exception", &failure.exc_type)
                    .field("message", &failure.message);
            }
        });
    }

    /// Runs an admitted `request` to its end, through reruns (events to `events`), starting on
    /// the pool it was admitted for (`first`); with its last pool.
    async fn run_attempts(
        &self,
        request: &Arc<TaskRequest>,
        events: EventSender,
        first: PoolHandle,
    ) -> (Outcome, u32, Option<PoolHandle>) {
        let (mut attempt, mut refusals) = (1, 0);
        let mut first = Some(first);
        loop {
            let pool = match first.take() {
                // Admission recorded it in the task's entry already.
                Some(pool) => pool,
                // Looked up again for a rerun: a reload may have replaced the plugin meanwhile.
                None => {
                    let Some(pool) = self.supervisor.route(&request.name) else {
                        let failure = Failure::not_registered(&request.name);
                        return (Outcome::Failure(failure), attempt, None);
                    };
                    self.set_attempt(&request.id, attempt, &pool);
                    pool
                }
            };
            let outcome = self.attempt(&pool, request, attempt, &events).await;
            let Outcome::Failure(failure) = outcome else {
                return (outcome, attempt, Some(pool));
            };
            let cancel = self.cancel_request(&request.id);
            let accepting = self.accepting.load(Ordering::SeqCst);
            let max_attempts = pool.manifest().max_attempts;
            let why = failure.message.clone();
            match retry(failure, attempt, max_attempts, refusals, accepting, cancel) {
                Retry::End(failure) => return (Outcome::Failure(failure), attempt, Some(pool)),
                Retry::Again {
                    spends_attempt: false,
                } => refusals += 1,
                Retry::Again {
                    spends_attempt: true,
                } => {
                    tracing::warn!(task_id = %request.id, task = %request.name, attempt, "retrying task: {why}");
                    self.supervisor.events().publish("task.retried", |f| {
                        f.field("task_id", &request.id)
                            .field("task", &request.name)
                            .field("plugin", &pool.manifest().name)
                            .field("attempt", &attempt)
                            .field("reason", &why);
                    });
                    // The submitter hears it on the task's own stream, as data.
                    let retrying = TaskEvent::Retrying {
                        attempt,
                        reason: why,
                    };
                    // Boxed: the future of every task would otherwise hold room for this wait.
                    let _ = Box::pin(events.send(Box::new(retrying))).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Admits a task, with the pool of its first attempt: refused while stopping, for an
    /// unknown name or a duplicate id.
    fn admit(
        &self,
        request: &Arc<TaskRequest>,
        since: Instant,
    ) -> Result<(ActiveGuard<'_>, PoolHandle), Outcome> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Outcome::Failure(Failure::shutting_down()));
        }
        let Some(pool) = self.supervisor.route(&request.name) else {
            return Err(Outcome::Failure(Failure::not_registered(&request.name)));
        };
        let mut active = crate::sync::lock(&self.active);
        if active.contains_key(&request.id) {
            return Err(Outcome::Failure(Failure::new(
                FailureKind::Raised { retryable: false },
                crate::task::DUPLICATE_TASK_ID,
                "worker.errors",
                format!(
                    "task id {} is already running; task ids must be unique",
                    request.id
                ),
            )));
        }
        let entry = Active {
            request: request.clone(),
            since,
            attempt: 1,
            pool: Some(pool.clone()),
            cancel: None,
        };
        active.insert(request.id.clone(), entry);
        self.count_in_flight(active.len());
        drop(active);
        self.supervisor.events().publish("task.received", |f| {
            f.field("task_id", &request.id)
                .field("task", &request.name)
                .field("plugin", &pool.manifest().name)
                .field("submitter", &request.submitter);
        });
        let guard = ActiveGuard {
            dispatcher: self,
            request: request.clone(),
        };
        Ok((guard, pool))
    }

    /// One run of the task on `pool`.
    async fn attempt(
        &self,
        pool: &PoolHandle,
        request: &Arc<TaskRequest>,
        attempt: u32,
        events: &EventSender,
    ) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            request: request.clone(),
            attempt,
            events: events.clone(),
            reply,
            store: None,
        };
        pool.run(job).await;
        outcome.await.unwrap_or_else(|_| {
            let name = &pool.manifest().name;
            Outcome::Failure(Failure::crashed(format!(
                "plugin `{name}` dropped the task"
            )))
        })
    }

    fn cancel_request(&self, id: &str) -> Option<Cancellation> {
        crate::sync::lock(&self.active)
            .get(id)
            .and_then(|a| a.cancel.clone())
    }

    fn set_attempt(&self, id: &str, attempt: u32, pool: &PoolHandle) {
        if let Some(a) = crate::sync::lock(&self.active).get_mut(id) {
            a.attempt = attempt;
            a.pool = Some(pool.clone());
        }
    }

    /// Every task in flight, oldest first, with where it runs.
    pub async fn list(&self) -> Vec<TaskListing> {
        let mut placed = HashMap::new();
        for pool in self.supervisor.plugins() {
            let plugin = pool.manifest().name.clone();
            for (task_id, instance, pid) in pool.placements().await {
                placed.insert(task_id, (plugin.clone(), instance, pid));
            }
        }
        let mut listing: Vec<TaskListing> = {
            let active = crate::sync::lock(&self.active);
            active
                .iter()
                .map(|(id, a)| {
                    let at = placed.get(id);
                    let plugin = at.map(|(p, _, _)| p.clone()).or_else(|| {
                        self.supervisor
                            .route(&a.request.name)
                            .map(|p| p.manifest().name.clone())
                    });
                    TaskListing {
                        task_id: id.to_string(),
                        task: a.request.name.clone(),
                        plugin,
                        instance: at.map(|(_, i, _)| *i),
                        pid: at.and_then(|(_, _, pid)| *pid),
                        attempt: a.attempt,
                        state: if at.is_some() { "running" } else { "queued" }.into(),
                        age_secs: a.since.elapsed().as_secs_f64(),
                        submitter: a.request.submitter.clone(),
                    }
                })
                .collect()
        };
        listing.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
        listing
    }

    /// Asks a task to stop: dropped if still queued, `task.cancel` if running (then killed
    /// after the plugin's `cancel_grace`). False if no such task is active.
    pub async fn cancel(&self, task_id: &str, cancel: Cancellation) -> bool {
        self.cancel_with(task_id, cancel, CancelMode::Escalate)
            .await
    }

    /// Asks a task to stop without forcing it: dropped if still queued, `task.cancel` if running,
    /// and no kill after it (Celery's plain `revoke`). The plugin may still finish it with its
    /// result. False if no such task is active.
    pub async fn cancel_cooperatively(&self, task_id: &str, cancel: Cancellation) -> bool {
        self.cancel_with(task_id, cancel, CancelMode::Cooperative)
            .await
    }

    async fn cancel_with(&self, task_id: &str, cancel: Cancellation, mode: CancelMode) -> bool {
        let pool = {
            let mut active = crate::sync::lock(&self.active);
            let Some(slot) = active.get_mut(task_id) else {
                return false;
            };
            slot.cancel = Some(cancel.clone());
            slot.pool.clone()
        };
        // Between attempts (no pool holds it), the retry loop sees the request and ends it.
        if let Some(pool) = pool {
            pool.cancel(task_id, cancel, mode).await;
        }
        true
    }

    /// Cancels a task only if it is still waiting in a plugin's queue. True if it was.
    pub async fn cancel_queued(&self, task_id: &str, cancel: Cancellation) -> bool {
        let pool = crate::sync::lock(&self.active)
            .get(task_id)
            .and_then(|a| a.pool.clone());
        match pool {
            Some(pool) => pool.cancel(task_id, cancel, CancelMode::QueuedOnly).await,
            None => false,
        }
    }

    /// Refuses new tasks from now on; tasks already admitted carry on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Records how many tasks are in flight, waking `wait_idle` only at zero (not per task).
    fn count_in_flight(&self, n: usize) {
        self.in_flight.send_if_modified(|count| {
            *count = n;
            n == 0
        });
    }

    /// Waits until no task is in flight, up to `timeout`. True if it got there.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.in_flight.subscribe();
        let idle = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await;
        matches!(idle, Ok(Ok(_)))
    }
}
