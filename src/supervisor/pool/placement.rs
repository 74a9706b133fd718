//! The pool's decisions about a task before any instance runs it, as pure functions
//! table-tested below: whether it is refused at the door ([`refusal`]) and which instance
//! takes the next queued one ([`choose`]). The pool actor carries them out.

use crate::supervisor::status::{InstanceState, PluginState};

/// Why a task is refused when it reaches the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The plugin is in the `failed` state (with its reason).
    Failed(String),
    /// The plugin is stopping or stopped.
    Stopping,
    /// `queued` tasks already wait: the queue holds `queue_capacity`.
    Full { queued: usize },
}

/// Whether a task arriving now is refused: the plugin failed or stopping, or its queue full.
/// A starting plugin queues it (it runs once an instance is ready).
pub(super) fn refusal(state: &PluginState, queued: usize, capacity: usize) -> Option<Refusal> {
    match state {
        PluginState::Failed(reason) => Some(Refusal::Failed(reason.clone())),
        PluginState::Stopping | PluginState::Stopped => Some(Refusal::Stopping),
        _ if queued >= capacity => Some(Refusal::Full { queued }),
        _ => None,
    }
}

/// The instance that takes the next queued task: among the ready ones with fewer than `limit`
/// tasks (`concurrency`), the least loaded, the lowest index on a tie. `None`: it waits.
/// A retired instance is `Stopping` or `Stopped`, so it never takes one.
pub(super) fn choose(
    slots: impl IntoIterator<Item = (InstanceState, usize)>,
    limit: usize,
) -> Option<usize> {
    slots
        .into_iter()
        .enumerate()
        .filter(|(_, (state, in_flight))| *state == InstanceState::Ready && *in_flight < limit)
        .min_by_key(|(_, (_, in_flight))| *in_flight)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    #[test]
    fn which_tasks_are_refused_at_the_door() {
        let failed = PluginState::Failed("boom".into());
        let cases = [
            (PluginState::Starting, 0, 10, None),
            (PluginState::Running, 9, 10, None),
            (
                PluginState::Running,
                10,
                10,
                Some(Refusal::Full { queued: 10 }),
            ),
            (
                PluginState::Starting,
                10,
                10,
                Some(Refusal::Full { queued: 10 }),
            ),
            (failed.clone(), 0, 10, Some(Refusal::Failed("boom".into()))),
            (failed, 10, 10, Some(Refusal::Failed("boom".into()))),
            (PluginState::Stopping, 0, 10, Some(Refusal::Stopping)),
            (PluginState::Stopped, 0, 10, Some(Refusal::Stopping)),
        ];
        for (state, queued, capacity, want) in cases {
            assert_eq!(
                refusal(&state, queued, capacity),
                want,
                "{state:?} {queued}/{capacity}"
            );
        }
    }

    #[test]
    fn the_least_loaded_ready_instance_takes_the_next_task() {
        type Slots<'a> = &'a [(InstanceState, usize)];
        let cases: [(Slots, usize, Option<usize>); 9] = [
            (&[], 4, None),
            (&[(Ready, 0)], 4, Some(0)),
            (&[(Ready, 4)], 4, None),
            (&[(Ready, 3), (Ready, 1), (Ready, 2)], 4, Some(1)),
            (&[(Ready, 1), (Ready, 1)], 4, Some(0)),
            (&[(Starting, 0), (Ready, 3)], 4, Some(1)),
            (&[(Crashed, 0), (Backoff, 0), (Failed, 0)], 4, None),
            (&[(Stopping, 0), (Stopped, 0), (Ready, 2)], 4, Some(2)),
            (&[(Ready, 1), (Ready, 0)], 1, Some(1)),
        ];
        for (slots, limit, want) in cases {
            assert_eq!(
                choose(slots.iter().copied(), limit),
                want,
                "{slots:?} limit {limit}"
            );
        }
    }
}
