//! The dispatcher: admission, routing and retries. Every task any source submits passes
//! here and leaves with exactly one [`Outcome`].
//!
//! A task whose process crashed under it is run again (on whichever instance is ready) while
//! its plugin's `max_attempts` allows; every other failure is final. The dispatcher also
//! counts tasks in flight, which is what a graceful stop drains.

use crate::supervisor::instance::Job;
use crate::supervisor::Supervisor;
use crate::task::{Failure, FailureKind, Outcome, TaskEvent, TaskRequest};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How often a task may be refused before reaching a process before that counts as an attempt.
const MAX_REFUSALS: u32 = 20;

/// Routes tasks to plugin pools and owns their fate until they end.
#[derive(Debug)]
pub struct Dispatcher {
    supervisor: Arc<Supervisor>,
    /// Tasks between submit and outcome.
    active: Mutex<HashMap<String, Active>>,
    accepting: AtomicBool,
    in_flight: watch::Sender<usize>,
}

/// A task between submit and outcome.
#[derive(Debug)]
struct Active {
    name: String,
    submitter: String,
    since: Instant,
    attempt: u32,
    /// A cancel request, if one was made.
    cancel: Option<String>,
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
    id: String,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut active = self.dispatcher.active.lock().expect("active lock poisoned");
        active.remove(&self.id);
        self.dispatcher.in_flight.send_replace(active.len());
    }
}

impl Dispatcher {
    pub fn new(supervisor: Arc<Supervisor>) -> Dispatcher {
        Dispatcher {
            supervisor,
            active: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            in_flight: watch::channel(0).0,
        }
    }

    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    /// Runs `request` to its end. Progress and streamed items go to `events` as they come.
    pub async fn submit(
        &self,
        request: TaskRequest,
        events: mpsc::UnboundedSender<TaskEvent>,
    ) -> Outcome {
        if !self.accepting.load(Ordering::SeqCst) {
            return Outcome::Failure(Failure::shutting_down());
        }
        if self.supervisor.route(&request.name).is_none() {
            return Outcome::Failure(Failure::not_registered(&request.name));
        }
        {
            let mut active = self.active.lock().expect("active lock poisoned");
            if active.contains_key(&request.id) {
                return Outcome::Failure(Failure::new(
                    FailureKind::Raised { retryable: false },
                    "DuplicateTaskId",
                    "worker.errors",
                    format!(
                        "task id {} is already running; task ids must be unique",
                        request.id
                    ),
                ));
            }
            let entry = Active {
                name: request.name.clone(),
                submitter: request.submitter.clone(),
                since: Instant::now(),
                attempt: 1,
                cancel: None,
            };
            active.insert(request.id.clone(), entry);
            self.in_flight.send_replace(active.len());
        }
        let _guard = ActiveGuard {
            dispatcher: self,
            id: request.id.clone(),
        };
        let request = Arc::new(request);
        let mut attempt = 1;
        // Tasks refused before they reached a process (an instance was already ending, or a
        // plugin was shutting down) are rerun without counting an attempt, a bounded number
        // of times: the pool learns of the dead instance within moments.
        let mut refusals = 0;
        loop {
            // Looked up on every attempt: a reload may have replaced the plugin meanwhile.
            let Some(pool) = self.supervisor.route(&request.name) else {
                return Outcome::Failure(Failure::not_registered(&request.name));
            };
            let max_attempts = pool.manifest().max_attempts;
            self.set_attempt(&request.id, attempt);
            let (reply, outcome) = oneshot::channel();
            pool.run(Job {
                request: request.clone(),
                attempt,
                events: events.clone(),
                reply,
            })
            .await;
            let outcome = outcome.await.unwrap_or_else(|_| {
                Outcome::Failure(Failure::crashed(format!(
                    "plugin `{}` dropped the task",
                    pool.manifest().name
                )))
            });
            let Outcome::Failure(failure) = &outcome else {
                return outcome;
            };
            if !failure.is_retryable() {
                return outcome;
            }
            if let Some(reason) = self.cancel_reason(&request.id) {
                return Outcome::Failure(Failure::cancelled(&reason));
            }
            // Refused before it reached a process, or interrupted by the worker itself (a
            // reload or uninstall stopping the instance): no attempt spent. When the whole
            // worker is stopping, an interrupted task ends here (a broker source requeues it).
            if matches!(
                failure.kind,
                FailureKind::Rejected | FailureKind::Interrupted
            ) {
                if failure.kind == FailureKind::Interrupted
                    && !self.accepting.load(Ordering::SeqCst)
                {
                    return outcome;
                }
                if refusals < MAX_REFUSALS {
                    refusals += 1;
                    continue;
                }
            }
            if attempt >= max_attempts {
                let mut failure = failure.clone();
                failure.message = format!(
                    "{} (gave up after {attempt} attempt(s); `max_attempts` = {max_attempts})",
                    failure.message
                );
                return Outcome::Failure(failure);
            }
            tracing::warn!(task_id = %request.id, task = %request.name, attempt, "retrying task: {}", failure.message);
            attempt += 1;
        }
    }

    fn cancel_reason(&self, id: &str) -> Option<String> {
        self.active
            .lock()
            .expect("active lock poisoned")
            .get(id)
            .and_then(|a| a.cancel.clone())
    }

    fn set_attempt(&self, id: &str, attempt: u32) {
        if let Some(a) = self
            .active
            .lock()
            .expect("active lock poisoned")
            .get_mut(id)
        {
            a.attempt = attempt;
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
            let active = self.active.lock().expect("active lock poisoned");
            active
                .iter()
                .map(|(id, a)| {
                    let at = placed.get(id);
                    let plugin = at.map(|(p, _, _)| p.clone()).or_else(|| {
                        self.supervisor
                            .route(&a.name)
                            .map(|p| p.manifest().name.clone())
                    });
                    TaskListing {
                        task_id: id.clone(),
                        task: a.name.clone(),
                        plugin,
                        instance: at.map(|(_, i, _)| *i),
                        pid: at.and_then(|(_, _, pid)| *pid),
                        attempt: a.attempt,
                        state: if at.is_some() { "running" } else { "queued" }.into(),
                        age_secs: a.since.elapsed().as_secs_f64(),
                        submitter: a.submitter.clone(),
                    }
                })
                .collect()
        };
        listing.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
        listing
    }

    /// Asks a task to stop: dropped if still queued, `task.cancel` if running (then killed
    /// after the plugin's `cancel_grace`). False if no such task is active.
    pub async fn cancel(&self, task_id: &str, reason: &str) -> bool {
        {
            let mut active = self.active.lock().expect("active lock poisoned");
            let Some(slot) = active.get_mut(task_id) else {
                return false;
            };
            slot.cancel = Some(reason.to_string());
        }
        for pool in self.supervisor.plugins() {
            if pool.cancel(task_id, reason, false).await {
                return true;
            }
        }
        // Between attempts: the retry loop sees the reason and ends the task.
        true
    }

    /// Cancels a task only if it is still waiting in a plugin's queue. True if it was.
    pub async fn cancel_queued(&self, task_id: &str, reason: &str) -> bool {
        if !self
            .active
            .lock()
            .expect("active lock poisoned")
            .contains_key(task_id)
        {
            return false;
        }
        for pool in self.supervisor.plugins() {
            if pool.cancel(task_id, reason, true).await {
                return true;
            }
        }
        false
    }

    /// Refuses new tasks from now on; tasks already admitted carry on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Waits until no task is in flight, up to `timeout`. True if it got there.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.in_flight.subscribe();
        let idle = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await;
        matches!(idle, Ok(Ok(_)))
    }
}
