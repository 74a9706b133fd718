//! One task message from arrival to ack: decode, dedupe through the [`Ledger`](super::ledger),
//! hold until its eta, run it through the dispatcher, publish its final state, then ack (or
//! requeue) the message and every redelivered copy of it.

use super::girder_job::{self, TaskJob};
use super::ledger::Arrival;
use super::rules::{admit, settlement_of, Admission, Arrived, Settlement};
use super::transport::{Delivered, Returns};
use super::worker::{Transport, Worker};
use super::{announce, retry, workflow, ActiveInfo};
use crate::dispatch::TaskUpdate;
use crate::metrics::Settled;
use crate::source::celery::{self, state, CeleryTask};
use crate::source::pidbox::RemoteWorker;
use crate::task::{FailureKind, Outcome, TaskEvent};
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// A task message as its transport read it: the task, what `inspect active` shows of it, how
/// to settle it and the message itself (to publish again).
pub(crate) struct Received<T: Transport> {
    pub(crate) task: CeleryTask,
    /// Shared with the ledger (what `inspect active` lists) rather than copied.
    pub(crate) info: Arc<ActiveInfo>,
    pub(crate) ack: T::Ack,
    pub(crate) raw: T::Raw,
    /// The broker says it delivered this message before.
    pub(crate) redelivered: bool,
}

/// Handles one task message to its end. `lost` fires when the connection it came on is gone.
pub(crate) async fn handle<T: Transport>(
    shared: Arc<Worker<T>>,
    queue: Arc<str>,
    received: Received<T>,
    lost: CancellationToken,
) {
    let Received {
        task,
        info,
        ack: acker,
        raw,
        redelivered,
    } = received;
    // An eta task is offered to the broker's delay queues once.
    let mut parking_tried = false;
    let admission = loop {
        let admission = admit(arrived(&shared, &task, redelivered));
        if admission != Admission::Hold {
            break admission;
        }
        if !std::mem::replace(&mut parking_tried, true)
            && T::park(&shared, &queue, &task, &raw, &acker).await
        {
            return;
        }
        if !hold_until_eta(&shared, &task, &info, &acker, &lost).await {
            return;
        }
    };
    let settlement = match admission {
        Admission::Requeue => return shared.reject(&acker, Settled::Requeued).await,
        Admission::Hold => unreachable!("held above"),
        Admission::AckAnswered | Admission::Attach | Admission::Revoke(_) | Admission::Run => {
            // Claimed atomically: the facts may have changed since they were read.
            let arrival =
                shared
                    .engine
                    .tasks()
                    .ledger
                    .arrive(&task.id, info.clone(), acker.clone());
            match arrival {
                Arrival::Owner => {}
                Arrival::Attached => {
                    tracing::info!(task_id = %task.id, "redelivered task is still running or being answered here; this copy is acked with it");
                    return;
                }
                Arrival::Answered(copy) => return ack_answered_copy(&shared, &task, &copy).await,
            }
            match admission {
                Admission::Revoke(reason) => {
                    tracing::info!(task_id = %task.id, task = %task.name, "task {reason} before it could start");
                    announce::revoked(&shared, &task, reason);
                    girder_job::cancel_before_start(&shared, &task).await;
                    revoked_answer(reason)
                }
                _ if !rate_allows(&shared, &task).await => Settlement::Requeue,
                // Revoked while its rate held it.
                _ if shared.is_revoked(&task.id) => {
                    announce::revoked(&shared, &task, "revoked");
                    girder_job::cancel_before_start(&shared, &task).await;
                    revoked_answer("revoked")
                }
                _ => {
                    announce::start(&shared, &task);
                    let began = std::time::Instant::now();
                    let settlement = run_and_settle(&shared, &task, &info).await;
                    let settlement = workflow::carry_on(&shared, &task, settlement).await;
                    announce::end(&shared, &task, &settlement, began.elapsed());
                    settlement
                }
            }
        }
    };
    finish(&shared, &task, &acker, &raw, settlement).await;
}

/// Waits until `task`'s rate limit (`celery control rate_limit`) lets it start, the message
/// unacked meanwhile. False if the worker began stopping first (the task goes back).
async fn rate_allows<T: Transport>(shared: &Worker<T>, task: &CeleryTask) -> bool {
    let at = shared.engine.controls.start_at(&task.name);
    if at <= tokio::time::Instant::now() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(at) => true,
        _ = shared.engine.stopping.cancelled() => false,
    }
}

/// The facts about `task` now.
fn arrived<T: Transport>(shared: &Worker<T>, task: &CeleryTask, redelivered: bool) -> Arrived {
    let now = SystemTime::now();
    let mut tasks = shared.engine.tasks();
    Arrived {
        answered: tasks.ledger.is_answered(&task.id),
        owned: tasks.ledger.owns(&task.id),
        stopping: shared.engine.stopping.is_cancelled(),
        eta_ahead: task.eta.is_some_and(|eta| eta > now),
        revoked: tasks.revoked.contains(&task.id),
        expired: task.expires.is_some_and(|t| t <= now),
        redelivered,
    }
}

/// Runs an owned task and decides how it ends on the wire; a Girder job it names is kept up
/// to date meanwhile and given its final status before the result is sent.
async fn run_and_settle<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    info: &ActiveInfo,
) -> Settlement {
    let job = TaskJob::start(shared, task);
    let outcome = run(shared, task, info, &job).await;
    let failure = match &outcome {
        Outcome::Failure(f) => {
            match f.kind {
                FailureKind::NotRegistered => {
                    tracing::error!(task_id = %task.id, task = %task.name, "received a task no plugin serves; answering NotRegistered and rejecting it")
                }
                _ => tracing::info!(task_id = %task.id, task = %task.name, "task failed: {f}"),
            }
            Some(f.clone())
        }
        Outcome::Success(_) => None,
    };
    let settlement = match &outcome {
        // A revoked task is not run again, whatever its plugin asked.
        Outcome::Failure(f)
            if f.kind == FailureKind::RetryRequested && !shared.is_revoked(&task.id) =>
        {
            retry::plan(task, f, SystemTime::now())
        }
        _ => settlement_of(outcome, shared.engine.stopping.is_cancelled()),
    };
    job.end(&settlement, failure).await;
    settlement
}

fn revoked_answer(reason: &'static str) -> Settlement {
    Settlement::Answer {
        status: state::REVOKED,
        result: celery::revoked_result(reason),
        traceback: None,
        reject: false,
    }
}

async fn ack_answered_copy<T: Transport>(shared: &Worker<T>, task: &CeleryTask, acker: &T::Ack) {
    tracing::info!(task_id = %task.id, "redelivered copy of a task already answered; acking it without publishing again");
    shared.ack(acker).await;
}

/// Holds an eta task unacked until it is due; revocations and stops wake it early. False if
/// the message is gone (connection lost) or was given back (stopping).
async fn hold_until_eta<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    info: &Arc<ActiveInfo>,
    acker: &T::Ack,
    lost: &CancellationToken,
) -> bool {
    let eta = task.eta.unwrap_or_else(SystemTime::now);
    shared
        .engine
        .tasks()
        .reserved
        .insert(task.id.clone(), info.clone());
    let wait = eta.duration_since(SystemTime::now()).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + wait;
    let released = loop {
        let woken = shared.engine.revoke_signal.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break None,
            _ = lost.cancelled() => break Some(false),
            _ = woken => {
                if shared.engine.stopping.is_cancelled() { break Some(true) }
                if shared.is_revoked(&task.id) { break None }
            }
        }
    };
    shared.engine.tasks().reserved.remove(task.id.as_str());
    match released {
        // Connection lost: the broker already took the message back.
        Some(false) => false,
        // Stopping: give it back for another worker.
        Some(true) => {
            shared.reject(acker, Settled::Requeued).await;
            false
        }
        None => true,
    }
}

/// Runs the task through the dispatcher, publishing its progress and streamed items as they
/// come and feeding its Girder `job`, and returns its outcome. When Girder sets the job
/// CANCELING, the task is revoked.
async fn run<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    info: &ActiveInfo,
    job: &TaskJob,
) -> Outcome {
    let controlled = shared.engine.controls.time_limits(&task.name);
    let mut request = super::request::task_request(task, info, T::NAME, controlled);
    request.capture_log = job.wants_log();
    let reporting = !task.ignore_result;
    let mut run = shared.engine.dispatcher.submit(request);
    let mut revoked = false;
    loop {
        let update = tokio::select! {
            update = run.next() => update,
            _ = job.canceling.cancelled(), if !revoked => {
                revoked = true;
                shared.revoke(&[task.id.to_string()], false).await;
                continue;
            }
        };
        match update {
            Some(TaskUpdate::Event(TaskEvent::Retrying { reason, .. })) => {
                announce::rerun(shared, task, &reason)
            }
            Some(TaskUpdate::Event(ev)) => {
                job.feed(&ev);
                if reporting && !matches!(ev, TaskEvent::Log { .. }) {
                    publish_event(shared, task, ev).await
                }
            }
            Some(TaskUpdate::Done(outcome)) => return outcome,
            None => unreachable!("a task run ends with Done"),
        }
    }
}

/// The owner's duty: publish the final state and only once it is confirmed, remember the id
/// as answered and ack the message and its copies; or give them all back to the queue.
async fn finish<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    acker: &T::Ack,
    raw: &T::Raw,
    settlement: Settlement,
) {
    let (status, result, traceback, reject_it) = match settlement {
        Settlement::Retry {
            eta,
            result,
            traceback,
        } => return retry::later(shared, task, acker, raw, (eta, result, traceback)).await,
        Settlement::Requeue => {
            tracing::info!(task_id = %task.id, "worker stopping: returning the task to the queue");
            let copies = shared.engine.tasks().ledger.release(&task.id);
            for a in std::iter::once(acker).chain(&copies) {
                shared.reject(a, Settled::Requeued).await;
            }
            return;
        }
        Settlement::Answer {
            status,
            result,
            traceback,
            reject,
        } => (status, result, traceback, reject),
    };
    let result_for_chord = match task.embed.chord {
        Some(_) => result.clone(),
        None => Value::Null,
    };
    let mut returned = None;
    if !task.ignore_result {
        let body = celery::result_body(&task.id, status, result, traceback.as_deref());
        let delivered = shared
            .deliver_final(
                &task.id,
                task.reply_to.as_deref(),
                &task.correlation_id,
                &body,
                Returns::Report,
            )
            .await;
        match delivered {
            Delivered::GaveUp => {
                tracing::warn!(task_id = %task.id, "gave up publishing the result at shutdown; the message is left unacked for redelivery");
                shared.engine.tasks().ledger.release(&task.id);
                return;
            }
            Delivered::Returned => returned = Some(body),
            _ => {}
        }
        workflow::chord_part(shared, task, status, &result_for_chord).await;
    }
    settle_answered(shared, task, acker, reject_it).await;
    // Its reply queue did not exist: the message is settled above, so it holds no prefetch
    // slot, and the result alone is retried, within a bound, while its client may return.
    if let Some(body) = returned {
        retry_returned(shared, task, &body).await;
    }
}

/// Retries a result whose reply queue does not exist, for `result_retry_timeout`, if fewer
/// than `MAX_RETURNED_RESULTS` already wait; otherwise it is dropped at once, logged.
async fn retry_returned<T: Transport>(shared: &Worker<T>, task: &CeleryTask, body: &[u8]) {
    let Ok(_slot) = shared.returned_results.try_acquire() else {
        tracing::error!(task_id = %task.id, reply_to = task.reply_to.as_deref().unwrap_or_default(), "result undeliverable: its reply queue does not exist and {} results already wait for theirs", super::worker::MAX_RETURNED_RESULTS);
        return;
    };
    let reply_to = task.reply_to.as_deref().unwrap_or_default();
    T::reply(
        shared,
        &task.id,
        (reply_to, &task.correlation_id),
        body,
        Returns::Retry,
    )
    .await;
}

/// Acks (or, for a task nobody serves, rejects) the owner's message and every copy, and
/// remembers the id as answered.
async fn settle_answered<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    acker: &T::Ack,
    reject_it: bool,
) {
    let copies = shared.engine.tasks().ledger.answered(&task.id);
    for a in std::iter::once(acker).chain(&copies) {
        if reject_it {
            // Nobody serves it: a dead-letter exchange on the queue, if any, receives it.
            shared.reject(a, Settled::DeadLettered).await;
        } else {
            shared.ack(a).await;
        }
    }
    shared.engine.count_answered(&task.name);
}

/// Progress and streamed items become custom-state messages, in order, before the final state.
async fn publish_event<T: Transport>(shared: &Worker<T>, task: &CeleryTask, ev: TaskEvent) {
    let Some((status, meta)) = celery::event_state(ev) else {
        return;
    };
    let body = celery::result_body(&task.id, status, meta, None);
    let reply_to = task.reply_to.as_deref();
    shared
        .deliver_event(&task.id, reply_to, &task.correlation_id, &body)
        .await;
}
