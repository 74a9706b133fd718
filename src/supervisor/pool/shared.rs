//! The pool's state behind one lock, and who takes turns on it. The submitter of a task
//! queues and places it (`Shared::run`), and the instance that finished one tells it
//! (`TakesFinished`), each in a turn of its own under the lock: no turn of the actor, and no
//! hop through its channels, per task. The actor's loop keeps everything that waits: timers,
//! instances' ready and exit reports, the event subscription, the other commands.

use super::actor::{Pool, COMMAND_BATCH};
use super::core::Input;
use super::PoolCommand;
use crate::events::{Event, Subscription};
use crate::supervisor::instance::{InstanceEvent, Job, TakesFinished};
use crate::supervisor::status::PluginState;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep_until, Instant};

/// The pool's state, shared by its actor and the rest of the worker. A task is queued and
/// placed, and a finished one is heard, by whoever has it (the submitter in
/// `PoolHandle::run`, the instance in `TakesFinished`), under the lock: no turn of the actor
/// per task. The actor keeps everything that waits (timers, instances' ready and exit
/// reports, the event subscription, commands). Nothing awaits while holding the lock.
pub(super) struct Shared {
    pool: Mutex<Pool>,
    /// Wakes the actor when a turn taken elsewhere moved what it waits for.
    wake: Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// The state `make` builds, given what its instances tell their finishes to.
    pub(super) fn new(make: impl FnOnce(Weak<dyn TakesFinished>) -> Pool) -> Arc<Shared> {
        Arc::new_cyclic(|weak: &Weak<Shared>| {
            let takes_finished: Weak<dyn TakesFinished> = weak.clone();
            Shared {
                pool: Mutex::new(make(takes_finished)),
                wake: Notify::new(),
            }
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Pool> {
        crate::sync::lock(&self.pool)
    }

    /// Queues `job` and places what can be placed; gives it back for the actor's queue if
    /// the pool takes nothing directly (its actor wedged by the test hook, or gone).
    pub(super) fn run(&self, job: Job) -> Result<(), Job> {
        let mut pool = self.lock();
        if pool.frozen || pool.ended {
            return Err(job);
        }
        pool.feed(Input::Run(job));
        self.end_turn(&mut pool);
        Ok(())
    }

    /// What the actor does at the end of its own turns, for a turn taken elsewhere; the actor
    /// is woken if its timer no longer matches the core's or the plugin has stopped.
    fn end_turn(&self, pool: &mut Pool) {
        pool.place_queued();
        pool.publish();
        if pool.core.next_timer() != pool.timer_seen || *pool.core.state() == PluginState::Stopped {
            self.wake.notify_one();
        }
    }
}

impl TakesFinished for Shared {
    fn finished(&self, event: InstanceEvent) -> Result<(), InstanceEvent> {
        let mut pool = self.lock();
        if pool.frozen || pool.ended {
            return Err(event);
        }
        pool.on_instance(event);
        self.end_turn(&mut pool);
        Ok(())
    }
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

/// What woke the actor.
enum Woke {
    Command(Option<PoolCommand>),
    Instance(InstanceEvent),
    Timer,
    Event(Event),
    /// A turn taken elsewhere moved what the actor waits for (see `Shared::end_turn`).
    Look,
}

/// The actor's loop: waits with the lock released, then takes its turn under it.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<PoolCommand>,
    mut events: mpsc::Receiver<InstanceEvent>,
    mut subscription: Option<Subscription>,
) {
    let mut clock = Clock {
        autoscale_at: shared.lock().core.autoscaling().then(Instant::now),
        events_retry_at: None,
    };
    // One timer for all the actor waits on, moved only when its deadline does: a turn
    // with nothing due neither reads the clock nor touches the timer wheel.
    let mut timer = std::pin::pin!(sleep_until(Instant::now()));
    loop {
        let (due, takes_events) = {
            let mut pool = shared.lock();
            pool.timer_seen = pool.core.next_timer();
            (clock.next(pool.timer_seen), pool.takes_events())
        };
        if let Some(at) = due.filter(|&at| at != timer.deadline()) {
            timer.as_mut().reset(at);
        }
        let woke = tokio::select! {
            cmd = commands.recv() => Woke::Command(cmd),
            Some(ev) = events.recv() => Woke::Instance(ev),
            _ = &mut timer, if due.is_some() => Woke::Timer,
            // Taken only while an instance can take it; meanwhile the buffer holds (or drops).
            Some(event) = next_event(&mut subscription), if takes_events => Woke::Event(event),
            () = shared.wake.notified() => Woke::Look,
        };
        match shared.turn(
            woke,
            &mut clock,
            &mut commands,
            &mut events,
            &mut subscription,
        ) {
            Turn::Continue => {}
            Turn::Frozen => std::future::pending::<()>().await,
            Turn::Ended => return,
        }
    }
}

/// Where the actor's loop goes after a turn.
enum Turn {
    Continue,
    /// The test hook wedged it: it waits for good.
    Frozen,
    /// The plugin has stopped, and every waiter was told.
    Ended,
}

impl Shared {
    /// The actor's turn, under the lock.
    fn turn(
        &self,
        woke: Woke,
        clock: &mut Clock,
        commands: &mut mpsc::Receiver<PoolCommand>,
        events: &mut mpsc::Receiver<InstanceEvent>,
        subscription: &mut Option<Subscription>,
    ) -> Turn {
        let mut pool = self.lock();
        pool.take_turn(woke, clock, commands, events, subscription);
        if pool.frozen {
            return Turn::Frozen;
        }
        pool.place_queued();
        pool.publish();
        if *pool.core.state() != PluginState::Stopped {
            return Turn::Continue;
        }
        pool.ended = true;
        for w in pool.stop_waiters.drain(..) {
            let _ = w.send(());
        }
        // Commands that raced the stop still get answers.
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            pool.on_command(cmd);
        }
        Turn::Ended
    }
}

impl Pool {
    /// Handles what woke the actor, and whatever else of its kind already waits.
    fn take_turn(
        &mut self,
        woke: Woke,
        clock: &mut Clock,
        commands: &mut mpsc::Receiver<PoolCommand>,
        events: &mut mpsc::Receiver<InstanceEvent>,
        subscription: &mut Option<Subscription>,
    ) {
        match woke {
            Woke::Command(Some(cmd)) => {
                self.on_command(cmd);
                for _ in 0..COMMAND_BATCH {
                    match commands.try_recv() {
                        Ok(cmd) => self.on_command(cmd),
                        Err(_) => break,
                    }
                }
            }
            Woke::Command(None) => self.feed(Input::Stop {
                grace: self.manifest.timeouts.shutdown_grace,
            }),
            Woke::Instance(ev) => {
                // Every report already waiting is taken before tasks are placed again.
                self.on_instance(ev);
                while let Ok(ev) = events.try_recv() {
                    self.on_instance(ev);
                }
            }
            Woke::Timer => self.on_timer(clock),
            Woke::Event(event) => self.deliver_events(event, subscription.as_mut()),
            Woke::Look => {}
        }
        if clock.events_retry_at.is_none() && self.event_stats.as_ref().is_some_and(|s| s.blocked())
        {
            clock.events_retry_at = Some(Instant::now() + crate::events::BLOCKED_RETRY);
        }
        if self.core.autoscaling() != clock.autoscale_at.is_some() {
            // Autoscale bounds set at run time (`autoscale` control): the first tick is now.
            clock.autoscale_at = self.core.autoscaling().then(Instant::now);
        }
        if matches!(
            self.core.state(),
            PluginState::Stopping | PluginState::Stopped
        ) {
            // A stopping plugin is told nothing more; its replacement subscribes anew.
            *subscription = None;
        }
    }

    /// What is due when the timer fires: the core's timers, the autoscale tick, the end of an
    /// event delivery pause.
    fn on_timer(&mut self, clock: &mut Clock) {
        let now = Instant::now();
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
