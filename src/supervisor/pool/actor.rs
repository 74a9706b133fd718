//! The pool's thin I/O shell: one task that feeds the [`PoolCore`] what happens (commands
//! from the worker, reports from the instances, timers) and carries out its effects (start
//! an instance actor, send it a command, end a task, tell the event bus). It also holds what
//! the core need not: the instances' handles and their stderr tails and counters, the view
//! others wait on, and the event subscription the plugin is fed from.

use super::core::{Announcement, CancelStep, Effect, Input, Now, PoolCore, Queued, Rules};
use super::{PoolCommand, PoolHandle, PoolOptions, PoolView};
use crate::events::{DeliveryStats, Event, Subscription};
use crate::manifest::Manifest;
use crate::supervisor::instance::{
    self, Command, EventKind, InstanceEvent, InstanceHandle, Job, LaunchSpec,
};
use crate::supervisor::process::StderrTail;
use crate::supervisor::status::PluginState;
use crate::task::Outcome;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

/// Commands (or a subscription's events) taken in one turn: a burst is queued, then placed once.
const COMMAND_BATCH: usize = 256;

impl Queued for Job {
    fn task_id(&self) -> &crate::task::TaskId {
        &self.request.id
    }
}

/// What the actor holds of one slot's process beside the core's view of it.
#[derive(Default)]
pub(super) struct SlotIo {
    pub(super) handle: Option<InstanceHandle>,
    /// The instance actor; dropping it (the pool ending) aborts the actor, and the process
    /// with it (`kill_on_drop`).
    task: Option<AbortOnDropHandle<()>>,
    /// Kept across restarts of the slot, for `plugins inspect`.
    pub(super) stderr: StderrTail,
    pub(super) stray_lines: Arc<AtomicU64>,
    pub(super) violations: Arc<AtomicU64>,
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
    let (events_tx, events_rx) =
        mpsc::channel(instance::reports_capacity(manifest.concurrency as usize));
    let subscription = (!manifest.events.is_empty()).then(|| {
        options
            .events
            .subscribe(&manifest.events, crate::events::BUFFER)
    });
    let mut effects = Vec::new();
    let rules = Rules::of(&manifest, options.queue_capacity);
    let instances = manifest.instances as usize;
    let core = PoolCore::start(
        rules,
        instances,
        fastrand::Rng::new(),
        Now::current(),
        &mut effects,
    );
    let mut pool = Pool {
        event_stats: subscription.as_ref().map(|s| s.stats.clone()),
        manifest: manifest.clone(),
        options,
        core,
        io: Vec::new(),
        events_tx,
        view: view_tx,
        stop_waiters: Vec::new(),
        started: Instant::now(),
        frozen: false,
        effects: Vec::new(),
        turn_now: None,
    };
    pool.carry_out(effects);
    tracker.spawn(pool.run(rx, events_rx, subscription));
    PoolHandle {
        tx,
        view: view_rx,
        manifest,
    }
}

pub(super) struct Pool {
    pub(super) manifest: Arc<Manifest>,
    pub(super) options: PoolOptions,
    pub(super) core: PoolCore<Job>,
    /// Beside `core.slots()`, index for index (grown as the core grows).
    pub(super) io: Vec<SlotIo>,
    events_tx: instance::Reports,
    pub(super) view: watch::Sender<PoolView>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    pub(super) started: Instant,
    /// Test hook: the actor has stopped answering (see `PoolCommand::Freeze`).
    frozen: bool,
    /// The delivery counts of its event subscription, if it subscribes.
    pub(super) event_stats: Option<Arc<DeliveryStats>>,
    /// The core's output, reused from turn to turn.
    effects: Vec<Effect<Job>>,
    /// The time of this turn of the loop, read at its first input: a burst of inputs taken
    /// in one turn reads the clocks once, not twice per task.
    turn_now: Option<Now>,
}

/// The actor's own deadlines, beside the core's.
struct Clock {
    /// The next autoscale tick, for a pool that autoscales.
    autoscale_at: Option<Instant>,
    /// When event delivery resumes after the plugin's stdin had no room.
    events_retry_at: Option<Instant>,
}

impl Clock {
    /// The earliest of these and the core's next timer.
    fn next(&self, core: Option<Instant>) -> Option<Instant> {
        [core, self.autoscale_at, self.events_retry_at]
            .into_iter()
            .flatten()
            .min()
    }
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
        mut events: mpsc::Receiver<InstanceEvent>,
        mut subscription: Option<Subscription>,
    ) {
        let mut clock = Clock {
            autoscale_at: self.core.autoscaling().then(Instant::now),
            events_retry_at: None,
        };
        // One timer for all the actor waits on, moved only when its deadline does: a turn
        // with nothing due neither reads the clock nor touches the timer wheel.
        let mut timer = std::pin::pin!(sleep_until(Instant::now()));
        loop {
            let due = clock.next(self.core.next_timer());
            if let Some(at) = due.filter(|&at| at != timer.deadline()) {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        self.on_command(cmd);
                        for _ in 0..COMMAND_BATCH {
                            match commands.try_recv() {
                                Ok(cmd) => self.on_command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.feed(Input::Stop { grace: self.manifest.timeouts.shutdown_grace }),
                },
                Some(ev) = events.recv() => {
                    // Every report already waiting is taken before tasks are placed again.
                    self.on_instance(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.on_instance(ev);
                    }
                }
                _ = &mut timer, if due.is_some() => self.on_timer(&mut clock),
                // Taken only while an instance can take it; meanwhile the buffer holds (or drops).
                Some(event) = next_event(&mut subscription), if self.takes_events() => {
                    self.deliver_events(event, subscription.as_mut());
                }
            }
            if clock.events_retry_at.is_none()
                && self.event_stats.as_ref().is_some_and(|s| s.blocked())
            {
                clock.events_retry_at = Some(self.now().at + crate::events::BLOCKED_RETRY);
            }
            if self.core.autoscaling() != clock.autoscale_at.is_some() {
                // Autoscale bounds set at run time (`autoscale` control): the first tick is now.
                clock.autoscale_at = self.core.autoscaling().then(|| self.now().at);
            }
            if matches!(
                self.core.state(),
                PluginState::Stopping | PluginState::Stopped
            ) {
                // A stopping plugin is told nothing more; its replacement subscribes anew.
                subscription = None;
            }
            if self.frozen {
                std::future::pending::<()>().await;
            }
            self.place_queued();
            self.publish();
            self.turn_now = None;
            if *self.core.state() == PluginState::Stopped {
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

    /// What is due when the timer fires: the core's timers, the autoscale tick, the end of an
    /// event delivery pause.
    fn on_timer(&mut self, clock: &mut Clock) {
        let now = self.now().at;
        if self.core.next_timer().is_some_and(|at| at <= now) {
            self.feed(Input::Timers);
        }
        if clock.autoscale_at.is_some_and(|at| at <= now) {
            clock.autoscale_at = Some(now + super::core::AUTOSCALE_TICK);
            self.feed(Input::AutoscaleTick);
        }
        if clock.events_retry_at.is_some_and(|at| at <= now) {
            clock.events_retry_at = None;
            if let Some(stats) = &self.event_stats {
                stats.unblock();
            }
        }
    }

    /// Hands the core one input and carries out what it decides.
    fn feed(&mut self, input: Input<Job>) {
        let mut effects = std::mem::take(&mut self.effects);
        let now = self.now();
        self.core.handle(input, now, &mut effects);
        self.carry_out(effects);
    }

    fn now(&mut self) -> Now {
        *self.turn_now.get_or_insert_with(Now::current)
    }

    fn place_queued(&mut self) {
        let mut effects = std::mem::take(&mut self.effects);
        self.core.place_queued(&mut effects);
        self.carry_out(effects);
    }

    /// Carries out `effects` in order; the emptied buffer is kept for the next turn.
    fn carry_out(&mut self, mut effects: Vec<Effect<Job>>) {
        let slots = self.core.slots().len();
        if self.io.len() < slots {
            self.io.resize_with(slots, SlotIo::default);
        }
        let mut refused = Vec::new();
        for effect in effects.drain(..) {
            match effect {
                Effect::Launch { slot, generation } => self.launch(slot, generation),
                Effect::Place { slot, job } => {
                    let sent = match &self.io[slot].handle {
                        Some(h) => h.send(Command::Run(job)),
                        None => Err(Command::Run(job)),
                    };
                    if let Err(Command::Run(job)) = sent {
                        refused.push(Input::PlaceRefused { slot, job });
                    }
                }
                Effect::Stop { slot, grace } => {
                    if let Some(h) = &self.io[slot].handle {
                        let _ = h.send(Command::Stop { grace });
                    }
                }
                Effect::Reap { slot } => {
                    self.io[slot].handle = None;
                    self.io[slot].task = None;
                }
                Effect::Finish { job, failure } => job.finish(Outcome::Failure(failure)),
                Effect::Announce(announcement) => self.announce(announcement),
            }
        }
        self.effects = effects;
        for input in refused {
            // A refused placement decides nothing but where the job waits: no effects.
            self.feed(input);
        }
    }

    fn launch(&mut self, slot: usize, generation: u64) {
        let io = &mut self.io[slot];
        let spec = LaunchSpec {
            manifest: self.manifest.clone(),
            index: self.core.slots()[slot].index as u32,
            slot,
            generation,
            worker_name: self.options.worker_name.clone(),
            max_line_bytes: self.options.max_line_bytes,
            stderr: io.stderr.clone(),
            stray_lines: io.stray_lines.clone(),
            violations: io.violations.clone(),
            state_dir: self.options.state_dir.clone(),
            plugin_user: self.options.plugin_user.clone(),
            events: self.options.events.clone(),
            cgroups: self.options.cgroups.clone(),
            offers: self.options.offers.clone(),
        };
        let (handle, task) = instance::start(spec, self.events_tx.clone());
        io.handle = Some(handle);
        io.task = Some(AbortOnDropHandle::new(task));
    }

    fn announce(&self, announcement: Announcement) {
        let events = &self.options.events;
        let plugin = &self.manifest.name;
        match announcement {
            Announcement::Started {
                instance,
                pid,
                version,
            } => events.publish("instance.started", |f| {
                f.field("plugin", plugin)
                    .field("instance", &instance)
                    .field("pid", &pid)
                    .field("version", &version);
            }),
            Announcement::Exited {
                instance,
                pid,
                reason,
                expected,
            } => events.publish("instance.exited", |f| {
                f.field("plugin", plugin)
                    .field("instance", &instance)
                    .field("pid", &pid)
                    .field("reason", &reason)
                    .field("expected", &expected);
            }),
            Announcement::Failed {
                instance,
                reason,
                state,
            } => events.publish("instance.failed", |f| {
                f.field("plugin", plugin)
                    .field("instance", &instance)
                    .field("reason", &reason)
                    .field("state", &state);
            }),
        }
    }

    fn on_instance(&mut self, ev: InstanceEvent) {
        let (slot, generation) = (ev.slot, ev.generation);
        let input = match ev.kind {
            EventKind::Ready {
                pid,
                plugin_version,
            } => Input::Ready {
                slot,
                generation,
                pid,
                plugin_version,
            },
            EventKind::Finished { task_id, ok } => Input::Finished {
                slot,
                generation,
                task_id,
                ok,
            },
            EventKind::Exited { reason, ran_for } => Input::Exited {
                slot,
                generation,
                reason,
                ran_for,
            },
        };
        self.feed(input);
    }

    /// The instance that gets events: the first ready one.
    fn event_taker(&self) -> Option<&InstanceHandle> {
        self.core
            .event_taker()
            .and_then(|slot| self.io.get(slot)?.handle.as_ref())
    }

    /// Whether the next event may be taken from the buffer now.
    fn takes_events(&self) -> bool {
        self.event_stats.as_ref().is_some_and(|s| !s.blocked()) && self.event_taker().is_some()
    }

    /// Delivers `first` and the events already waiting behind it, while an instance takes
    /// them: one turn of the actor's loop per burst, not per event.
    fn deliver_events(&mut self, first: Event, subscription: Option<&mut Subscription>) {
        self.deliver_event(first);
        let Some(s) = subscription else { return };
        for _ in 0..COMMAND_BATCH {
            if !self.takes_events() {
                break;
            }
            match s.events.try_recv() {
                Ok(event) => self.deliver_event(event),
                Err(_) => break,
            }
        }
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
            PoolCommand::Run(job) => self.feed(Input::Run(job)),
            PoolCommand::Cancel {
                task_id,
                cancel,
                mode,
                reply,
            } => {
                let mut effects = std::mem::take(&mut self.effects);
                let step = self.core.cancel(&task_id, &cancel, mode, &mut effects);
                self.carry_out(effects);
                let answered = match step {
                    CancelStep::Dropped | CancelStep::Asked => true,
                    CancelStep::NotHere => false,
                    CancelStep::Running { slot, escalate } => {
                        let cmd = Command::Cancel {
                            task_id,
                            cancel,
                            escalate,
                        };
                        self.io[slot]
                            .handle
                            .as_ref()
                            .is_some_and(|h| h.send(cmd).is_ok())
                    }
                };
                let _ = reply.send(answered);
            }
            PoolCommand::Status(reply) => {
                let _ = reply.send(self.status());
            }
            PoolCommand::Placements(reply) => {
                let slots = self.core.slots();
                let placed = self
                    .core
                    .placements()
                    .map(|(id, i)| (id.clone(), slots[i].index as u32, slots[i].pid))
                    .collect();
                let _ = reply.send(placed);
            }
            PoolCommand::Freeze => {
                tracing::warn!(plugin = %self.manifest.name, "test hook: this pool actor freezes for good");
                self.frozen = true;
            }
            PoolCommand::Restart(reply) => {
                let mut effects = std::mem::take(&mut self.effects);
                let now = self.now();
                let failed = self.core.restart(now, &mut effects);
                self.carry_out(effects);
                let _ = reply.send(failed);
            }
            PoolCommand::Scale(scale, reply) => {
                let mut effects = std::mem::take(&mut self.effects);
                let now = self.now();
                let scaled = self.core.scale(scale, now, &mut effects);
                self.carry_out(effects);
                let _ = reply.send(scaled);
            }
            PoolCommand::Stop { grace, done } => {
                self.stop_waiters.push(done);
                self.feed(Input::Stop { grace });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_timer_waits_for_the_earliest_deadline_or_for_nothing() {
        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        let clock = |autoscale_at, events_retry_at| Clock {
            autoscale_at,
            events_retry_at,
        };
        assert_eq!(clock(None, None).next(None), None, "nothing due: not armed");
        assert_eq!(clock(None, None).next(at(3)), at(3));
        assert_eq!(clock(at(5), None).next(at(3)), at(3));
        assert_eq!(clock(at(5), at(1)).next(at(3)), at(1));
        assert_eq!(clock(at(2), at(4)).next(None), at(2));
    }
}
