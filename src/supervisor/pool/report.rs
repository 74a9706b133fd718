//! What a pool tells the rest of the worker about its plugin: the cheap view others wait on,
//! the full status report, and when a failed plugin is tried next.

use super::super::status::{EventsStatus, InstanceState, InstanceStatus, PluginStatus};
use super::{Pool, PoolView};
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::time::Instant;

impl Pool {
    pub(super) fn status(&self) -> PluginStatus {
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
            backends: self.options.offers.stats.status(m),
            events: self.event_stats.as_ref().map(|stats| EventsStatus {
                subscribed: m.events.clone(),
                delivered: stats.delivered(),
                dropped: stats.dropped(),
            }),
            instances: self
                .slots
                .iter()
                // A retired instance is shown until its process has ended.
                .filter(|s| !(s.retired && s.handle.is_none()))
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
                    protocol_violations: s.violations.load(Ordering::Relaxed),
                    last_exit: s.last_exit.clone(),
                    recent_exits: s.recent_exits.iter().cloned().collect(),
                    stderr_tail: s.stderr.lines(s.pid),
                })
                .collect(),
        }
    }
    /// "next try in 4m 59s (restart.failed_retry)" for a failed plugin's refusals.
    pub(super) fn next_try(&self) -> String {
        match self.retry_failed_at {
            Some((at, _)) => {
                let left = at.saturating_duration_since(Instant::now()).as_secs();
                let left = humantime::format_duration(std::time::Duration::from_secs(left));
                format!(
                    "next try in {left} (`restart.failed_retry`; or `worker plugins restart {}`)",
                    self.name()
                )
            }
            None => "no automatic retry".to_string(),
        }
    }
    pub(super) fn publish(&self) {
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
}
