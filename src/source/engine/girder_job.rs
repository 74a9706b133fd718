//! The Girder job a task message names (its `jobInfoSpec` header), followed while the task is
//! handled here: started with the task, fed its log lines and progress, ended with the status
//! its settlement means, before the result is sent. The contract itself is
//! `crate::source::girder`.

use super::rules::Settlement;
use super::worker::{Transport, Worker};
use crate::source::celery::{state, CeleryTask};
use crate::source::girder::{reporter::Reporter, JobEnd};
use crate::task::{Failure, TaskEvent};
use tokio_util::sync::CancellationToken;

/// A task's Girder job, if it has one the worker may follow.
pub(crate) struct TaskJob {
    reporter: Option<Reporter>,
    log_print: bool,
    /// Fires when Girder says the job is CANCELING.
    pub(crate) canceling: CancellationToken,
}

impl TaskJob {
    /// Starts following `task`'s job (RUNNING), if it names one `girder_job_urls` allows.
    pub(crate) fn start<T: Transport>(shared: &Worker<T>, task: &CeleryTask) -> TaskJob {
        let canceling = CancellationToken::new();
        let spec = shared.girder.job_of(&task.id, &task.headers);
        let log_print = spec.as_ref().is_some_and(|s| s.log_print);
        let reporter = spec.map(|s| shared.girder.start(s, &task.id, canceling.clone()));
        TaskJob {
            reporter,
            log_print,
            canceling,
        }
    }

    /// Whether the task's log lines are wanted (`logPrint`).
    pub(crate) fn wants_log(&self) -> bool {
        self.log_print
    }

    /// A task's log line or progress, for its job.
    pub(crate) fn feed(&self, ev: &TaskEvent) {
        let Some(job) = &self.reporter else { return };
        match ev {
            TaskEvent::Log { line } => job.log(line.clone()),
            TaskEvent::Progress {
                done,
                total,
                message,
            } => job.progress(*done, *total, message.clone()),
            TaskEvent::Stream { .. } | TaskEvent::Retrying { .. } => {}
        }
    }

    /// Gives the job the status `settlement` means (none when the task goes back to its
    /// queue: it runs again, and that run keeps the job).
    pub(crate) async fn end(self, settlement: &Settlement, failure: Option<Failure>) {
        if let Some((job, end)) = self.reporter.zip(job_end(settlement, failure)) {
            job.end(end).await;
        }
    }
}

fn job_end(settlement: &Settlement, failure: Option<Failure>) -> Option<JobEnd> {
    let Settlement::Answer { status, .. } = settlement else {
        return None;
    };
    Some(match (*status, failure) {
        (state::SUCCESS, _) => JobEnd::Succeeded,
        (state::REVOKED, _) => JobEnd::Canceled,
        (_, Some(f)) => JobEnd::Failed {
            exc_type: f.exc_type,
            message: f.message,
            traceback: f.traceback,
        },
        (_, None) => JobEnd::Canceled,
    })
}

/// Sets the Girder job of a task that will not run (revoked or expired first) to CANCELED.
pub(crate) async fn cancel_before_start<T: Transport>(shared: &Worker<T>, task: &CeleryTask) {
    if let Some(spec) = shared.girder.job_of(&task.id, &task.headers) {
        shared.girder.canceled_before_start(spec, &task.id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::FailureKind;
    use serde_json::Value;

    fn answer(status: &'static str) -> Settlement {
        Settlement::Answer {
            status,
            result: Value::Null,
            traceback: None,
            reject: false,
        }
    }

    #[test]
    fn each_settlement_ends_its_job_as_girder_worker_would() {
        let f = Failure::new(
            FailureKind::Raised { retryable: false },
            "ValueError",
            "builtins",
            "bad",
        );
        assert_eq!(
            job_end(&answer(state::SUCCESS), None),
            Some(JobEnd::Succeeded)
        );
        assert_eq!(
            job_end(&answer(state::REVOKED), None),
            Some(JobEnd::Canceled)
        );
        assert_eq!(
            job_end(&answer(state::FAILURE), Some(f)),
            Some(JobEnd::Failed {
                exc_type: "ValueError".into(),
                message: "bad".into(),
                traceback: None
            })
        );
        assert_eq!(job_end(&Settlement::Requeue, None), None);
    }
}
