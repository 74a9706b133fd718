//! The core under test: a queued job that is only an id, rules, a clock the test moves, and
//! effects shown as short strings.

use super::super::*;
use crate::manifest::RestartSettings;
use crate::task::CancelCause;
use std::time::SystemTime;

#[derive(Debug)]
pub(super) struct J(pub(super) crate::task::TaskId);

impl Queued for J {
    fn task_id(&self) -> &crate::task::TaskId {
        &self.0
    }
}

pub(super) fn rules(concurrency: usize, queue_capacity: usize) -> Rules {
    Rules {
        name: "p".into(),
        concurrency,
        queue_capacity,
        restart: RestartSettings {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
            stable_after: Duration::from_secs(30),
            failed_retry: Duration::from_secs(300),
        },
        shutdown_grace: Duration::from_secs(5),
    }
}

fn show(effect: &Effect<J>) -> String {
    match effect {
        Effect::Launch { slot, generation } => format!("launch {slot}#{generation}"),
        Effect::Place { slot, job } => format!("place {slot} {}", job.0),
        Effect::Stop { slot, .. } => format!("stop {slot}"),
        Effect::Reap { slot } => format!("reap {slot}"),
        Effect::Finish { job, failure } => format!("finish {} {}", job.0, failure.exc_type),
        Effect::Announce(Announcement::Started { instance, .. }) => format!("started {instance}"),
        Effect::Announce(Announcement::Exited {
            instance, expected, ..
        }) => format!("exited {instance} expected={expected}"),
        Effect::Announce(Announcement::Failed { instance, .. }) => format!("failed {instance}"),
    }
}

/// A core under test with its own clock.
pub(super) struct Pool {
    pub(super) core: PoolCore<J>,
    pub(super) now: Now,
}

impl Pool {
    /// `instances` slots launched; `ready` of them (the first ones) through their handshake.
    pub(super) fn new(instances: usize, ready: usize, rules: Rules) -> Pool {
        let now = Now::fixed(Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        let core = PoolCore::start(rules, instances, fastrand::Rng::with_seed(7), now, &mut out);
        assert_eq!(
            shown(&out),
            (0..instances)
                .map(|i| format!("launch {i}#1"))
                .collect::<Vec<_>>()
        );
        let mut pool = Pool { core, now };
        for slot in 0..ready {
            pool.ready(slot);
        }
        pool
    }

    pub(super) fn input(&mut self, input: Input<J>) -> Vec<String> {
        let mut out = Vec::new();
        self.core.handle(input, self.now, &mut out);
        shown(&out)
    }

    pub(super) fn place(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.core.place_queued(&mut out);
        shown(&out)
    }

    pub(super) fn run(&mut self, id: &'static str) -> Vec<String> {
        let mut shown = self.input(Input::Run(J(id.into())));
        shown.extend(self.place());
        shown
    }

    pub(super) fn generation(&self, slot: usize) -> u64 {
        self.core.slots()[slot].generation
    }

    pub(super) fn ready(&mut self, slot: usize) -> Vec<String> {
        let generation = self.generation(slot);
        self.input(Input::Ready {
            slot,
            generation,
            pid: 100 + slot as u32,
            plugin_version: "1".into(),
        })
    }

    pub(super) fn finished(&mut self, slot: usize, task_id: &str, ok: bool) -> Vec<String> {
        let generation = self.generation(slot);
        self.input(Input::Finished {
            slot,
            generation,
            task_id: task_id.into(),
            ok,
        })
    }

    pub(super) fn exited(
        &mut self,
        slot: usize,
        reason: ExitReason,
        ran_for: Duration,
    ) -> Vec<String> {
        let generation = self.generation(slot);
        self.input(Input::Exited {
            slot,
            generation,
            reason,
            ran_for,
        })
    }

    pub(super) fn crash(&mut self, slot: usize) -> Vec<String> {
        self.exited(slot, ExitReason::Crashed("boom".into()), Duration::ZERO)
    }

    pub(super) fn advance(&mut self, by: Duration) {
        self.now = Now::fixed(self.now.at() + by, self.now.wall() + by);
    }

    /// Sets the monotonic clock alone (the wall clock stays).
    pub(super) fn set_at(&mut self, at: Instant) {
        self.now = Now::fixed(at, self.now.wall());
    }

    pub(super) fn cancel(&mut self, id: &str, mode: CancelMode) -> (CancelStep, Vec<String>) {
        let mut out = Vec::new();
        let cancel = Cancellation::new(CancelCause::Requested, "asked");
        let step = self.core.cancel(id, &cancel, mode, &mut out);
        (step, shown(&out))
    }

    pub(super) fn scale(&mut self, scale: Scale) -> (Result<usize, String>, Vec<String>) {
        let mut out = Vec::new();
        let result = self.core.scale(scale, self.now, &mut out);
        (result, shown(&out))
    }

    pub(super) fn states(&self) -> Vec<InstanceState> {
        self.core.slots().iter().map(|s| s.state).collect()
    }
}

pub(super) fn shown(effects: &[Effect<J>]) -> Vec<String> {
    effects.iter().map(show).collect()
}
