//! The pool's thin I/O shell: it feeds the [`PoolCore`] what happens (tasks and commands from
//! the worker, reports from the instances, timers) and carries out its effects (start an
//! instance actor, send it a command, end a task, tell the event bus). It also holds what the
//! core need not: the instances' handles and their stderr tails and counters, the view others
//! wait on, and the event subscription the plugin is fed from. Who takes turns on it, and
//! when, is `shared.rs`.

use super::core::{Announcement, CancelStep, Effect, Input, Now, PoolCore, Queued, Rules};
use super::shared::{self, Shared};
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
use tokio::time::Instant;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

/// Commands (or a subscription's events) taken in one turn: a burst is queued, then placed once.
pub(super) const COMMAND_BATCH: usize = 256;

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
    let shared = Shared::new(|takes_finished| Pool {
        event_stats: subscription.as_ref().map(|s| s.stats.clone()),
        manifest: manifest.clone(),
        options,
        core,
        io: Vec::new(),
        reports: instance::Reports::with_finished(events_tx, takes_finished),
        view: view_tx,
        stop_waiters: Vec::new(),
        started: Instant::now(),
        frozen: false,
        ended: false,
        timer_seen: None,
        effects: Vec::new(),
    });
    shared.lock().carry_out(effects);
    tracker.spawn(shared::run(shared.clone(), rx, events_rx, subscription));
    PoolHandle {
        tx,
        shared,
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
    /// What each instance it launches reports to.
    reports: instance::Reports,
    pub(super) view: watch::Sender<PoolView>,
    pub(super) stop_waiters: Vec<oneshot::Sender<()>>,
    pub(super) started: Instant,
    /// Test hook: the actor has stopped answering (see `PoolCommand::Freeze`); tasks and
    /// reports then wait in its channels, as for a wedged actor.
    pub(super) frozen: bool,
    /// The actor has returned: what reaches the pool now goes to its closed channels.
    pub(super) ended: bool,
    /// The core's next timer as the actor last armed it (see `Shared::end_turn`).
    pub(super) timer_seen: Option<Instant>,
    /// The delivery counts of its event subscription, if it subscribes.
    pub(super) event_stats: Option<Arc<DeliveryStats>>,
    /// The core's output, reused from turn to turn.
    effects: Vec<Effect<Job>>,
}

impl Pool {
    /// Hands the core one input and carries out what it decides.
    pub(super) fn feed(&mut self, input: Input<Job>) {
        let mut effects = std::mem::take(&mut self.effects);
        self.core.handle(input, Now::current(), &mut effects);
        self.carry_out(effects);
    }

    pub(super) fn place_queued(&mut self) {
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
        let (handle, task) = instance::start(spec, self.reports.clone());
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

    pub(super) fn on_instance(&mut self, ev: InstanceEvent) {
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
    pub(super) fn takes_events(&self) -> bool {
        self.event_stats.as_ref().is_some_and(|s| !s.blocked()) && self.event_taker().is_some()
    }

    /// Delivers `first` and the events already waiting behind it, while an instance takes
    /// them: one turn of the actor's loop per burst, not per event.
    pub(super) fn deliver_events(&mut self, first: Event, subscription: Option<&mut Subscription>) {
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
        let Some(stats) = &self.event_stats else {
            return;
        };
        // The instance that took events may have ended since the actor looked.
        let Some(taker) = self.event_taker() else {
            stats.count_drop();
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

    pub(super) fn on_command(&mut self, cmd: PoolCommand) {
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
                let failed = self.core.restart(Now::current(), &mut effects);
                self.carry_out(effects);
                let _ = reply.send(failed);
            }
            PoolCommand::Scale(scale, reply) => {
                let mut effects = std::mem::take(&mut self.effects);
                let scaled = self.core.scale(scale, Now::current(), &mut effects);
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
