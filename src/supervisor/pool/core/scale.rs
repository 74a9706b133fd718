//! Changing how many instances a pool runs while it runs (Celery's `pool_grow`, `pool_shrink`
//! and `autoscale`). Growing starts new instances (or brings retired ones back); shrinking
//! retires the highest-numbered ones: a retired instance takes no new task, is stopped once its
//! tasks are done, and is not restarted. With autoscale bounds the pool grows by one while
//! tasks wait and every instance is busy, and shrinks by one after an instance has been idle for
//! `AUTOSCALE_KEEPALIVE`, within the bounds.

use super::{Effect, Now, PoolCore, Queued, Slot};
use crate::supervisor::status::{InstanceState, PluginState};
use std::time::Duration;

/// Most instances one plugin may be scaled to.
pub const MAX_INSTANCES: usize = 64;

/// How long an instance stays idle before autoscale retires it (Celery's keepalive, 30 s).
pub const AUTOSCALE_KEEPALIVE: Duration = Duration::from_secs(30);

/// How often autoscale looks at the load.
pub(in crate::supervisor::pool) const AUTOSCALE_TICK: Duration = Duration::from_secs(1);

/// A change of instance count asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// `pool_grow N` / `pool_shrink N`: by this many (negative shrinks).
    By(i64),
    /// `autoscale MAX MIN`: keep between these, following the load.
    Auto { min: usize, max: usize },
}

impl<J: Queued> PoolCore<J> {
    /// Instances that are not retired.
    pub fn active_instances(&self) -> usize {
        self.slots.iter().filter(|s| !s.retired).count()
    }

    /// Applies `scale`; returns the instances now wanted. `pool_grow`/`pool_shrink` are refused
    /// while autoscale bounds are set, as in Celery.
    pub fn scale(
        &mut self,
        scale: Scale,
        now: Now,
        out: &mut Vec<Effect<J>>,
    ) -> Result<usize, String> {
        match scale {
            Scale::By(_) if self.autoscale.is_some() => {
                return Err(
                    "not supported with autoscale: adjust the autoscale range instead".into(),
                )
            }
            Scale::By(n) => {
                let target = (self.active_instances() as i64 + n).clamp(1, MAX_INSTANCES as i64);
                self.scale_to(target as usize, now, out);
            }
            Scale::Auto { min, max } => {
                let (min, max) = (min.clamp(1, MAX_INSTANCES), max.clamp(1, MAX_INSTANCES));
                let (min, max) = (min.min(max), max.max(min));
                self.autoscale = Some((min, max));
                let active = self.active_instances();
                self.scale_to(active.clamp(min, max), now, out);
            }
        }
        Ok(self.active_instances())
    }

    /// Runs exactly `n` instances that are not retired.
    fn scale_to(&mut self, n: usize, now: Now, out: &mut Vec<Effect<J>>) {
        let live = !matches!(
            self.state,
            PluginState::Stopping | PluginState::Stopped | PluginState::Failed(_)
        );
        while self.active_instances() < n {
            let i = match self.slots.iter().position(|s| s.retired) {
                Some(i) => i,
                None => {
                    self.slots.push(Slot::new(self.slots.len()));
                    self.slots.len() - 1
                }
            };
            let slot = &mut self.slots[i];
            slot.retired = false;
            if slot.process && !slot.stop_sent {
                // Retired but not yet stopped (it had tasks): back in service as it was.
                slot.state = match slot.pid {
                    Some(_) => InstanceState::Ready,
                    None => InstanceState::Starting,
                };
            }
            // One still ending from its retirement is started again when it has exited.
            if live && !self.slots[i].process {
                self.launch(i, now, out);
            }
        }
        while self.active_instances() > n {
            let i = self
                .slots
                .iter()
                .rposition(|s| !s.retired)
                .expect("more active instances than wanted");
            self.retire(i, out);
        }
        tracing::info!(plugin = %self.rules.name, instances = n, "instances scaled");
    }

    /// Takes slot `i` out of service: no new task; stopped once idle; never restarted.
    fn retire(&mut self, i: usize, out: &mut Vec<Effect<J>>) {
        let slot = &mut self.slots[i];
        slot.retired = true;
        slot.restart_at = None;
        slot.state = match slot.process {
            true => InstanceState::Stopping,
            false => InstanceState::Stopped,
        };
        self.stop_if_retired_and_idle(i, out);
    }

    /// Stops slot `i` if it is retired and has no task left (once: `stop_sent` says so).
    pub(super) fn stop_if_retired_and_idle(&mut self, i: usize, out: &mut Vec<Effect<J>>) {
        let grace = self.rules.shutdown_grace;
        let slot = &mut self.slots[i];
        if slot.retired && slot.in_flight == 0 && !slot.stop_sent && slot.process {
            slot.stop_sent = true;
            out.push(Effect::Stop { slot: i, grace });
        }
    }

    /// With autoscale bounds: one more instance while tasks wait and every instance is busy;
    /// one fewer after an instance has been idle for `AUTOSCALE_KEEPALIVE`.
    pub(super) fn autoscale_tick(&mut self, now: Now, out: &mut Vec<Effect<J>>) {
        let Some((min, max)) = self.autoscale else {
            return;
        };
        if !matches!(self.state, PluginState::Running) {
            return;
        }
        let active = self.active_instances();
        let limit = self.rules.concurrency;
        let all_busy = self
            .slots
            .iter()
            .filter(|s| !s.retired)
            .all(|s| s.in_flight >= limit || s.state != InstanceState::Ready);
        if !self.queue.is_empty() && all_busy && active < max {
            self.scale_to(active + 1, now, out);
            return;
        }
        let idle_long = self.slots.iter().any(|s| {
            !s.retired
                && s.in_flight == 0
                && s.idle_since
                    .is_some_and(|t| now.at().duration_since(t) >= AUTOSCALE_KEEPALIVE)
        });
        if self.queue.is_empty() && idle_long && active > min {
            self.scale_to(active - 1, now, out);
        }
    }
}
