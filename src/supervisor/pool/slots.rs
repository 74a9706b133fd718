//! The instance slots of a pool: launching a process into a slot, what the pool does when an
//! instance becomes ready, finishes a task or exits (restart with backoff, or give up), the
//! `failed` state and its way back.

use super::super::instance::{
    self, Command, EventKind, ExitReason, InstanceEvent, InstanceHandle, LaunchSpec,
};
use super::super::process::StderrTail;
use super::super::restart::{self, Backoff, Decision, RestartWindow};
use super::super::status::{ExitRecord, InstanceState, PluginState};
use super::{Pool, RECENT_EXITS};
use crate::task::{Failure, Outcome};
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

pub(super) struct Slot {
    pub(super) index: usize,
    /// Bumped at each start, so events from a previous process are recognised as stale.
    pub(super) generation: u64,
    pub(super) state: InstanceState,
    pub(super) handle: Option<InstanceHandle>,
    /// The instance actor; dropping it (the pool ending) aborts the actor, and the process
    /// with it (`kill_on_drop`).
    pub(super) task: Option<AbortOnDropHandle<()>>,
    pub(super) pid: Option<u32>,
    pub(super) plugin_version: Option<String>,
    pub(super) started_at: Option<(Instant, SystemTime)>,
    pub(super) in_flight: usize,
    pub(super) done: u64,
    pub(super) failed: u64,
    pub(super) restarts: u32,
    pub(super) last_exit: Option<String>,
    pub(super) recent_exits: VecDeque<ExitRecord>,
    pub(super) backoff: Backoff,
    pub(super) restart_at: Option<Instant>,
    pub(super) stderr: StderrTail,
    pub(super) stray_lines: Arc<AtomicU64>,
    pub(super) violations: Arc<AtomicU64>,
    /// Taken out of service by a shrink (see `scale`): no new task, not restarted.
    pub(super) retired: bool,
    /// The stop of a retired instance was sent.
    pub(super) stop_sent: bool,
    /// Since when it has had no task (for autoscale).
    pub(super) idle_since: Option<Instant>,
}

impl Slot {
    pub(super) fn new(index: usize) -> Slot {
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
            violations: Arc::new(AtomicU64::new(0)),
            retired: false,
            stop_sent: false,
            idle_since: None,
        }
    }
}

impl Pool {
    pub(super) fn launch(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.stop_sent = false;
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
            violations: slot.violations.clone(),
            state_dir: self.options.state_dir.clone(),
            plugin_user: self.options.plugin_user.clone(),
            events: self.options.events.clone(),
            cgroups: self.options.cgroups.clone(),
            offers: self.options.offers.clone(),
        };
        let (handle, task) = instance::start(spec, self.events_tx.clone());
        slot.handle = Some(handle);
        slot.task = Some(AbortOnDropHandle::new(task));
    }
    pub(super) fn on_instance(&mut self, ev: InstanceEvent) {
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
                self.options.events.publish("instance.started", || {
                    crate::fields! {"plugin" => self.manifest.name, "instance" => slot.index,
                    "pid" => pid, "version" => plugin_version}
                });
                slot.pid = Some(pid);
                slot.idle_since = Some(Instant::now());
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
                if slot.in_flight == 0 {
                    slot.idle_since = Some(Instant::now());
                }
                self.placements.remove(&task_id);
                self.stop_if_retired_and_idle(ev.slot);
            }
            EventKind::Exited { reason, ran_for } => self.on_exit(ev.slot, reason, ran_for),
        }
    }
    pub(super) fn on_exit(&mut self, i: usize, reason: ExitReason, ran_for: Duration) {
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
        let expected = matches!(reason, ExitReason::Stopped);
        self.options.events.publish("instance.exited", || {
            crate::fields! {"plugin" => self.manifest.name, "instance" => slot.index,
            "pid" => slot.pid, "reason" => described, "expected" => expected}
        });
        slot.recent_exits.push_back(ExitRecord {
            at,
            reason: described,
        });
        let failed = matches!(self.state, PluginState::Failed(_));
        match reason {
            // Retired by a shrink: it stays down, however it ended.
            _ if slot.retired => slot.state = InstanceState::Stopped,
            // Stopped while the plugin is live again (revived while this one was stopping, or
            // brought back by a grow while its retirement was ending).
            ExitReason::Stopped if !stopping && !failed => self.launch(i),
            ExitReason::Stopped => slot.state = InstanceState::Stopped,
            _ if stopping => slot.state = InstanceState::Stopped,
            ExitReason::Incompatible(msg) => {
                slot.last_exit = Some(msg.clone());
                self.last_exit = Some(msg.clone());
                slot.state = InstanceState::Failed;
                self.fail(msg);
            }
            ExitReason::Crashed(msg) => self.on_crash(i, msg, ran_for),
        }
        if self.slots[i].state == InstanceState::Failed {
            let (index, reason) = (self.slots[i].index, self.last_exit.clone());
            self.options.events.publish("instance.failed", || {
                crate::fields! {"plugin" => self.manifest.name, "instance" => index,
                "reason" => reason, "state" => self.state.to_string()}
            });
        }
        if self.state == PluginState::Stopping && self.slots.iter().all(|s| s.handle.is_none()) {
            self.state = PluginState::Stopped;
        }
    }
    /// A crash: restart after its backoff, or give the plugin up (`restart.max_restarts`).
    fn on_crash(&mut self, i: usize, msg: String, ran_for: Duration) {
        let slot = &mut self.slots[i];
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
    /// Puts the plugin in the `failed` state: no restarts until `restart.failed_retry` has
    /// passed (or a reload or `plugins restart`); queued and new tasks fail fast.
    pub(super) fn fail(&mut self, reason: String) {
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
    /// Leaves the `failed` state: a fresh restart budget, and every instance started again.
    pub(super) fn revive(&mut self, why: &str) {
        tracing::info!(plugin = %self.name(), "trying the failed plugin again: {why}");
        self.retry_failed_at = None;
        self.state = PluginState::Starting;
        self.window = RestartWindow::default();
        for i in 0..self.slots.len() {
            self.slots[i].backoff = Backoff::default();
            if self.slots[i].handle.is_none() && !self.slots[i].retired {
                self.launch(i);
            }
        }
    }
    pub(super) fn restart_due(&mut self) {
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
}
