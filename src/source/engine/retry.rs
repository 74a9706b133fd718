//! A plugin's retry answer (protocol 1.4, error `-32004`) for a Celery task, as Celery's
//! `Task.retry` does it: the same task published again (same id, `retries` + 1, its eta) to
//! where it came from, confirmed before the original is acked; `RETRY` with the exception to
//! the result backend; `task-retried` for monitors. Past `max_retries`, FAILURE with the
//! exception (`MaxRetriesExceededError` without one).

use super::announce;
use super::rules::Settlement;
use super::transport::Published;
use super::worker::{Transport, Worker};
use crate::metrics::Settled;
use crate::source::celery::{self, state, CeleryTask};
use crate::task::{Failure, MAX_DURATION_SECS};
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// Celery's `default_retry_delay`: seconds before a retry that names no time.
pub const DEFAULT_COUNTDOWN: f64 = 180.0;
/// Celery's default `max_retries`.
pub const DEFAULT_MAX_RETRIES: u64 = 3;

/// How a retry answer ends on the wire. Pure: `now` is the time it was answered.
pub fn plan(task: &CeleryTask, f: &Failure, now: SystemTime) -> Settlement {
    let retry = f
        .retry
        .as_deref()
        .cloned()
        .unwrap_or(plugin_protocol::TaskRetryData {
            countdown: None,
            eta: None,
            max_retries: None,
            exc: None,
        });
    let max = retry.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    let exc = retry.exc.is_some();
    if task.retries >= max {
        let (result, traceback) = match exc {
            true => (celery::failure_result(f), f.traceback.clone()),
            false => (celery::max_retries_exceeded(task), None),
        };
        return failed(result, traceback);
    }
    let eta = match (retry.countdown, retry.eta.as_deref()) {
        (Some(secs), _) => match secs.is_finite() && secs >= 0.0 {
            true => now + Duration::from_secs_f64(secs.min(MAX_DURATION_SECS)),
            false => {
                return invalid(format!(
                    "countdown {secs} is not a number of seconds from 0"
                ))
            }
        },
        (None, Some(eta)) => match chrono::DateTime::parse_from_rfc3339(eta) {
            Ok(t) => SystemTime::from(t),
            Err(e) => return invalid(format!("eta {eta:?} is not an ISO 8601 time ({e})")),
        },
        (None, None) => now + Duration::from_secs_f64(DEFAULT_COUNTDOWN),
    };
    let result = match exc {
        true => celery::failure_result(f),
        false => celery::retry_exception(),
    };
    Settlement::Retry {
        eta,
        result,
        traceback: f.traceback.clone(),
    }
}

fn failed(result: Value, traceback: Option<String>) -> Settlement {
    Settlement::Answer {
        status: state::FAILURE,
        result,
        traceback,
        reject: false,
    }
}

fn invalid(why: String) -> Settlement {
    let message = format!("the plugin asked for a retry the worker cannot follow: {why}");
    failed(celery::exception("ValueError", &message, "builtins"), None)
}

/// A retry: ownership released first (so the copy, should it come back here at once, runs
/// rather than joining this one), published again, RETRY reported, then the original and its
/// copies acked. If it cannot be published the message goes back to its queue as it was.
pub(crate) async fn later<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    acker: &T::Ack,
    raw: &T::Raw,
    (eta, result, traceback): (SystemTime, Value, Option<String>),
) {
    let copies = shared.engine.tasks().ledger.release(&task.id);
    let settled = match publish_again(shared, task, raw, eta).await {
        true => Settled::Acked,
        false => Settled::Requeued,
    };
    if settled == Settled::Acked {
        announce::retried(shared, task, &result, traceback.as_deref());
        if !task.ignore_result {
            let body = celery::result_body(&task.id, state::RETRY, result, traceback.as_deref());
            shared
                .deliver_event(
                    &task.id,
                    task.reply_to.as_deref(),
                    &task.correlation_id,
                    &body,
                )
                .await;
        }
    }
    for a in std::iter::once(acker).chain(&copies) {
        match settled {
            Settled::Acked => shared.ack(a).await,
            _ => shared.reject(a, Settled::Requeued).await,
        }
    }
}

/// Publishes `raw` again, due at `eta`, as its next retry, to where it came from; true once
/// the broker confirmed it.
async fn publish_again<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    raw: &T::Raw,
    eta: SystemTime,
) -> bool {
    let when = chrono::DateTime::<chrono::Utc>::from(eta)
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let retries = task.retries + 1;
    match T::publish_retry(shared, task, raw, retries, &when).await {
        Published::Confirmed => {
            tracing::info!(task_id = %task.id, task = %task.name, retries, eta = %when, "the plugin asked for a retry: published again");
            true
        }
        Published::Refused(why) => {
            tracing::error!(task_id = %task.id, "cannot publish the task's retry ({why}); it goes back to its queue as it was");
            false
        }
        Published::Stopped => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::FailureKind;
    use plugin_protocol::{TaskErrorData, TaskRetryData};
    use serde_json::json;

    fn task(retries: u64) -> CeleryTask {
        CeleryTask {
            id: "t1".into(),
            name: "fetch".into(),
            args: vec![json!(1)].into(),
            retries,
            ..CeleryTask::default()
        }
    }

    fn asked(retry: TaskRetryData) -> Failure {
        Failure {
            retry: Some(Box::new(retry)),
            ..Failure::new(
                FailureKind::RetryRequested,
                "ConnectionError",
                "builtins",
                "refused",
            )
        }
    }

    fn data(countdown: Option<f64>, max: Option<u64>, exc: bool) -> TaskRetryData {
        TaskRetryData {
            countdown,
            eta: None,
            max_retries: max,
            exc: exc.then(|| TaskErrorData {
                exc_type: "ConnectionError".into(),
                message: "refused".into(),
                module: Some("builtins".into()),
                traceback: None,
                retryable: true,
            }),
        }
    }

    #[test]
    fn below_max_retries_it_is_published_again_at_its_countdown() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let Settlement::Retry { eta, result, .. } =
            plan(&task(1), &asked(data(Some(5.0), Some(3), true)), now)
        else {
            panic!("a retry")
        };
        assert_eq!(eta, now + Duration::from_secs(5));
        assert_eq!(result["exc_type"], "ConnectionError");
        let Settlement::Retry { eta, .. } = plan(&task(0), &asked(data(None, None, false)), now)
        else {
            panic!("a retry")
        };
        assert_eq!(
            eta,
            now + Duration::from_secs(180),
            "Celery's default_retry_delay"
        );
    }

    #[test]
    fn at_max_retries_it_fails_with_its_exception_or_max_retries_exceeded() {
        let now = SystemTime::now();
        let Settlement::Answer { status, result, .. } =
            plan(&task(3), &asked(data(Some(1.0), None, true)), now)
        else {
            panic!("an answer")
        };
        assert_eq!(
            (status, result["exc_type"].as_str()),
            (state::FAILURE, Some("ConnectionError"))
        );
        let Settlement::Answer { result, .. } =
            plan(&task(2), &asked(data(Some(1.0), Some(2), false)), now)
        else {
            panic!("an answer")
        };
        assert_eq!(result["exc_type"], "MaxRetriesExceededError");
        assert_eq!(
            result["exc_message"][0],
            "Can't retry fetch[t1] args:(1) kwargs:{}"
        );
    }

    #[test]
    fn a_retry_it_cannot_follow_fails_naming_why() {
        let mut bad = data(None, None, false);
        bad.eta = Some("tomorrow".into());
        let Settlement::Answer { result, .. } = plan(&task(0), &asked(bad), SystemTime::now())
        else {
            panic!("an answer")
        };
        assert!(
            result["exc_message"][0]
                .as_str()
                .unwrap()
                .contains("eta \"tomorrow\""),
            "{result}"
        );
        let Settlement::Answer { .. } = plan(
            &task(0),
            &asked(data(Some(-1.0), None, false)),
            SystemTime::now(),
        ) else {
            panic!("an answer")
        };
    }
}
