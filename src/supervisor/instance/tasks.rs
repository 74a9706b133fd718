//! The tasks an instance holds: sending them, cancelling them, the timers that watch them
//! (time limits, cancel grace, health pings), and their outcomes when the process ends.

use super::deadlines::{Deadlines, Due};
use super::{Crash, Effect, ExitReason, InstanceCore, Now, Phase, Step};
use crate::task::{CancelCause, Cancellation, Failure, FailureKind, Outcome};
use crate::task::{EventSender, TaskRequest};
use plugin_protocol::{method, Id, Response, TaskCancelParams, TimeLimits};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How many stderr lines go into a crash message.
const CRASH_STDERR_LINES: usize = 5;

/// A missed ping's deadline moves by the time its process waited for a CPU meanwhile, once
/// that wait is at least this (less is the ordinary wait of a process woken on a busy host).
const MIN_STARVED: Duration = Duration::from_millis(1);

/// A task handed to an instance, with where its events and its outcome go.
#[derive(Debug)]
pub struct Job {
    pub request: Arc<TaskRequest>,
    pub attempt: u32,
    /// Bounded: when full, the instance stops reading its plugin's stdout until there is room.
    pub events: EventSender,
    pub reply: oneshot::Sender<Outcome>,
    /// Set for a result backend's job: `result.store` with these params is sent instead of
    /// `task.run` (protocol 1.5); the reply is the outcome all the same.
    pub store: Option<Arc<plugin_protocol::ResultStoreParams>>,
}

impl Job {
    pub fn finish(self, outcome: Outcome) {
        // The event sender goes first: once the outcome is visible, this attempt's events are
        // all in the channel and it is closed, so the submitter needs no second wake-up.
        let Job { events, reply, .. } = self;
        drop(events);
        // The submitter may have gone away (e.g. its connection closed); nothing to do then.
        let _ = reply.send(outcome);
    }
}

/// A task running on the process.
pub(super) struct Running {
    pub(super) job: Job,
    deadlines: Deadlines,
    hard_limit: Option<Duration>,
    /// Set once `task.cancel` was sent.
    pub(super) cancel: Option<Cancel>,
}

pub(super) struct Cancel {
    /// Why, and what the plugin was told; a soft time limit's maps the plugin's Cancelled
    /// error to SoftTimeLimitExceeded.
    pub(super) request: Cancellation,
}

impl InstanceCore {
    /// Sends `task.run` and starts watching the task's time limits.
    pub(super) fn start_task(&mut self, job: Job, now: Now) {
        let m = &self.spec.manifest;
        let soft = job.request.soft_time_limit.or(m.timeouts.task_soft);
        let hard = job.request.hard_time_limit.or(m.timeouts.task_hard);
        // Read only for a task with a time limit: most have none.
        let now = (soft.is_some() || hard.is_some()).then(|| now.at());
        let id = match &job.store {
            Some(store) => self.request(method::RESULT_STORE, &**store),
            None => self.start_task_run(&job, soft, hard),
        };
        self.by_task.insert(job.request.id.clone(), id);
        let running = Running {
            job,
            deadlines: Deadlines {
                soft_at: soft.zip(now).map(|(d, now)| now + d),
                hard_at: hard.zip(now).map(|(d, now)| now + d),
                ..Deadlines::default()
            },
            hard_limit: hard,
            cancel: None,
        };
        self.running.insert(id, running);
        self.follow_task_log();
    }

    /// Sends `task.run` for `job` and tells event subscribers it started.
    /// The line is written straight from params borrowed from the task (no `Value` in
    /// between, nothing copied: the hot path).
    fn start_task_run(&mut self, job: &Job, soft: Option<Duration>, hard: Option<Duration>) -> u64 {
        let id = self.take_request_id();
        let m = &self.spec.manifest;
        let params = super::wire::TaskRunWire {
            task_id: &job.request.id,
            task: &job.request.name,
            args: &job.request.args,
            kwargs: &job.request.kwargs,
            attempt: job.attempt,
            time_limit: TimeLimits {
                soft: soft.map(|d| d.as_secs_f64()),
                hard: hard.map(|d| d.as_secs_f64()),
            },
            delivery_info: &job.request.delivery_info,
            request: super::wire::RequestWire::of(
                &job.request.request_info,
                &self.spec.worker_name,
            ),
        };
        self.spec.events.publish("task.started", |f| {
            f.field("task_id", &job.request.id)
                .field("task", &job.request.name)
                .field("plugin", &m.name)
                .field("instance", &self.spec.index)
                .field("pid", &self.pid)
                .field("attempt", &job.attempt);
        });
        let queued = self.out.push_with(|out| {
            plugin_protocol::append_request_line(out, &Id::Num(id), method::TASK_RUN, |out| {
                params.write(out)
            })
        });
        self.stdin_full |= !queued;
        id
    }

    /// Points the stderr reader at the task running here if it runs alone and asked for its
    /// log (a line cannot be told apart by task when several run at once), else at nothing.
    pub(super) fn follow_task_log(&mut self) {
        let alone = match self.running.len() {
            1 => self.running.values().next(),
            _ => None,
        };
        let sink = alone
            .filter(|r| r.job.request.capture_log)
            .map(|r| r.job.events.downgrade());
        if sink.is_none() && !self.task_log_set {
            return;
        }
        self.task_log_set = sink.is_some();
        self.effects.push(Effect::FollowLog(sink));
    }

    /// Sends `task.cancel` once per task; `kill_grace` arms the kill if it does not end.
    pub(super) fn cancel(
        &mut self,
        task_id: &str,
        request: Cancellation,
        kill_grace: Option<Duration>,
        now: Now,
    ) {
        let Some(id) = self.by_task.get(task_id).copied() else {
            return;
        };
        let Some(run) = self.running.get_mut(&id) else {
            return;
        };
        if run.cancel.is_some() {
            return;
        }
        let params = TaskCancelParams {
            task_id: task_id.to_string(),
            reason: request.reason.clone(),
        };
        run.cancel = Some(Cancel { request });
        run.deadlines.cancel_sent = true;
        run.deadlines.kill_at = kill_grace.map(|g| now.at() + g);
        self.notify(method::TASK_CANCEL, params);
    }

    /// Whether a new health ping may be sent now: while idle, or always if the plugin declared
    /// `ping_while_busy`; never while the worker itself holds the plugin's output back.
    fn pingable(&self) -> bool {
        (self.pings_while_busy || self.running.is_empty()) && self.held.is_none()
    }

    /// When the timer must next wake the actor; `None` while nothing is due (busy with tasks
    /// that have no time limit and no ping to send), so a turn neither reads the clock nor
    /// moves the timer.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let serving = match self.phase {
            Phase::Handshake { deadline, .. } | Phase::Draining { deadline, .. } => {
                return Some(deadline)
            }
            Phase::Serving => self,
        };
        // A ping is only scheduled while pingable; its timeout waits while stdout is held.
        let mut next = match serving.ping {
            Some((_, due)) if serving.held.is_none() => Some(due),
            None if serving.pingable() => Some(serving.next_ping),
            _ => None,
        };
        for run in serving.running.values() {
            if let Some(t) = run.deadlines.next() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// A timer went off at `now`; the process has waited `cpu_wait` for a CPU so far.
    pub(super) fn on_timer(&mut self, now: Now, cpu_wait: Option<Duration>) -> Step {
        let at = now.at();
        match self.phase {
            Phase::Handshake { deadline, .. } if at >= deadline => {
                return Crash::new(format!(
                    "did not answer `initialize` within the init timeout of {:?} (raise `timeouts.init` in plugin.toml if it needs longer to start)",
                    self.spec.manifest.timeouts.init
                ))
                .into();
            }
            Phase::Draining {
                deadline, grace, ..
            } if at >= deadline => {
                return Step::Drained {
                    grace,
                    exited: false,
                }
            }
            Phase::Serving => {}
            _ => return Step::Continue,
        }
        if let Some(step) = self.check_ping(at, cpu_wait) {
            return step;
        }
        if let Some(crash) = self.check_limits(now) {
            return crash.into();
        }
        Step::Continue
    }

    /// Sends a due ping, or ends a process that missed one.
    fn check_ping(&mut self, now: Instant, waited: Option<Duration>) -> Option<Step> {
        match self.ping {
            Some((id, due)) if now >= due && self.held.is_none() => {
                // Time spent waiting for a CPU is not the plugin's own: a plugin starved by a
                // busy host (or running on the idle CPU) is not hung.
                let starved = match (self.ping_cpu_wait, waited) {
                    (Some(before), Some(after)) => after.saturating_sub(before),
                    _ => Duration::ZERO,
                };
                if starved >= MIN_STARVED {
                    self.ping = Some((id, due + starved));
                    self.ping_cpu_wait = waited;
                    return None;
                }
                return Some(
                    Crash::new(format!(
                        "failed its health ping (no reply within {:?}; `timeouts.ping_timeout`)",
                        self.spec.manifest.timeouts.ping_timeout
                    ))
                    .into(),
                );
            }
            None if now >= self.next_ping && self.pingable() => {
                let id = self.request(method::PING, serde_json::json!({}));
                self.ping = Some((id, now + self.spec.manifest.timeouts.ping_timeout));
                self.ping_cpu_wait = waited;
            }
            _ => {}
        }
        None
    }

    /// Hard limits and cancel graces end the process; soft limits send `task.cancel`.
    fn check_limits(&mut self, now: Now) -> Option<Box<Crash>> {
        let at = now.at();
        let mut soft_due = Vec::new();
        for (&id, run) in &self.running {
            let task_id = &run.job.request.id;
            let (failure, reason) = match (run.deadlines.due(at), &run.cancel) {
                (None, _) => continue,
                (Some(Due::SoftLimit), _) => {
                    soft_due.push(task_id.clone());
                    continue;
                }
                (Some(Due::HardLimit), _) => {
                    let limit = run.hard_limit.unwrap_or_default();
                    let failure = Failure::new(
                        FailureKind::HardTimeLimit,
                        "TimeLimitExceeded",
                        "worker.errors",
                        format!("task {task_id} exceeded its hard time limit of {limit:?}; the plugin process was killed"),
                    );
                    let reason = format!(
                        "was killed because task {task_id} exceeded its hard time limit of {limit:?}"
                    );
                    (failure, reason)
                }
                (Some(Due::CancelGrace), cancel) => {
                    let cancel = cancel.as_ref().map(|c| &c.request);
                    let failure = Failure::cancelled(
                        cancel.map_or(CancelCause::Requested, |c| c.cause),
                        &format!(
                            "{} (the plugin did not stop the task in time and was killed)",
                            cancel.map_or("cancelled", |c| c.reason.as_str())
                        ),
                    );
                    let reason = format!(
                        "was killed because task {task_id} did not stop after `task.cancel`"
                    );
                    (failure, reason)
                }
            };
            return Some(Box::new(Crash {
                culprit: Some((id, failure)),
                ..*Crash::new(reason)
            }));
        }
        for task_id in soft_due {
            let soft = Cancellation::new(CancelCause::SoftTimeLimit, "soft time limit exceeded");
            self.cancel(&task_id, soft, None, now);
        }
        None
    }

    /// After the process died: takes the `answers` its pipe still held (read by the shell, in
    /// order), fails every task it still held and says why it ended.
    pub(super) fn bury(&mut self, crash: Crash, answers: Vec<Response>, now: Now) -> ExitReason {
        self.held = None;
        if crash.violation {
            self.spec
                .violations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Answers written before the crash still count, unless it broke the protocol:
        // whatever came after that is not trusted.
        let trusted = if crash.violation { 0 } else { answers.len() };
        for answer in answers.into_iter().take(trusted) {
            if !matches!(self.on_response(answer, now), Step::Continue) {
                break;
            }
        }
        let lead = format!(
            "plugin `{}` instance {} (pid {}) {}",
            self.name(),
            self.spec.index,
            self.pid,
            crash.reason
        );
        let stderr = self.spec.stderr.summary(self.pid, CRASH_STDERR_LINES);
        tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, in_flight = self.running.len(), "{lead}{stderr}");
        let mut culprit = crash.culprit;
        let failures: Vec<(Job, Failure)> = self
            .running
            .drain()
            .map(|(id, run)| {
                let failure = match culprit.take_if(|(cid, _)| *cid == id) {
                    Some((_, f)) => f,
                    None => Failure::crashed(format!(
                        "{lead} while running task {}{stderr}",
                        run.job.request.id
                    )),
                };
                (run.job, failure)
            })
            .collect();
        self.end_all(failures);
        match crash.incompatible {
            true => ExitReason::Incompatible(format!("{lead}{stderr}")),
            false => ExitReason::Crashed(format!("{lead}{stderr}")),
        }
    }

    /// After a stop: the tasks still in flight were interrupted by the worker, not the plugin.
    pub(super) fn interrupt_all(&mut self) {
        let lead = format!(
            "plugin `{}` instance {} (pid {}) was stopped",
            self.name(),
            self.spec.index,
            self.pid
        );
        let failures: Vec<(Job, Failure)> = self
            .running
            .drain()
            .map(|(_, run)| {
                let task_id = run.job.request.id.clone();
                let f = Failure::interrupted(format!("{lead} while running task {task_id}"));
                (run.job, f)
            })
            .collect();
        self.end_all(failures);
    }

    fn end_all(&mut self, failures: Vec<(Job, Failure)>) {
        self.by_task.clear();
        for (job, failure) in failures {
            self.effects
                .push(Effect::Finish(job, Outcome::Failure(failure)));
        }
    }
}
