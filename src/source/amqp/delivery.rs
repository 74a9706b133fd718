//! One task message from arrival to ack: decode, dedupe through the [`Ledger`](super::ledger),
//! hold until its eta, run it through the dispatcher, publish its final state, then ack (or
//! requeue) the message and every redelivered copy of it.

use super::delayed;
use super::girder_job::{self, TaskJob};
use super::inbound::{self, Inbound};
use super::publish::Raw;
use super::publish::{Delivered, Published, Returns};
use super::retry;
use super::settle::{ack, reject};
use super::{monitor, workflow, SourceState};
use crate::dispatch::TaskUpdate;
use crate::metrics::Settled;
use crate::source::celery::{self, state, CeleryTask};
use crate::source::engine::ledger::Arrival;
use crate::source::engine::rules::{admit, settlement_of, Admission, Arrived, Settlement};
use crate::source::engine::ActiveInfo;
use crate::source::pidbox::RemoteWorker;
use crate::task::{FailureKind, Outcome, TaskEvent};
use lapin::message::Delivery;
use lapin::Acker;
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// Handles one task message to its end. `lost` fires when the connection it came on is gone.
pub(super) async fn handle(
    shared: Arc<SourceState>,
    queue: Arc<str>,
    delivery: Delivery,
    lost: CancellationToken,
) {
    let redelivered = delivery.redelivered;
    let Some((task, info, acker, raw)) = decode(&shared, &queue, delivery).await else {
        return;
    };
    // An eta task is offered to the broker's delay queues once.
    let mut parking_tried = false;
    let admission = loop {
        let admission = admit(arrived(&shared, &task, redelivered));
        if admission != Admission::Hold {
            break admission;
        }
        if !std::mem::replace(&mut parking_tried, true)
            && park(&shared, &queue, &task, &raw, &acker).await
        {
            return;
        }
        if !hold_until_eta(&shared, &task, &info, &acker, &lost).await {
            return;
        }
    };
    let settlement = match admission {
        Admission::Requeue => return reject(&shared, &acker, Settled::Requeued).await,
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
                    monitor::announce_revoked(&shared, &task, reason);
                    girder_job::cancel_before_start(&shared, &task).await;
                    revoked_answer(reason)
                }
                _ if !rate_allows(&shared, &task).await => Settlement::Requeue,
                // Revoked while its rate held it.
                _ if shared.is_revoked(&task.id) => {
                    monitor::announce_revoked(&shared, &task, "revoked");
                    girder_job::cancel_before_start(&shared, &task).await;
                    revoked_answer("revoked")
                }
                _ => {
                    monitor::announce_start(&shared, &task);
                    let began = std::time::Instant::now();
                    let settlement = run_and_settle(&shared, &task, &info).await;
                    let settlement = workflow::carry_on(&shared, &task, settlement).await;
                    monitor::announce_end(&shared, &task, &settlement, began.elapsed());
                    settlement
                }
            }
        }
    };
    finish(&shared, &task, &acker, &raw, settlement).await;
}

/// Waits until `task`'s rate limit (`celery control rate_limit`) lets it start, the message
/// unacked meanwhile. False if the worker began stopping first (the task goes back).
async fn rate_allows(shared: &SourceState, task: &CeleryTask) -> bool {
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
fn arrived(shared: &SourceState, task: &CeleryTask, redelivered: bool) -> Arrived {
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
async fn run_and_settle(shared: &SourceState, task: &CeleryTask, info: &ActiveInfo) -> Settlement {
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
    let revoked = shared.engine.tasks().ledger.revoked(&task.id);
    let settlement = match &outcome {
        Outcome::Failure(f) if f.kind == FailureKind::RetryRequested && revoked.is_none() => {
            retry::plan(task, f, SystemTime::now())
        }
        _ => settlement_of(outcome, revoked, shared.engine.stopping.is_cancelled()),
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

async fn ack_answered_copy(shared: &SourceState, task: &CeleryTask, acker: &Acker) {
    tracing::info!(task_id = %task.id, "redelivered copy of a task already answered; acking it without publishing again");
    ack(shared, acker).await;
}

/// Reads the Celery task out of a delivery; one that is unreadable or breaks a limit is
/// rejected without requeue (dead-lettered if the queue has a DLX), with one log line.
async fn decode(
    shared: &SourceState,
    queue: &str,
    delivery: Delivery,
) -> Option<(CeleryTask, ActiveInfo, Acker, Raw)> {
    let message = Inbound {
        queue,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        redelivered: delivery.redelivered,
        properties: &delivery.properties,
        body: &delivery.data,
    };
    let max = shared.options.max_message_size;
    match inbound::read(
        &message,
        max,
        &shared.engine.nodename(),
        monitor::now_epoch(),
    ) {
        Ok((task, info)) => {
            // Kept (moved, not copied) while the task is handled: it may be parked until its
            // eta, or published again for a retry, as it came.
            let raw = Raw {
                properties: delivery.properties,
                body: delivery.data,
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
            };
            Some((task, info, delivery.acker, raw))
        }
        Err(refusal) => {
            tracing::error!(
                queue = %delivery.routing_key,
                delivery_tag = delivery.delivery_tag,
                bytes = delivery.data.len(),
                "rejecting a task message (dead-lettered if the queue has a DLX): {refusal}"
            );
            reject(shared, &delivery.acker, Settled::Rejected).await;
            None
        }
    }
}

/// Parks an eta task a second or more away in the broker's delay topology (see `delayed`):
/// published again, confirmed, then the original acked. False if it is to be held here
/// instead (due within a second, no topology, a refusal); the message is still unacked then.
async fn park(
    shared: &SourceState,
    queue: &str,
    task: &CeleryTask,
    raw: &Raw,
    acker: &Acker,
) -> bool {
    let Some(eta) = task.eta else { return false };
    let remaining = eta.duration_since(SystemTime::now()).unwrap_or_default();
    let Some(secs) = delayed::park_for(remaining) else {
        return false;
    };
    if !shared.parking.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let spec = shared
        .queues
        .borrow()
        .iter()
        .find(|q| q.name == queue)
        .cloned();
    let Some(key) = spec.and_then(|q| delayed::routing_key(secs, &q.routing_key)) else {
        return false;
    };
    let props = raw.properties.clone().with_delivery_mode(2);
    let published = shared
        .publish_confirmed(
            &task.id,
            delayed::ENTRY.into(),
            key.as_str().into(),
            props,
            &raw.body,
        )
        .await;
    match published {
        Published::Confirmed => {
            tracing::debug!(task_id = %task.id, "eta {secs} s away: parked in the broker's delay queues");
            ack(shared, acker).await;
            true
        }
        Published::Refused(why) => {
            tracing::warn!(task_id = %task.id, "cannot park an eta task in the delay queues ({why}); holding it here");
            false
        }
        Published::Stopped => false,
    }
}

/// Holds an eta task unacked until it is due; revocations and stops wake it early. False if
/// the message is gone (connection lost) or was given back (stopping).
async fn hold_until_eta(
    shared: &SourceState,
    task: &CeleryTask,
    info: &ActiveInfo,
    acker: &Acker,
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
    shared.engine.tasks().reserved.remove(&task.id);
    match released {
        // Connection lost: the broker already took the message back.
        Some(false) => false,
        // Stopping: give it back for another worker.
        Some(true) => {
            reject(shared, acker, Settled::Requeued).await;
            false
        }
        None => true,
    }
}

/// Runs the task through the dispatcher, publishing its progress and streamed items as they
/// come and feeding its Girder `job`, and returns its outcome. When Girder sets the job
/// CANCELING, the task is revoked.
async fn run(shared: &SourceState, task: &CeleryTask, info: &ActiveInfo, job: &TaskJob) -> Outcome {
    let controlled = shared.engine.controls.time_limits(&task.name);
    let mut request = inbound::task_request(task, info, controlled);
    request.capture_log = job.wants_log();
    let reporting = !task.ignore_result;
    let mut run = shared.engine.dispatcher.submit(request);
    let mut revoked = false;
    loop {
        let update = tokio::select! {
            update = run.next() => update,
            _ = job.canceling.cancelled(), if !revoked => {
                revoked = true;
                shared.revoke(std::slice::from_ref(&task.id), false).await;
                continue;
            }
        };
        match update {
            Some(TaskUpdate::Event(TaskEvent::Retrying { reason, .. })) => {
                monitor::announce_rerun(shared, task, &reason)
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
async fn finish(
    shared: &SourceState,
    task: &CeleryTask,
    acker: &Acker,
    raw: &Raw,
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
                reject(shared, a, Settled::Requeued).await;
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
async fn retry_returned(shared: &SourceState, task: &CeleryTask, body: &[u8]) {
    let Ok(_slot) = shared.returned_results.try_acquire() else {
        tracing::error!(task_id = %task.id, reply_to = task.reply_to.as_deref().unwrap_or_default(), "result undeliverable: its reply queue does not exist and {} results already wait for theirs", super::MAX_RETURNED_RESULTS);
        return;
    };
    let reply_to = task.reply_to.as_deref().unwrap_or_default();
    shared
        .publish_final(
            &task.id,
            reply_to,
            &task.correlation_id,
            body,
            Returns::Retry,
        )
        .await;
}

/// Acks (or, for a task nobody serves, rejects) the owner's message and every copy, and
/// remembers the id as answered.
async fn settle_answered(shared: &SourceState, task: &CeleryTask, acker: &Acker, reject_it: bool) {
    let copies = shared.engine.tasks().ledger.answered(&task.id);
    for a in std::iter::once(acker).chain(&copies) {
        if reject_it {
            // Nobody serves it: a dead-letter exchange on the queue, if any, receives it.
            reject(shared, a, Settled::DeadLettered).await;
        } else {
            ack(shared, a).await;
        }
    }
    shared.engine.count_answered(&task.name);
}

/// Progress and streamed items become custom-state messages, in order, before the final state.
async fn publish_event(shared: &SourceState, task: &CeleryTask, ev: TaskEvent) {
    let Some((status, meta)) = celery::event_state(ev) else {
        return;
    };
    let body = celery::result_body(&task.id, status, meta, None);
    let reply_to = task.reply_to.as_deref();
    shared
        .deliver_event(&task.id, reply_to, &task.correlation_id, &body)
        .await;
}
