//! Carries a task's workflow on once it has ended and before its own result is published (as
//! Celery's worker does, so the result never arrives before what follows it is on its way):
//! after a success, its `link` callbacks and the next step of its chain; after a failure, the
//! same failure for every remaining chain step and a message to each `link_error` errback.
//! Every message is confirmed by the broker before the task's own message is acked, so a
//! worker killed in between publishes them again after redelivery, never loses them.

use super::delivery::Settlement;
use super::publish::Delivered;
use super::SourceState;
use crate::source::canvas::{self, Context};
use crate::source::celery::{self, state, CeleryTask};
use serde_json::Value;

/// Where a step whose options name no queue goes: Celery's `task_default_queue`.
const DEFAULT_QUEUE: &str = "celery";

/// Publishes what follows `task` and returns the settlement to publish for it: a success
/// whose next step cannot be carried on (a chord) becomes a failure saying why; if the worker
/// stops for good before the broker confirmed the follow-ups, the task goes back to the queue.
pub(super) async fn carry_on(
    shared: &SourceState,
    task: &CeleryTask,
    settlement: Settlement,
) -> Settlement {
    let embed = &task.embed;
    if embed.callbacks.is_empty() && embed.errbacks.is_empty() && embed.chain.is_empty() {
        return settlement;
    }
    let Settlement::Answer {
        status,
        result,
        traceback,
        reject,
    } = settlement
    else {
        return settlement;
    };
    let node = shared.nodename();
    let cx = Context {
        parent: task,
        node: &node,
        default_queue: DEFAULT_QUEUE,
    };
    let answer = |status, result, traceback| Settlement::Answer {
        status,
        result,
        traceback,
        reject,
    };
    match status {
        state::SUCCESS => match canvas::after_success(&cx, &result) {
            Ok(messages) => {
                for m in &messages {
                    if !shared.publish_task(m).await {
                        return Settlement::Requeue;
                    }
                }
                answer(status, result, traceback)
            }
            Err(why) => {
                tracing::error!(task_id = %task.id, task = %task.name, "cannot carry the workflow on: {why}");
                let failure = celery::exception("CanvasError", &why, "worker.errors");
                match fail_the_rest(shared, &cx, &failure, None).await {
                    true => answer(state::FAILURE, failure, None),
                    false => Settlement::Requeue,
                }
            }
        },
        state::FAILURE => match fail_the_rest(shared, &cx, &result, traceback.as_deref()).await {
            true => answer(status, result, traceback),
            false => Settlement::Requeue,
        },
        // Revoked: no errbacks and the chain is left alone, as in Celery.
        _ => answer(status, result, traceback),
    }
}

/// The same failure for every remaining chain step whose client may wait on it, then the
/// errbacks. False if the worker stopped for good first.
async fn fail_the_rest(
    shared: &SourceState,
    cx: &Context<'_>,
    failure: &Value,
    traceback: Option<&str>,
) -> bool {
    let (failed, errbacks) = canvas::after_failure(cx);
    for step in failed {
        let body = celery::result_body(&step.id, state::FAILURE, failure.clone(), traceback);
        let delivered = shared
            .deliver_final(&step.id, Some(&step.reply_to), &step.id, &body)
            .await;
        if delivered == Delivered::GaveUp {
            return false;
        }
    }
    for m in &errbacks {
        if !shared.publish_task(m).await {
            return false;
        }
    }
    true
}
