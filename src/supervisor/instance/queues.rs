//! The bounded queues between a pool and its instances: the pool's commands to one instance
//! (tasks, cancels, stops, and subscribers' events in the room the tasks leave) and the
//! instances' reports to their pool. Neither side ever waits on them; their sizes follow from
//! what the pool sends and hears (see ARCHITECTURE.md, the bounded-buffer invariant).

use super::{Command, InstanceEvent};
use tokio::sync::mpsc;

/// Where instances report to their pool: bounded by what a pool can have outstanding (see
/// [`reports_capacity`]).
pub type Reports = mpsc::Sender<InstanceEvent>;

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

/// Tells the pool; never waits (a pool gone is a pool that no longer listens).
pub(super) fn report_to(reports: &Reports, event: InstanceEvent) {
    if let Err(mpsc::error::TrySendError::Full(event)) = reports.try_send(event) {
        tracing::error!(
            slot = event.slot,
            "a pool's report queue is full, which its limits rule out; a report is lost: {:?}",
            event.kind
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CancelCause, Cancellation};
    use std::sync::Arc;
    use std::time::Duration;

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
