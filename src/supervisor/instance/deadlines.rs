//! A running task's timers, as pure functions table-tested below: which one is due at a given
//! moment ([`Deadlines::due`]) and when the next one is ([`Deadlines::next`]). The instance
//! carries them out (a kill for the hard limit and the cancel grace, `task.cancel` for the
//! soft limit).

use tokio::time::Instant;

/// A running task's timers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Deadlines {
    /// The soft time limit: `task.cancel` is sent, unless a cancel was sent already.
    pub(super) soft_at: Option<Instant>,
    /// The hard time limit: the process is killed.
    pub(super) hard_at: Option<Instant>,
    /// The cancel grace after a forced cancel: the process is killed.
    pub(super) kill_at: Option<Instant>,
    /// `task.cancel` was sent: the soft limit has nothing left to do.
    pub(super) cancel_sent: bool,
}

/// A timer that fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    HardLimit,
    CancelGrace,
    SoftLimit,
}

impl Deadlines {
    /// The most severe timer due at `now`: the hard limit, then the cancel grace, then the
    /// soft limit (only while no cancel was sent).
    pub(super) fn due(&self, now: Instant) -> Option<Due> {
        let passed = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        if passed(self.hard_at) {
            Some(Due::HardLimit)
        } else if passed(self.kill_at) {
            Some(Due::CancelGrace)
        } else if !self.cancel_sent && passed(self.soft_at) {
            Some(Due::SoftLimit)
        } else {
            None
        }
    }

    /// When the earliest timer that can still fire is due.
    pub(super) fn next(&self) -> Option<Instant> {
        let soft = self.soft_at.filter(|_| !self.cancel_sent);
        [soft, self.hard_at, self.kill_at]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_most_severe_timer_due_fires_and_a_cancel_silences_the_soft_limit() {
        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        let d = |soft, hard, kill, cancel_sent| Deadlines {
            soft_at: soft,
            hard_at: hard,
            kill_at: kill,
            cancel_sent,
        };
        // (deadlines, seconds after t0, due, next)
        let cases = [
            (d(None, None, None, false), 100, None, None),
            (d(at(5), None, None, false), 4, None, at(5)),
            (d(at(5), None, None, false), 5, Some(Due::SoftLimit), at(5)),
            (d(at(5), None, None, true), 9, None, None),
            (
                d(at(5), at(10), None, false),
                7,
                Some(Due::SoftLimit),
                at(5),
            ),
            (d(at(5), at(10), None, true), 7, None, at(10)),
            (
                d(at(5), at(10), None, false),
                10,
                Some(Due::HardLimit),
                at(5),
            ),
            (d(None, None, at(3), true), 2, None, at(3)),
            (d(None, None, at(3), true), 3, Some(Due::CancelGrace), at(3)),
            (d(None, at(3), at(3), true), 3, Some(Due::HardLimit), at(3)),
            (
                d(at(1), at(8), at(4), true),
                5,
                Some(Due::CancelGrace),
                at(4),
            ),
        ];
        for (deadlines, secs, due, next) in cases {
            let now = t0 + Duration::from_secs(secs);
            assert_eq!(deadlines.due(now), due, "{deadlines:?} at {secs}s");
            assert_eq!(deadlines.next(), next, "{deadlines:?}");
        }
    }
}
