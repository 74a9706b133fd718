//! One task message from arrival to ack: decode, dedupe through the [`Ledger`](super::ledger),
//! hold until its eta, run it through the dispatcher, publish its final state, then ack (or
//! requeue) the message and every redelivered copy of it.

use super::ledger::Arrival;
use super::publish::Delivered;
use super::value::table_to_json;
use super::{ActiveInfo, Shared};
use crate::dispatch::TaskUpdate;
use crate::source::celery::{self, state, CeleryTask, Envelope};
use crate::task::{FailureKind, Outcome, TaskEvent, TaskRequest};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Acker;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

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
}

/// Decides how a task that ran ends on the wire. Pure: `revoked` is the reason a revoke
/// stopped it, `stopping` whether this worker is shutting down.
pub fn settle(outcome: Outcome, revoked: Option<&'static str>, stopping: bool) -> Settlement {
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
    match (f.kind, revoked) {
        (FailureKind::Cancelled, Some(reason)) => {
            answer(state::REVOKED, celery::revoked_result(reason), None, false)
        }
        (FailureKind::ShuttingDown, _) => Settlement::Requeue,
        (
            FailureKind::PluginUnavailable
            | FailureKind::PluginCrashed
            | FailureKind::Interrupted
            | FailureKind::Rejected,
            _,
        ) if stopping => Settlement::Requeue,
        (FailureKind::NotRegistered, _) => {
            answer(state::FAILURE, celery::failure_result(&f), None, true)
        }
        _ => {
            let result = celery::failure_result(&f);
            answer(state::FAILURE, result, f.traceback, false)
        }
    }
}

/// Handles one task message to its end. `lost` fires when the connection it came on is gone.
pub(super) async fn handle(shared: Arc<Shared>, delivery: Delivery, lost: CancellationToken) {
    let Some((task, info, acker)) = decode(&shared, delivery).await else {
        return;
    };
    let submitter = format!(
        "amqp: queue {}",
        info.delivery_info["routing_key"]
            .as_str()
            .unwrap_or_default()
    );
    // A copy of an answered task needs no eta hold: ack it at once.
    let answered = shared.tasks().ledger.is_answered(&task.id);
    if answered {
        return ack_answered_copy(&task, &acker).await;
    }
    if task.eta.is_some_and(|eta| eta > SystemTime::now())
        && !hold_until_eta(&shared, &task, &info, &acker, &lost).await
    {
        return;
    }
    let arrival = shared.tasks().ledger.arrive(&task.id, info, acker.clone());
    match arrival {
        Arrival::Owner => {}
        Arrival::Attached => {
            tracing::info!(task_id = %task.id, "redelivered task is still running or being answered here; this copy is acked with it");
            return;
        }
        Arrival::Answered(copy) => return ack_answered_copy(&task, &copy).await,
    }
    let settlement = if shared.is_revoked(&task.id) {
        revoked_answer("revoked")
    } else if task.expires.is_some_and(|t| t <= SystemTime::now()) {
        tracing::info!(task_id = %task.id, task = %task.name, "task expired before it could start");
        revoked_answer("expired")
    } else {
        let outcome = run(&shared, &task, submitter).await;
        if let Outcome::Failure(f) = &outcome {
            match f.kind {
                FailureKind::NotRegistered => {
                    tracing::error!(task_id = %task.id, task = %task.name, "received a task no plugin serves; answering NotRegistered and rejecting it")
                }
                _ => tracing::info!(task_id = %task.id, task = %task.name, "task failed: {f}"),
            }
        }
        let revoked = shared.tasks().ledger.revoked(&task.id);
        settle(outcome, revoked, shared.stopping.is_cancelled())
    };
    finish(&shared, &task, &acker, settlement).await;
}

fn revoked_answer(reason: &'static str) -> Settlement {
    Settlement::Answer {
        status: state::REVOKED,
        result: celery::revoked_result(reason),
        traceback: None,
        reject: false,
    }
}

async fn ack_answered_copy(task: &CeleryTask, acker: &Acker) {
    tracing::info!(task_id = %task.id, "redelivered copy of a task already answered; acking it without publishing again");
    ack(acker).await;
}

/// Reads the Celery task out of a delivery; an unreadable one is rejected without requeue.
async fn decode(shared: &Shared, delivery: Delivery) -> Option<(CeleryTask, ActiveInfo, Acker)> {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| match table_to_json(h) {
            Value::Object(m) => m,
            _ => Map::new(),
        })
        .unwrap_or_default();
    let props = &delivery.properties;
    let env = Envelope {
        headers,
        body: &delivery.data,
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str()),
    };
    let task = match celery::decode(&env) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(
                queue = %delivery.routing_key,
                delivery_tag = delivery.delivery_tag,
                bytes = delivery.data.len(),
                "rejecting a message that is not a readable Celery task (dead-lettered if the queue has a DLX): {e}"
            );
            reject(&delivery.acker, false).await;
            return None;
        }
    };
    let info = ActiveInfo {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        type_: task.name.clone(),
        hostname: shared.nodename(),
        time_start: now_epoch(),
        acknowledged: false,
        delivery_info: json!({
            "exchange": delivery.exchange.as_str(),
            "routing_key": delivery.routing_key.as_str(),
            "priority": props.priority().unwrap_or(0),
            "redelivered": delivery.redelivered,
        }),
        worker_pid: std::process::id(),
    };
    Some((task, info, delivery.acker.clone()))
}

/// Holds an eta task unacked until it is due; revocations and stops wake it early. False if
/// the message is gone (connection lost) or was given back (stopping).
async fn hold_until_eta(
    shared: &Shared,
    task: &CeleryTask,
    info: &ActiveInfo,
    acker: &Acker,
    lost: &CancellationToken,
) -> bool {
    let eta = task.eta.unwrap_or_else(SystemTime::now);
    shared
        .tasks()
        .reserved
        .insert(task.id.clone(), info.clone());
    let wait = eta.duration_since(SystemTime::now()).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + wait;
    let released = loop {
        let woken = shared.revoke_signal.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break None,
            _ = lost.cancelled() => break Some(false),
            _ = woken => {
                if shared.stopping.is_cancelled() { break Some(true) }
                if shared.is_revoked(&task.id) { break None }
            }
        }
    };
    shared.tasks().reserved.remove(&task.id);
    match released {
        // Connection lost: the broker already took the message back.
        Some(false) => false,
        // Stopping: give it back for another worker.
        Some(true) => {
            reject(acker, true).await;
            false
        }
        None => true,
    }
}

/// Runs the task through the dispatcher, publishing its progress and streamed items as they
/// come, and returns its outcome.
async fn run(shared: &Shared, task: &CeleryTask, submitter: String) -> Outcome {
    let request = TaskRequest {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        soft_time_limit: task.soft_time_limit,
        hard_time_limit: task.hard_time_limit,
        submitter,
    };
    let reporting = task.reply_to.clone().filter(|_| !task.ignore_result);
    let mut run = shared.dispatcher.submit(request);
    loop {
        match run.next().await {
            Some(TaskUpdate::Event(ev)) => {
                publish_event(shared, task, reporting.as_deref(), ev).await
            }
            Some(TaskUpdate::Done(outcome)) => return outcome,
            None => unreachable!("a task run ends with Done"),
        }
    }
}

/// The owner's duty: publish the final state and only once it is confirmed, remember the id
/// as answered and ack the message and its copies; or give them all back to the queue.
async fn finish(shared: &Shared, task: &CeleryTask, acker: &Acker, settlement: Settlement) {
    let (status, result, traceback, reject_it) = match settlement {
        Settlement::Requeue => {
            tracing::info!(task_id = %task.id, "worker stopping: returning the task to the queue");
            let copies = shared.tasks().ledger.release(&task.id);
            for a in std::iter::once(acker).chain(&copies) {
                reject(a, true).await;
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
    if let (Some(reply_to), false) = (&task.reply_to, task.ignore_result) {
        let body = celery::result_body(&task.id, status, result, traceback.as_deref());
        let delivered = shared
            .publish_final(&task.id, reply_to, &task.correlation_id, &body)
            .await;
        if delivered == Delivered::GaveUp {
            tracing::warn!(task_id = %task.id, "gave up publishing the result at shutdown; the message is left unacked for redelivery");
            shared.tasks().ledger.release(&task.id);
            return;
        }
    }
    let copies = shared.tasks().ledger.answered(&task.id);
    for a in std::iter::once(acker).chain(&copies) {
        if reject_it {
            reject(a, false).await;
        } else {
            ack(a).await;
        }
    }
    shared.count_answered(&task.name);
}

/// Progress and streamed items become custom-state messages, in order, before the final state.
async fn publish_event(shared: &Shared, task: &CeleryTask, reply_to: Option<&str>, ev: TaskEvent) {
    let Some(reply_to) = reply_to else { return };
    let (status, meta) = match ev {
        TaskEvent::Progress {
            done,
            total,
            message,
        } => (
            state::PROGRESS,
            json!({ "done": done, "total": total, "message": message }),
        ),
        TaskEvent::Stream { items } => (state::STREAM, json!({ "items": items })),
    };
    let body = celery::result_body(&task.id, status, meta, None);
    shared
        .publish_event(reply_to, &task.correlation_id, &body)
        .await;
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn ack(acker: &Acker) {
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        // The channel is gone (connection lost): RabbitMQ redelivers, and the copy is acked
        // as answered without publishing again.
        tracing::debug!(
            "ack failed ({e}); the broker will redeliver and the copy will be acked as answered"
        );
    }
}

pub(super) async fn reject(acker: &Acker, requeue: bool) {
    if let Err(e) = acker.reject(BasicRejectOptions { requeue }).await {
        tracing::debug!("reject failed ({e})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Failure;

    fn failure(kind: FailureKind) -> Outcome {
        Outcome::Failure(Failure::new(kind, "T", "m", "why"))
    }

    /// Every outcome kind, revoked or not, stopping or not.
    #[test]
    fn how_each_outcome_ends_on_the_wire() {
        use FailureKind::*;
        let kinds = [
            Raised { retryable: false },
            Cancelled,
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
            for revoked in [None, Some("terminated")] {
                for stopping in [false, true] {
                    let got = settle(failure(kind), revoked, stopping);
                    let want_status = match (kind, revoked, stopping) {
                        (Cancelled, Some(_), _) => Some(state::REVOKED),
                        (ShuttingDown, _, _) => None,
                        (PluginUnavailable | PluginCrashed | Interrupted | Rejected, _, true) => {
                            None
                        }
                        _ => Some(state::FAILURE),
                    };
                    match (&got, want_status) {
                        (Settlement::Requeue, None) => {}
                        (Settlement::Answer { status, reject, .. }, Some(want)) => {
                            assert_eq!(*status, want, "{kind:?} {revoked:?} {stopping}");
                            assert_eq!(*reject, kind == NotRegistered, "{kind:?}");
                        }
                        _ => panic!("{kind:?} {revoked:?} {stopping}: got {got:?}"),
                    }
                }
            }
        }
        for stopping in [false, true] {
            assert_eq!(
                settle(Outcome::Success(json!(1)), None, stopping),
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
