//! Result backends (protocol 1.5): each final state is stored by every result backend whose
//! `tasks` name the task, before the dispatcher hands the outcome to the task's source, so a
//! source answers or acks only what is stored. A store that fails is retried with backoff
//! while the task waits; it is counted, logged, and shown in the plugin's status.

use crate::supervisor::backend_stats::BackendCounters;
use crate::supervisor::instance::Job;
use crate::supervisor::Supervisor;
use crate::task::{Failure, Outcome, TaskRequest};
use plugin_protocol::{FinalState, ResultStoreParams, TaskFailure};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// How long one `result.store` may take when the backend's manifest sets no `task_hard`.
const STORE_TIME_LIMIT: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// A task's end as the stores see it.
pub struct Ended<'a> {
    pub request: &'a TaskRequest,
    pub outcome: &'a Outcome,
    pub attempts: u32,
    /// From its admission to its end (monotonic): `started` is told as the end less this, so
    /// the running task costs no wall-clock read.
    pub runtime: Duration,
    /// The worker is stopping: what a stop interrupted is not a final state.
    pub stopping: bool,
}

/// Stores `ended` in every result backend for its task; returns once all have it.
pub async fn store(supervisor: &Supervisor, ended: Ended<'_>) {
    if !is_final(ended.outcome, ended.stopping) {
        return;
    }
    let sinks = supervisor.result_backends(&ended.request.name);
    if sinks.is_empty() {
        return;
    }
    let params = Arc::new(store_params(&ended));
    // In turn: usually there is one, and each must have it before the task counts as done.
    for sink in &sinks {
        // Boxed: every task's future would otherwise hold room for this rare wait.
        Box::pin(store_in(supervisor, sink, params.clone())).await;
    }
}

/// Whether `outcome` is a final state (a task put back in its queue is not, nor a retry).
pub fn is_final(outcome: &Outcome, stopping: bool) -> bool {
    match outcome {
        Outcome::Success(_) => true,
        Outcome::Failure(f) => {
            f.kind != crate::task::FailureKind::RetryRequested && !f.belongs_back(stopping)
        }
    }
}

/// Stores `params` in the backend named `sink`, retrying with backoff until it answers.
async fn store_in(supervisor: &Supervisor, sink: &str, params: Arc<ResultStoreParams>) {
    let counters = supervisor.backend_stats().of(sink);
    BackendCounters::add(&counters.results_pending);
    let mut delay = FIRST_RETRY;
    loop {
        // Looked up on every try: a reload may have replaced the backend meanwhile.
        let Some(pool) = supervisor.plugin(sink) else {
            tracing::error!(plugin = sink, task_id = %params.task_id, "result backend `{sink}` was removed before it stored task {}'s result; not stored", params.task_id);
            break;
        };
        let failure = match store_once(&pool, &params).await {
            Outcome::Success(_) => {
                BackendCounters::add(&counters.results_stored);
                break;
            }
            Outcome::Failure(f) => f,
        };
        BackendCounters::add(&counters.result_store_failures);
        tracing::warn!(plugin = sink, task_id = %params.task_id, "result backend `{sink}` did not store task {}'s result ({failure}); trying again in {delay:?}, the task waits", params.task_id);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LAST_RETRY);
    }
    BackendCounters::sub(&counters.results_pending);
}

/// One `result.store` on the backend's pool.
async fn store_once(
    pool: &crate::supervisor::pool::PoolHandle,
    params: &Arc<ResultStoreParams>,
) -> Outcome {
    let mut request = TaskRequest::new(
        plugin_protocol::method::RESULT_STORE,
        vec![],
        Default::default(),
    );
    request.id = format!("result.store:{}", params.task_id).into();
    request.submitter = "result backend".into();
    request.hard_time_limit = Some(
        pool.manifest()
            .timeouts
            .task_hard
            .unwrap_or(STORE_TIME_LIMIT),
    );
    let (events, _) = mpsc::channel(1);
    let (reply, outcome) = oneshot::channel();
    let job = Job {
        request: Arc::new(request),
        attempt: 1,
        events,
        reply,
        store: Some(params.clone()),
    };
    pool.run(job).await;
    outcome.await.unwrap_or_else(|_| {
        Outcome::Failure(Failure::crashed("the result backend dropped the request"))
    })
}

fn store_params(ended: &Ended) -> ResultStoreParams {
    let (state, result, error) = final_state(ended.outcome);
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let finished = SystemTime::now();
    ResultStoreParams {
        task_id: ended.request.id.to_string(),
        task: ended.request.name.clone(),
        state,
        result,
        error,
        args: ended.request.args.to_vec(),
        kwargs: (*ended.request.kwargs).clone(),
        submitter: ended.request.submitter.clone(),
        attempts: ended.attempts,
        started: secs(finished.checked_sub(ended.runtime).unwrap_or(finished)),
        finished: secs(finished),
    }
}

/// An outcome as a final state: `SUCCESS` with the result, or `FAILURE` with the error.
pub fn final_state(
    outcome: &Outcome,
) -> (FinalState, Option<serde_json::Value>, Option<TaskFailure>) {
    match outcome {
        Outcome::Success(value) => (FinalState::Success, Some(value.clone()), None),
        Outcome::Failure(f) => {
            let kind = outcome.kind();
            (FinalState::Failure, None, Some(task_failure(kind, f)))
        }
    }
}

fn task_failure(kind: &str, f: &Failure) -> TaskFailure {
    TaskFailure {
        kind: kind.to_string(),
        exc_type: f.exc_type.clone(),
        module: f.module.clone(),
        message: f.message.clone(),
        traceback: f.traceback.clone(),
    }
}
