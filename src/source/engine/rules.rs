//! What the worker decides about a task message, as pure functions table-tested below:
//! [`admit`] before it runs (run, hold, attach to its owner, requeue, revoke, or ack as
//! answered), [`settlement_of`] after (answer, requeue, or retry). `delivery` carries them out.

use crate::source::celery::{self, state};
use crate::task::{FailureKind, Outcome};
use serde_json::Value;
use std::time::SystemTime;

/// What the owner of a task id does once it knows how the task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Publish this final state, then ack (or, for a task nobody serves, reject without
    /// requeue, so a dead-letter exchange sees it).
    Answer {
        status: &'static str,
        result: Value,
        traceback: Option<String>,
        reject: bool,
    },
    /// The task did not run to an end because this worker is stopping: give the message back
    /// to the queue, unanswered, for another worker.
    Requeue,
    /// The plugin asked to run it again later (`retry`): publish it again, due at `eta`,
    /// confirmed; report RETRY with `result`; then ack the original without answering it.
    Retry {
        eta: SystemTime,
        result: Value,
        traceback: Option<String>,
    },
}

/// Decides how a task that ran ends on the wire (the table test covers every kind). Pure: a
/// cancel's cause says whether a revoke stopped it, `stopping` whether this worker is
/// shutting down.
pub fn settlement_of(outcome: Outcome, stopping: bool) -> Settlement {
    let answer = |status, result, traceback, reject| Settlement::Answer {
        status,
        result,
        traceback,
        reject,
    };
    let f = match outcome {
        Outcome::Success(value) => return answer(state::SUCCESS, value, None, false),
        Outcome::Failure(f) => f,
    };
    match f.kind {
        FailureKind::Cancelled(cause) if cause.revoke_word().is_some() => {
            let result = celery::revoked_result(cause.revoke_word().unwrap_or_default());
            answer(state::REVOKED, result, None, false)
        }
        FailureKind::ShuttingDown => Settlement::Requeue,
        FailureKind::PluginUnavailable
        | FailureKind::PluginCrashed
        | FailureKind::Interrupted
        | FailureKind::Rejected
            if stopping =>
        {
            Settlement::Requeue
        }
        FailureKind::NotRegistered => {
            answer(state::FAILURE, celery::failure_result(&f), None, true)
        }
        _ => {
            let result = celery::failure_result(&f);
            answer(state::FAILURE, result, f.traceback, false)
        }
    }
}

/// The facts about a delivery that decide what happens to it before it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrived {
    /// Its final state was confirmed already (the id is remembered as answered).
    pub answered: bool,
    /// Another delivery of the same id owns it (running or being answered).
    pub owned: bool,
    /// This worker is stopping.
    pub stopping: bool,
    /// Its eta is still in the future.
    pub eta_ahead: bool,
    pub revoked: bool,
    pub expired: bool,
    /// RabbitMQ's redelivered flag: informational, it decides nothing (a first delivery can be
    /// a duplicate and a redelivery can be the only copy).
    pub redelivered: bool,
}

/// What a delivery does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Ack it without running or publishing: its result is already confirmed.
    AckAnswered,
    /// Hand it to the owner of its id, which acks it with its own message.
    Attach,
    /// Give it back to the queue, unanswered, for another worker.
    Requeue,
    /// Keep it unacked until its eta, then decide again.
    Hold,
    /// Own it and answer REVOKED with this reason without running it.
    Revoke(&'static str),
    /// Own it and run it.
    Run,
}

/// Decides what a delivery does next. Pure; `handle` follows it, and the table test below
/// covers every combination.
pub fn admit(a: Arrived) -> Admission {
    if a.answered {
        Admission::AckAnswered
    } else if a.owned {
        Admission::Attach
    } else if a.stopping {
        Admission::Requeue
    } else if a.eta_ahead && !a.revoked {
        Admission::Hold
    } else if a.revoked {
        Admission::Revoke("revoked")
    } else if a.expired {
        Admission::Revoke("expired")
    } else {
        Admission::Run
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Failure;
    use serde_json::json;

    fn failure(kind: FailureKind) -> Outcome {
        Outcome::Failure(Failure::new(kind, "T", "m", "why"))
    }

    /// Every combination of the facts a delivery arrives with.
    #[test]
    fn what_each_delivery_does_before_it_runs() {
        for bits in 0u8..128 {
            let b = |i: u8| bits & (1 << i) != 0;
            let a = Arrived {
                answered: b(0),
                owned: b(1),
                stopping: b(2),
                eta_ahead: b(3),
                revoked: b(4),
                expired: b(5),
                redelivered: b(6),
            };
            let want = if a.answered {
                Admission::AckAnswered
            } else if a.owned {
                Admission::Attach
            } else if a.stopping {
                Admission::Requeue
            } else if a.revoked {
                Admission::Revoke("revoked")
            } else if a.eta_ahead {
                Admission::Hold
            } else if a.expired {
                Admission::Revoke("expired")
            } else {
                Admission::Run
            };
            assert_eq!(admit(a), want, "{a:?}");
            let flipped = Arrived {
                redelivered: !a.redelivered,
                ..a
            };
            assert_eq!(admit(flipped), want, "redelivered decides nothing: {a:?}");
        }
    }

    /// Every outcome kind, each cause of a cancel, stopping or not.
    #[test]
    fn how_each_outcome_ends_on_the_wire() {
        use crate::task::CancelCause;
        use FailureKind::*;
        let kinds = [
            Raised { retryable: false },
            Cancelled(CancelCause::Requested),
            Cancelled(CancelCause::Revoked),
            Cancelled(CancelCause::Terminated),
            Cancelled(CancelCause::SoftTimeLimit),
            Cancelled(CancelCause::ByPlugin),
            SoftTimeLimit,
            HardTimeLimit,
            PluginCrashed,
            Interrupted,
            Rejected,
            NotRegistered,
            PluginUnavailable,
            QueueFull,
            ShuttingDown,
        ];
        for kind in kinds {
            for stopping in [false, true] {
                let got = settlement_of(failure(kind), stopping);
                let want = match (kind, stopping) {
                    (Cancelled(CancelCause::Revoked), _) => Some((state::REVOKED, "revoked")),
                    (Cancelled(CancelCause::Terminated), _) => Some((state::REVOKED, "terminated")),
                    (ShuttingDown, _) => None,
                    (PluginUnavailable | PluginCrashed | Interrupted | Rejected, true) => None,
                    _ => Some((state::FAILURE, "")),
                };
                match (&got, want) {
                    (Settlement::Requeue, None) => {}
                    (
                        Settlement::Answer {
                            status,
                            reject,
                            result,
                            ..
                        },
                        Some((want, word)),
                    ) => {
                        assert_eq!(*status, want, "{kind:?} {stopping}");
                        assert_eq!(*reject, kind == NotRegistered, "{kind:?}");
                        if want == state::REVOKED {
                            assert_eq!(*result, celery::revoked_result(word), "{kind:?}");
                        }
                    }
                    _ => panic!("{kind:?} {stopping}: got {got:?}"),
                }
            }
        }
        for stopping in [false, true] {
            assert_eq!(
                settlement_of(Outcome::Success(json!(1)), stopping),
                Settlement::Answer {
                    status: state::SUCCESS,
                    result: json!(1),
                    traceback: None,
                    reject: false
                }
            );
        }
    }
}
