//! The bounded queues between a pool and its instances: the pool's commands to one instance
//! (tasks, cancels, stops, and subscribers' events in the room the tasks leave) and the
//! instances' reports to their pool. Neither side ever waits on them; their sizes follow from
//! what the pool sends and hears (see ARCHITECTURE.md, the bounded-buffer invariant).

use super::{Command, EventKind, InstanceEvent};
use std::sync::Weak;
use tokio::sync::mpsc;

/// Where instances report to their pool. A finished task is told to the pool's state at once
/// (`TakesFinished`), so the pool's actor takes no turn per task; the rest (ready, exited), and
/// a finish the pool does not take directly, go on a channel bounded by what a pool can have
/// outstanding (see [`reports_capacity`]). A finish told directly is never ahead of its
/// instance's earlier reports: the pool places a task on an instance only once it has heard
/// that instance is ready, and an instance reports its exit after its every finish.
#[derive(Clone)]
pub struct Reports {
    tx: mpsc::Sender<InstanceEvent>,
    /// Weak: the pool's state holds the instances, which must not keep it alive.
    finished: Option<Weak<dyn TakesFinished>>,
}

/// What takes a finished task's report without a channel: the pool's shared state.
pub trait TakesFinished: Send + Sync {
    /// Takes the report, or gives it back for the channel (e.g. a pool whose actor is wedged
    /// or gone).
    fn finished(&self, event: InstanceEvent) -> Result<(), InstanceEvent>;
}

impl Reports {
    /// Every report on `tx` (the instance tests).
    pub fn channel(tx: mpsc::Sender<InstanceEvent>) -> Reports {
        Reports { tx, finished: None }
    }

    /// Finished tasks to `finished` while it lives, the rest on `tx`.
    pub fn with_finished(
        tx: mpsc::Sender<InstanceEvent>,
        finished: Weak<dyn TakesFinished>,
    ) -> Reports {
        Reports {
            tx,
            finished: Some(finished),
        }
    }

    /// Tells the pool; never waits (a pool gone is a pool that no longer listens).
    pub fn report(&self, event: InstanceEvent) {
        let event = match (&event.kind, &self.finished) {
            (EventKind::Finished { .. }, Some(finished)) => match finished.upgrade() {
                Some(pool) => match pool.finished(event) {
                    Ok(()) => return,
                    Err(event) => event,
                },
                None => event,
            },
            _ => event,
        };
        if let Err(mpsc::error::TrySendError::Full(event)) = self.tx.try_send(event) {
            tracing::error!(
                slot = event.slot,
                "a pool's report queue is full, which its limits rule out; a report is lost: {:?}",
                event.kind
            );
        }
    }
}

/// Room for reports from every slot a pool can have (`MAX_INSTANCES`, twice over for retired
/// slots still stopping), each with two generations at once (one ending, one starting) of
/// `concurrency` finished tasks plus a ready and an exit. A pool places no more tasks on an
/// instance than it has heard the end of, so a pool's reports never outgrow this; the channel
/// allocates only what is used.
pub fn reports_capacity(concurrency: usize) -> usize {
    2 * crate::supervisor::pool::MAX_INSTANCES * 2 * (concurrency + 2)
}

/// Room for subscribers' events in an instance's command queue, beyond what its tasks may need.
pub(super) const EVENT_ROOM: usize = 64;

/// What an instance's commands can be at most without events: each task placed on it (at
/// most `concurrency`), a cancel and an escalation of each (the pool forwards no more), and
/// stops.
pub(super) fn task_commands(concurrency: usize) -> usize {
    3 * concurrency + 4
}

/// The pool's side of an instance.
#[derive(Debug, Clone)]
pub struct InstanceHandle {
    pub(super) tx: mpsc::Sender<Command>,
    /// Room kept for task commands: an event is sent only while more than this is free.
    pub(super) reserved: usize,
}

impl InstanceHandle {
    /// Sends a command; gives it back if the instance has already ended (or, for an event, if
    /// its queue holds no room beyond what tasks may need).
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        if matches!(cmd, Command::Event { .. }) && self.tx.capacity() <= self.reserved {
            return Err(cmd);
        }
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(cmd) => {
                tracing::error!("an instance's command queue is full, which the pool's limits rule out; the command is refused");
                cmd
            }
            mpsc::error::TrySendError::Closed(cmd) => cmd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CancelCause, Cancellation};
    use std::sync::Arc;
    use std::time::Duration;

    /// A pool's state as `TakesFinished` sees it: what it took, and whether it takes more.
    #[derive(Default)]
    struct Taker {
        took: std::sync::Mutex<Vec<String>>,
        refuses: std::sync::atomic::AtomicBool,
    }

    impl TakesFinished for Taker {
        fn finished(&self, event: InstanceEvent) -> Result<(), InstanceEvent> {
            if self.refuses.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(event);
            }
            let EventKind::Finished { task_id, .. } = &event.kind else {
                panic!("only finishes are taken directly: {:?}", event.kind);
            };
            self.took.lock().unwrap().push(task_id.to_string());
            Ok(())
        }
    }

    fn finished(task_id: &str) -> InstanceEvent {
        InstanceEvent {
            slot: 0,
            generation: 1,
            kind: EventKind::Finished {
                task_id: task_id.into(),
                ok: true,
            },
        }
    }

    #[test]
    fn finishes_go_to_the_pool_state_directly_and_everything_else_on_the_channel() {
        let (tx, mut rx) = mpsc::channel(8);
        let taker = Arc::new(Taker::default());
        let weak: Weak<dyn TakesFinished> = Arc::downgrade(&taker) as Weak<Taker>;
        let reports = Reports::with_finished(tx, weak);
        reports.report(finished("a"));
        assert_eq!(*taker.took.lock().unwrap(), ["a"]);
        assert!(rx.try_recv().is_err(), "nothing on the channel");
        reports.report(InstanceEvent {
            slot: 0,
            generation: 1,
            kind: EventKind::Exited {
                reason: super::super::ExitReason::Stopped,
                ran_for: Duration::ZERO,
            },
        });
        assert!(matches!(
            rx.try_recv().map(|e| e.kind),
            Ok(EventKind::Exited { .. })
        ));
        // Refused (a wedged or ended actor): the channel, where the actor would read it.
        taker
            .refuses
            .store(true, std::sync::atomic::Ordering::Relaxed);
        reports.report(finished("b"));
        assert!(matches!(
            rx.try_recv().map(|e| e.kind),
            Ok(EventKind::Finished { task_id, .. }) if task_id.as_str() == "b"
        ));
        // The pool's state gone: the channel too.
        drop(taker);
        reports.report(finished("c"));
        assert!(matches!(
            rx.try_recv().map(|e| e.kind),
            Ok(EventKind::Finished { task_id, .. }) if task_id.as_str() == "c"
        ));
        // And without a direct taker (the instance tests), all on the channel.
        let (tx, mut rx) = mpsc::channel(8);
        Reports::channel(tx).report(finished("d"));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn the_command_queue_keeps_room_for_tasks_that_events_cannot_take() {
        let concurrency = 2;
        let reserved = task_commands(concurrency);
        let (tx, mut rx) = mpsc::channel(reserved + EVENT_ROOM);
        let handle = InstanceHandle { tx, reserved };
        let stats = Arc::new(crate::events::DeliveryStats::default());
        let event = || Command::Event {
            event: "{}".into(),
            stats: stats.clone(),
        };
        for _ in 0..EVENT_ROOM {
            assert!(handle.send(event()).is_ok());
        }
        assert!(
            handle.send(event()).is_err(),
            "an event past its room is refused"
        );
        // Every task command the pool can send still fits: a run, a cancel and an escalation of
        // each task, and the stops.
        let cancel = |escalate| Command::Cancel {
            task_id: "t".into(),
            cancel: Cancellation::new(CancelCause::Revoked, "asked"),
            escalate,
        };
        for i in 0..reserved {
            let cmd = match i % 3 {
                0 => cancel(false),
                1 => cancel(true),
                _ => Command::Stop {
                    grace: Duration::from_secs(1),
                },
            };
            assert!(handle.send(cmd).is_ok(), "task command {i} fits");
        }
        assert!(
            handle.send(cancel(false)).is_err(),
            "and the queue is bounded"
        );
        rx.try_recv().expect("an event waits first");
        assert!(
            handle.send(event()).is_err(),
            "a freed place is the tasks' first"
        );
        drop(rx);
        assert!(
            handle.send(cancel(false)).is_err(),
            "an ended instance refuses"
        );
    }
}
