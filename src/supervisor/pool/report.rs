//! What a pool tells the rest of the worker about its plugin: the cheap view others wait on
//! and the full status report, read off the core and the instances' counters.

use super::actor::Pool;
use super::PoolView;
use crate::supervisor::status::{EventsStatus, InstanceState, InstanceStatus, PluginStatus};
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::time::Instant;

impl Pool {
    pub(super) fn status(&self) -> PluginStatus {
        let m = &self.manifest;
        let core = &self.core;
        let now = Instant::now();
        PluginStatus {
            name: m.name.clone(),
            version: m.version.clone(),
            state: core.state().clone(),
            tasks: m.task_names().map(str::to_string).collect(),
            queued: core.queued(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            next_try_at: core.retry_failed_at().map(|at| {
                let at = SystemTime::now() + at.saturating_duration_since(now);
                at.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            }),
            backends: self.options.offers.stats.status(m),
            events: self.event_stats.as_ref().map(|stats| EventsStatus {
                subscribed: m.events.clone(),
                delivered: stats.delivered(),
                dropped: stats.dropped(),
            }),
            instances: core
                .slots()
                .iter()
                .zip(&self.io)
                // A retired instance is shown until its process has ended.
                .filter(|(s, _)| !s.retired || s.process)
                .map(|(s, io)| InstanceStatus {
                    index: s.index as u32,
                    state: s.state,
                    pid: s.pid.filter(|_| s.process),
                    uptime_secs: s
                        .started_at
                        .filter(|_| s.process)
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    restarts: s.restarts,
                    in_flight: s.in_flight,
                    done: s.done,
                    failed: s.failed,
                    stray_stdout_lines: io.stray_lines.load(Ordering::Relaxed),
                    protocol_violations: io.violations.load(Ordering::Relaxed),
                    last_exit: s.last_exit.clone(),
                    recent_exits: s.recent_exits.iter().cloned().collect(),
                    stderr_tail: io.stderr.lines(s.pid),
                })
                .collect(),
        }
    }

    /// Updates the view if it changed. Compared in place, so that the turns that change
    /// nothing of it (most: a task placed or finished) copy no string.
    pub(super) fn publish(&self) {
        let slots = self.core.slots();
        let ready = slots
            .iter()
            .filter(|s| s.state == InstanceState::Ready)
            .count();
        let restarts = slots.iter().map(|s| s.restarts as u64).sum();
        let (state, last_exit) = (self.core.state(), self.core.last_exit());
        self.view.send_if_modified(|v| {
            if v.ready == ready
                && v.restarts == restarts
                && v.state == *state
                && v.last_exit.as_ref() == last_exit
            {
                return false;
            }
            *v = PoolView {
                state: state.clone(),
                ready,
                restarts,
                last_exit: last_exit.cloned(),
            };
            true
        });
    }
}
