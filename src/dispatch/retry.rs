//! Whether a failed attempt runs again: a pure rule, table-tested.

use crate::task::{Cancellation, Failure, FailureKind};

/// How often a task may be refused before reaching a process before that counts as an attempt.
pub(super) const MAX_REFUSALS: u32 = 20;

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Retry {
    End(Failure),
    Again { spends_attempt: bool },
}

/// Decides whether a failed attempt is run again. Pure. Only a crash of the plugin process
/// spends an attempt (up to `max_attempts`); a task refused before it reached a process, or
/// interrupted by the worker itself (a reload or uninstall stopping the instance), runs again
/// for free, at most `MAX_REFUSALS` times; when the whole worker is stopping, an interrupted
/// task ends (a broker source requeues it). A cancel requested meanwhile ends it.
pub(super) fn retry(
    failure: Failure,
    attempt: u32,
    max_attempts: u32,
    refusals: u32,
    accepting: bool,
    cancel: Option<Cancellation>,
) -> Retry {
    if !failure.is_retryable() {
        return Retry::End(failure);
    }
    if let Some(c) = cancel {
        return Retry::End(Failure::cancelled(c.cause, &c.reason));
    }
    match failure.kind {
        FailureKind::Interrupted if !accepting => return Retry::End(failure),
        FailureKind::Rejected | FailureKind::Interrupted if refusals < MAX_REFUSALS => {
            return Retry::Again {
                spends_attempt: false,
            }
        }
        _ => {}
    }
    if attempt >= max_attempts {
        let mut failure = failure;
        failure.message = format!(
            "{} (gave up after {attempt} attempt(s); `max_attempts` = {max_attempts})",
            failure.message
        );
        return Retry::End(failure);
    }
    Retry::Again {
        spends_attempt: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(kind: FailureKind) -> Failure {
        Failure::new(kind, "T", "m", "why")
    }

    #[test]
    fn which_failures_run_again_and_what_they_cost() {
        use FailureKind::*;
        let again = |spends_attempt| Retry::Again { spends_attempt };
        let ends = |r: &Retry| matches!(r, Retry::End(_));
        // (kind, attempt, max, refusals, accepting) -> expected
        assert_eq!(retry(f(PluginCrashed), 1, 3, 0, true, None), again(true));
        assert!(ends(&retry(f(PluginCrashed), 3, 3, 0, true, None)));
        assert_eq!(retry(f(Interrupted), 3, 3, 0, true, None), again(false));
        assert_eq!(retry(f(Rejected), 1, 1, 0, true, None), again(false));
        assert!(
            ends(&retry(f(Interrupted), 1, 3, 0, false, None)),
            "stopping"
        );
        assert_eq!(retry(f(Rejected), 1, 3, 0, false, None), again(false));
        assert_eq!(
            retry(f(Rejected), 1, 3, MAX_REFUSALS, true, None),
            again(true),
            "refusals are bounded"
        );
        for kind in [
            Raised { retryable: true },
            Cancelled(crate::task::CancelCause::Revoked),
            HardTimeLimit,
            NotRegistered,
            QueueFull,
            ShuttingDown,
            PluginUnavailable,
        ] {
            assert_eq!(
                retry(f(kind), 1, 3, 0, true, None),
                Retry::End(f(kind)),
                "{kind:?}"
            );
        }
        let stop = Cancellation::new(crate::task::CancelCause::Terminated, "stop");
        let Retry::End(c) = retry(f(PluginCrashed), 1, 3, 0, true, Some(stop)) else {
            panic!()
        };
        assert_eq!(c.kind, Cancelled(crate::task::CancelCause::Terminated));
        let Retry::End(gave_up) = retry(f(PluginCrashed), 2, 2, 0, true, None) else {
            panic!()
        };
        assert!(gave_up.message.contains("gave up after 2 attempt(s)"));
    }
}
