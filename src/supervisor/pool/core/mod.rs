//! The pool's decisions as a pure state machine: what happens to the queue, the instance
//! slots and the plugin's state when a task arrives, an instance reports, a timer fires or
//! the operator asks for something. [`PoolCore::handle`] takes one [`Input`] and the time,
//! changes the state and writes the [`Effect`]s the actor must carry out (start a process,
//! hand a task over, stop an instance, end a task, announce an event). No I/O, no channels,
//! no clock of its own: every transition is table-tested in `tests.rs`.
//!
//! Generic over the queued job so the tests queue plain ids; the actor queues `instance::Job`.

mod lifecycle;
mod scale;
#[cfg(test)]
mod tests;

pub(in crate::supervisor) use crate::supervisor::now::Now;
pub(super) use scale::AUTOSCALE_TICK;
pub use scale::{Scale, MAX_INSTANCES};

use super::placement::{self, Refusal};
use crate::manifest::Manifest;
use crate::supervisor::instance::ExitReason;
use crate::supervisor::restart::{Backoff, RestartWindow};
use crate::supervisor::status::{ExitRecord, InstanceState, PluginState};
use crate::task::{Cancellation, Failure, FailureKind};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Exits remembered per instance for `plugins inspect`.
const RECENT_EXITS: usize = 10;

/// A task waiting in the pool's queue: all the core needs to know of it is its id.
pub(in crate::supervisor) trait Queued {
    /// Shared with the task, so keying the placements by it copies nothing.
    fn task_id(&self) -> &crate::task::TaskId;
}

/// The manifest's settings the core decides by (and the name its messages give).
#[derive(Debug, Clone)]
pub(in crate::supervisor) struct Rules {
    pub name: String,
    pub concurrency: usize,
    pub queue_capacity: usize,
    pub restart: crate::manifest::RestartSettings,
    pub shutdown_grace: Duration,
}

impl Rules {
    pub fn of(manifest: &Manifest, queue_capacity: usize) -> Rules {
        Rules {
            name: manifest.name.clone(),
            concurrency: manifest.concurrency as usize,
            queue_capacity,
            restart: manifest.restart.clone(),
            shutdown_grace: manifest.timeouts.shutdown_grace,
        }
    }
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

/// Something that happened to the pool.
#[derive(Debug)]
pub(in crate::supervisor) enum Input<J> {
    /// A task submitted to this plugin.
    Run(J),
    /// An instance finished its handshake.
    Ready {
        slot: usize,
        generation: u64,
        pid: u32,
        plugin_version: String,
    },
    /// A task placed on an instance ended (its outcome already went to its submitter).
    Finished {
        slot: usize,
        generation: u64,
        task_id: crate::task::TaskId,
        ok: bool,
    },
    /// An instance's process is gone, with every task it held answered.
    Exited {
        slot: usize,
        generation: u64,
        reason: ExitReason,
        ran_for: Duration,
    },
    /// A placed task could not be handed over: the instance had just ended.
    PlaceRefused { slot: usize, job: J },
    /// A restart backoff or `restart.failed_retry` may be due (see [`PoolCore::next_timer`]).
    Timers,
    /// Autoscale's periodic look at the load.
    AutoscaleTick,
    /// Stop every instance, each within `grace`; queued tasks go back to the dispatcher.
    Stop { grace: Duration },
}

/// What the actor carries out, in order.
#[derive(Debug)]
pub(in crate::supervisor) enum Effect<J> {
    /// Start a process in `slot`; its events carry `generation`.
    Launch { slot: usize, generation: u64 },
    /// Hand the task to the instance in `slot` (`Input::PlaceRefused` if it is gone).
    Place { slot: usize, job: J },
    /// Stop the instance in `slot` gracefully.
    Stop { slot: usize, grace: Duration },
    /// The process of `slot` has ended: drop what the actor holds of it.
    Reap { slot: usize },
    /// End a task that never ran here with this failure.
    Finish { job: J, failure: Failure },
    /// Tell the event bus.
    Announce(Announcement),
}

/// An instance's life as told to subscribing plugins (`instance.*` events).
#[derive(Debug, Clone, PartialEq)]
pub(in crate::supervisor) enum Announcement {
    Started {
        instance: usize,
        pid: u32,
        version: String,
    },
    Exited {
        instance: usize,
        pid: Option<u32>,
        reason: String,
        expected: bool,
    },
    Failed {
        instance: usize,
        reason: Option<String>,
        state: String,
    },
}

/// What a cancel found.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::supervisor) enum CancelStep {
    /// It was queued: dropped, its `Finish` written.
    Dropped,
    /// It runs on this slot: the instance is to be asked (`escalate`: kill after its grace).
    Running { slot: usize, escalate: bool },
    /// It runs, and its instance was already asked as hard: nothing more is sent.
    Asked,
    /// This pool does not hold it (or only queued ones were to be cancelled).
    NotHere,
}

/// One instance slot as the core sees it.
#[derive(Debug, Clone)]
pub(in crate::supervisor) struct Slot {
    pub index: usize,
    /// Bumped at each start, so events from a previous process are recognised as stale.
    pub generation: u64,
    pub state: InstanceState,
    /// A process runs (or starts, or is ending) in this slot.
    pub process: bool,
    pub pid: Option<u32>,
    pub plugin_version: Option<String>,
    pub started_at: Option<Instant>,
    pub in_flight: usize,
    pub done: u64,
    pub failed: u64,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub recent_exits: VecDeque<ExitRecord>,
    pub backoff: Backoff,
    pub restart_at: Option<Instant>,
    /// Taken out of service by a shrink (see `scale`): no new task, not restarted.
    pub retired: bool,
    /// The stop of a retired instance was sent.
    pub stop_sent: bool,
    /// Since when it has had no task (for autoscale).
    pub idle_since: Option<Instant>,
}

impl Slot {
    fn new(index: usize) -> Slot {
        Slot {
            index,
            generation: 0,
            state: InstanceState::Starting,
            process: false,
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
            retired: false,
            stop_sent: false,
            idle_since: None,
        }
    }
}

/// A task placed on an instance.
#[derive(Debug, Clone, Copy)]
struct Placed {
    slot: usize,
    /// Whether its instance was asked to cancel it, and whether to escalate.
    asked: Option<bool>,
}

/// The pool's state; see the module doc.
pub(in crate::supervisor) struct PoolCore<J> {
    rules: Rules,
    slots: Vec<Slot>,
    queue: VecDeque<J>,
    /// Where each placed task runs, and how hard its instance was already asked to cancel it.
    placements: crate::idmap::TaskMap<Placed>,
    state: PluginState,
    window: RestartWindow,
    /// While `failed`: when it is tried again on its own (`restart.failed_retry`).
    retry_failed_at: Option<Instant>,
    /// The newest crash of any instance.
    last_exit: Option<String>,
    /// `(min, max)` instances while autoscale is on (see `scale`).
    autoscale: Option<(usize, usize)>,
    /// The restart backoff's jitter (seeded in tests).
    rng: fastrand::Rng,
}

impl<J: Queued> PoolCore<J> {
    /// A pool of `instances` slots, every one launched (the effects in `out`).
    pub fn start(
        rules: Rules,
        instances: usize,
        rng: fastrand::Rng,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) -> PoolCore<J> {
        let mut core = PoolCore {
            rules,
            slots: (0..instances).map(Slot::new).collect(),
            queue: VecDeque::new(),
            placements: Default::default(),
            state: PluginState::Starting,
            window: RestartWindow::default(),
            retry_failed_at: None,
            last_exit: None,
            autoscale: None,
            rng,
        };
        for i in 0..instances {
            core.launch(i, now, out);
        }
        core
    }

    pub fn state(&self) -> &PluginState {
        &self.state
    }
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
    pub fn last_exit(&self) -> Option<&String> {
        self.last_exit.as_ref()
    }
    pub fn retry_failed_at(&self) -> Option<Instant> {
        self.retry_failed_at
    }
    pub fn name(&self) -> &str {
        &self.rules.name
    }

    /// Where each placed task runs: (task id, slot).
    pub fn placements(&self) -> impl Iterator<Item = (&crate::task::TaskId, usize)> {
        self.placements.iter().map(|(id, p)| (id, p.slot))
    }

    /// The slot that gets events for a subscribing plugin: the first ready one.
    pub fn event_taker(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.state == InstanceState::Ready && s.process)
    }

    /// When [`Input::Timers`] is next due: the earliest restart backoff or failed retry.
    pub fn next_timer(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| s.restart_at)
            .chain(self.retry_failed_at)
            .min()
    }

    pub fn autoscaling(&self) -> bool {
        self.autoscale.is_some()
    }

    /// Applies one input at `now`; what the actor must do goes to `out`.
    pub fn handle(&mut self, input: Input<J>, now: Now, out: &mut Vec<Effect<J>>) {
        match input {
            Input::Run(job) => self.admit(job, now, out),
            Input::Ready {
                slot,
                generation,
                pid,
                plugin_version,
            } => {
                if self.current(slot, generation) {
                    self.on_ready(slot, pid, plugin_version, now, out);
                }
            }
            Input::Finished {
                slot,
                generation,
                task_id,
                ok,
            } => {
                if self.current(slot, generation) {
                    self.on_finished(slot, &task_id, ok, now, out);
                }
            }
            Input::Exited {
                slot,
                generation,
                reason,
                ran_for,
            } => {
                if self.current(slot, generation) {
                    self.on_exit(slot, reason, ran_for, now, out);
                }
            }
            Input::PlaceRefused { slot, job } => {
                // The instance just ended; its Exited input is on the way.
                self.placements.remove(job.task_id());
                let s = &mut self.slots[slot];
                s.in_flight = s.in_flight.saturating_sub(1);
                s.state = InstanceState::Crashed;
                self.queue.push_front(job);
            }
            Input::Timers => self.timers_due(now, out),
            Input::AutoscaleTick => self.autoscale_tick(now, out),
            Input::Stop { grace } => self.begin_stop(grace, out),
        }
    }

    /// Whether an instance's report is about the process now in `slot`.
    fn current(&self, slot: usize, generation: u64) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.generation == generation)
    }

    fn admit(&mut self, job: J, now: Now, out: &mut Vec<Effect<J>>) {
        let capacity = self.rules.queue_capacity;
        let failure = match placement::refusal(&self.state, self.queue.len(), capacity) {
            None => return self.queue.push_back(job),
            Some(Refusal::Failed(reason)) => Failure::unavailable(format!(
                "plugin `{}` is failed: {reason}; {}",
                self.name(),
                self.next_try(now.at())
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
        out.push(Effect::Finish { job, failure });
    }

    /// Finds `task_id` and stops it as far as `mode` allows: a queued one is dropped here
    /// (its `Finish` written); a running one is for the actor to tell its instance.
    pub fn cancel(
        &mut self,
        task_id: &str,
        cancel: &Cancellation,
        mode: CancelMode,
        out: &mut Vec<Effect<J>>,
    ) -> CancelStep {
        if let Some(pos) = self
            .queue
            .iter()
            .position(|j| j.task_id().as_str() == task_id)
        {
            let job = self.queue.remove(pos).expect("position is in range");
            let failure = Failure::cancelled(cancel.cause, &cancel.reason);
            out.push(Effect::Finish { job, failure });
            return CancelStep::Dropped;
        }
        match self.placements.get_mut(task_id) {
            Some(placed) if mode != CancelMode::QueuedOnly => {
                let escalate = mode == CancelMode::Escalate;
                // Each running task's instance is asked at most twice (to cancel, then to
                // escalate): a storm of revokes of one id sends it nothing more.
                if placed.asked.is_some_and(|escalated| escalated || !escalate) {
                    return CancelStep::Asked;
                }
                placed.asked = Some(escalate);
                CancelStep::Running {
                    slot: placed.slot,
                    escalate,
                }
            }
            _ => CancelStep::NotHere,
        }
    }

    /// Hands queued tasks to ready instances with room, least loaded first. The actor runs
    /// it after each batch of inputs, so a burst is queued together, then placed once.
    pub fn place_queued(&mut self, out: &mut Vec<Effect<J>>) {
        let limit = self.rules.concurrency;
        while !self.queue.is_empty() {
            let slots = self.slots.iter().map(|s| (s.state, s.in_flight));
            let Some(i) = placement::choose(slots, limit) else {
                return;
            };
            let job = self.queue.pop_front().expect("queue is not empty");
            let slot = &mut self.slots[i];
            slot.in_flight += 1;
            slot.idle_since = None;
            let placed = Placed {
                slot: i,
                asked: None,
            };
            self.placements.insert(job.task_id().clone(), placed);
            out.push(Effect::Place { slot: i, job });
        }
    }

    /// "next try in 4m 59s (restart.failed_retry)" for a failed plugin's refusals.
    pub fn next_try(&self, now: Instant) -> String {
        match self.retry_failed_at {
            Some(at) => {
                let left = at.saturating_duration_since(now).as_secs();
                let left = humantime::format_duration(Duration::from_secs(left));
                format!(
                    "next try in {left} (`restart.failed_retry`; or `worker plugins restart {}`)",
                    self.name()
                )
            }
            None => "no automatic retry".to_string(),
        }
    }

    fn begin_stop(&mut self, grace: Duration, out: &mut Vec<Effect<J>>) {
        if matches!(self.state, PluginState::Stopping | PluginState::Stopped) {
            return;
        }
        self.state = PluginState::Stopping;
        self.retry_failed_at = None;
        // Rejected, not failed: the dispatcher reruns them wherever the task is routed now
        // (the replacement after a reload), or ends them if nothing serves it any more.
        for job in self.queue.drain(..) {
            let failure = Failure::rejected(format!(
                "plugin `{}` stopped before the task could start",
                self.rules.name
            ));
            out.push(Effect::Finish { job, failure });
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.restart_at = None;
            if slot.process {
                slot.state = InstanceState::Stopping;
                out.push(Effect::Stop { slot: i, grace });
            } else {
                slot.state = InstanceState::Stopped;
            }
        }
        self.settle_stop();
    }

    /// A stopping plugin is stopped once no process is left.
    fn settle_stop(&mut self) {
        if self.state == PluginState::Stopping && self.slots.iter().all(|s| !s.process) {
            self.state = PluginState::Stopped;
        }
    }

    fn launch(&mut self, i: usize, now: Now, out: &mut Vec<Effect<J>>) {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.stop_sent = false;
        slot.state = InstanceState::Starting;
        slot.restart_at = None;
        slot.pid = None;
        slot.process = true;
        slot.started_at = Some(now.at());
        out.push(Effect::Launch {
            slot: i,
            generation: slot.generation,
        });
    }
}
