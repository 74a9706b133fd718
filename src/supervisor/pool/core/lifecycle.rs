//! The instances' lives as the core decides them: ready, a task finished, an exit (restart
//! with backoff, or give the plugin up), the `failed` state and its ways back.

use super::{Announcement, Effect, Now, PoolCore, Queued, RECENT_EXITS};
use crate::supervisor::instance::ExitReason;
use crate::supervisor::restart::{self, Backoff, Decision, RestartWindow};
use crate::supervisor::status::{ExitRecord, InstanceState, PluginState};
use crate::task::Failure;
use std::time::{Duration, SystemTime};

impl<J: Queued> PoolCore<J> {
    pub(super) fn on_ready(
        &mut self,
        i: usize,
        pid: u32,
        plugin_version: String,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) {
        out.push(Effect::Announce(Announcement::Started {
            instance: self.slots[i].index,
            pid,
            version: plugin_version.clone(),
        }));
        let slot = &mut self.slots[i];
        slot.pid = Some(pid);
        slot.idle_since = Some(now.at());
        slot.plugin_version = Some(plugin_version);
        if slot.state == InstanceState::Starting {
            slot.state = InstanceState::Ready;
        }
        if self.state == PluginState::Starting {
            self.state = PluginState::Running;
        }
    }

    pub(super) fn on_finished(
        &mut self,
        i: usize,
        task_id: &str,
        ok: bool,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) {
        let slot = &mut self.slots[i];
        slot.in_flight = slot.in_flight.saturating_sub(1);
        if ok {
            slot.done += 1;
        } else {
            slot.failed += 1;
        }
        if slot.in_flight == 0 {
            slot.idle_since = Some(now.at());
        }
        self.placements.remove(task_id);
        self.stop_if_retired_and_idle(i, out);
    }

    pub(super) fn on_exit(
        &mut self,
        i: usize,
        reason: ExitReason,
        ran_for: Duration,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) {
        out.push(Effect::Reap { slot: i });
        self.placements.retain(|_, p| p.slot != i);
        let stopping = matches!(self.state, PluginState::Stopping | PluginState::Stopped);
        let failed = matches!(self.state, PluginState::Failed(_));
        let slot = &mut self.slots[i];
        slot.process = false;
        slot.in_flight = 0;
        let described = match &reason {
            ExitReason::Stopped => "stopped".to_string(),
            ExitReason::Crashed(m) | ExitReason::Incompatible(m) => m.clone(),
        };
        out.push(Effect::Announce(Announcement::Exited {
            instance: slot.index,
            pid: slot.pid,
            reason: described.clone(),
            expected: reason == ExitReason::Stopped,
        }));
        if slot.recent_exits.len() == RECENT_EXITS {
            slot.recent_exits.pop_front();
        }
        let at = now
            .wall()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        slot.recent_exits.push_back(ExitRecord {
            at,
            reason: described,
        });
        match reason {
            // Retired by a shrink: it stays down, however it ended.
            _ if slot.retired => slot.state = InstanceState::Stopped,
            // Stopped while the plugin is live again (revived while this one was stopping, or
            // brought back by a grow while its retirement was ending).
            ExitReason::Stopped if !stopping && !failed => self.launch(i, now, out),
            ExitReason::Stopped => slot.state = InstanceState::Stopped,
            _ if stopping => slot.state = InstanceState::Stopped,
            ExitReason::Incompatible(msg) => {
                slot.last_exit = Some(msg.clone());
                slot.state = InstanceState::Failed;
                self.last_exit = Some(msg.clone());
                self.fail(msg, now, out);
            }
            ExitReason::Crashed(msg) => self.on_crash(i, msg, ran_for, now, out),
        }
        if self.slots[i].state == InstanceState::Failed {
            out.push(Effect::Announce(Announcement::Failed {
                instance: self.slots[i].index,
                reason: self.last_exit.clone(),
                state: self.state.to_string(),
            }));
        }
        self.settle_stop();
    }

    /// A crash: restart after its backoff, or give the plugin up (`restart.max_restarts`).
    fn on_crash(
        &mut self,
        i: usize,
        msg: String,
        ran_for: Duration,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) {
        let slot = &mut self.slots[i];
        slot.last_exit = Some(msg.clone());
        self.last_exit = Some(msg.clone());
        let decision = restart::decide(
            &self.rules.restart,
            &mut slot.backoff,
            &mut self.window,
            now.at().into_std(),
            ran_for,
            self.rng.f64(),
        );
        match decision {
            Decision::Restart { after } => {
                slot.restarts += 1;
                if after.is_zero() {
                    self.launch(i, now, out);
                } else {
                    tracing::info!(plugin = %self.rules.name, instance = i, "restarting in {after:?}");
                    slot.state = InstanceState::Backoff;
                    slot.restart_at = Some(now.at() + after);
                }
            }
            Decision::GiveUp { restarts, window } => {
                slot.state = InstanceState::Failed;
                self.fail(format!("restarted {restarts} times within {window:?} (restart.max_restarts); last exit: {msg}"), now, out);
            }
        }
    }

    /// Puts the plugin in the `failed` state: no restarts until `restart.failed_retry` has
    /// passed (or a reload or `plugins restart`); queued and new tasks fail fast.
    fn fail(&mut self, reason: String, now: Now, out: &mut Vec<Effect<J>>) {
        let retry = self.rules.restart.failed_retry;
        self.retry_failed_at = Some(now.at() + retry);
        tracing::error!(plugin = %self.name(), "plugin failed: {reason}; it will be tried again in {retry:?} (`restart.failed_retry`), on reload, or with `worker plugins restart {}`", self.name());
        self.state = PluginState::Failed(reason.clone());
        let next = self.next_try(now.at());
        for job in self.queue.drain(..) {
            let failure = Failure::unavailable(format!(
                "plugin `{}` is failed: {reason}; {next}",
                self.rules.name
            ));
            out.push(Effect::Finish { job, failure });
        }
        let grace = self.rules.shutdown_grace;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.restart_at = None;
            if slot.state == InstanceState::Backoff {
                slot.state = InstanceState::Failed;
            }
            if slot.process {
                out.push(Effect::Stop { slot: i, grace });
            }
        }
    }

    /// `plugins restart`: a failed plugin is started again at once. False if it was not
    /// failed (nothing done).
    pub fn restart(&mut self, now: Now, out: &mut Vec<Effect<J>>) -> bool {
        let failed = matches!(self.state, PluginState::Failed(_));
        if failed {
            self.revive("restart requested", now, out);
        }
        failed
    }

    /// Leaves the `failed` state: a fresh restart budget, and every instance started again.
    fn revive(&mut self, why: &str, now: Now, out: &mut Vec<Effect<J>>) {
        tracing::info!(plugin = %self.name(), "trying the failed plugin again: {why}");
        self.retry_failed_at = None;
        self.state = PluginState::Starting;
        self.window = RestartWindow::default();
        for i in 0..self.slots.len() {
            self.slots[i].backoff = Backoff::default();
            if !self.slots[i].process && !self.slots[i].retired {
                self.launch(i, now, out);
            }
        }
    }

    /// Starts what is due: the failed plugin after `restart.failed_retry`, and the instances
    /// whose backoff has passed.
    pub(super) fn timers_due(&mut self, now: Now, out: &mut Vec<Effect<J>>) {
        if self.retry_failed_at.is_some_and(|at| at <= now.at()) {
            let retry = self.rules.restart.failed_retry;
            self.revive(
                &format!("{retry:?} passed (`restart.failed_retry`)"),
                now,
                out,
            );
        }
        for i in 0..self.slots.len() {
            if self.slots[i].restart_at.is_some_and(|t| t <= now.at()) {
                self.launch(i, now, out);
            }
        }
    }
}
