//! Carries a task's workflow on once it has ended and before its own result is published (as
//! Celery's worker does, so the result never arrives before what follows it is on its way):
//! after a success, its `link` callbacks and the next step of its chain; after a failure, the
//! same failure for every remaining chain step and a message to each `link_error` errback.
//! Every message is confirmed by the broker before the task's own message is acked, so a
//! worker killed in between publishes them again after redelivery, never loses them.

use super::rules::Settlement;
use super::transport::{Delivered, Published, Returns};
use super::worker::{Transport, Worker};
use crate::source::canvas::{self, Context};
use crate::source::celery::{self, state, CeleryTask};
use serde_json::Value;

/// Where a step whose options name no queue goes: Celery's `task_default_queue`.
const DEFAULT_QUEUE: &str = "celery";

/// Publishes what follows `task` and returns the settlement to publish for it: a success
/// whose next step cannot be carried on (a chord) becomes a failure saying why; if the worker
/// stops for good before the broker confirmed the follow-ups, the task goes back to the queue.
pub(crate) async fn carry_on<T: Transport>(
    shared: &Worker<T>,
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
    let node = shared.engine.nodename();
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
            Ok(messages) => match publish_all(shared, &messages).await {
                Ok(true) => answer(status, result, traceback),
                Ok(false) => Settlement::Requeue,
                Err(why) => {
                    tracing::error!(task_id = %task.id, task = %task.name, "cannot carry the workflow on: {why}");
                    let failure = celery::exception("CanvasError", &why, "worker.errors");
                    match fail_the_rest(shared, &cx, &failure, None).await {
                        true => answer(state::FAILURE, failure, None),
                        false => Settlement::Requeue,
                    }
                }
            },
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

/// Publishes `messages` in order, telling the Redis backend a chord's size before its first
/// header task goes out. Ok(false) if the worker stopped for good first; an error if a chord
/// cannot be opened (no Redis backend, or Redis failing).
async fn publish_all<T: Transport>(
    shared: &Worker<T>,
    messages: &[canvas::Outgoing],
) -> Result<bool, String> {
    for m in messages {
        if let Some((group_id, size)) = &m.opens_chord {
            let Some(redis) = &shared.result_backend else {
                return Err("a chord step needs the Redis result backend (result_backend = \"redis://...\"), which counts its parts".into());
            };
            redis
                .open_chord(group_id, *size)
                .await
                .map_err(|e| format!("cannot open the chord in Redis ({e})"))?;
        }
        match T::publish_task(shared, m).await {
            Published::Confirmed => {}
            Published::Stopped => return Ok(false),
            Published::Refused(why) => {
                return Err(format!("cannot send task {} ({}): {why}", m.id, m.exchange))
            }
        }
    }
    Ok(true)
}

/// The same failure for every remaining chain step whose client may wait on it, then the
/// errbacks. False if the worker stopped for good first.
async fn fail_the_rest<T: Transport>(
    shared: &Worker<T>,
    cx: &Context<'_>,
    failure: &Value,
    traceback: Option<&str>,
) -> bool {
    let (failed, errbacks) = canvas::after_failure(cx);
    for step in failed {
        let body = celery::result_body(&step.id, state::FAILURE, failure.clone(), traceback);
        let delivered = shared
            .deliver_final(
                &step.id,
                Some(&step.reply_to),
                &step.id,
                &body,
                Returns::Retry,
            )
            .await;
        if delivered == Delivered::GaveUp {
            return false;
        }
    }
    for m in &errbacks {
        match T::publish_task(shared, m).await {
            Published::Confirmed => {}
            Published::Stopped => return false,
            // Logged by `publish_task`; the failure is answered all the same.
            Published::Refused(_) => {}
        }
    }
    true
}

/// A chord header task's part, once its own state is stored: counted in Redis as Celery 5.7
/// counts it; the worker that adds the last part sends the chord's body with every part's
/// result in header order, or, if a part failed, stores a `ChordError` for the body naming it.
pub(crate) async fn chord_part<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    status: &str,
    result: &Value,
) {
    let Some(body) = &task.embed.chord else {
        return;
    };
    let Some(group_id) = &task.group else {
        tracing::warn!(task_id = %task.id, "a chord part without a `group` header; its chord cannot be counted");
        return;
    };
    let Some(redis) = &shared.result_backend else {
        tracing::error!(task_id = %task.id, "task {} is part of a chord, but chords need the Redis result backend (result_backend = \"redis://...\"); the chord's body will not run", task.id);
        return;
    };
    let part = serde_json::json!([1, task.id, status, result]).to_string();
    let token = match redis
        .chord_part(group_id, &task.id, &part, task.group_index)
        .await
    {
        Ok(Some(token)) => token,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(task_id = %task.id, group_id, "cannot count the chord part in Redis ({e}); the chord's body may not run");
            return;
        }
    };
    if let Err(why) = send_chord_body(shared, task, redis, group_id, body).await {
        tracing::error!(task_id = %task.id, group_id, "chord body: {why}");
    }
    if let Err(e) = redis.chord_done(group_id, &token).await {
        tracing::warn!(group_id, "cannot mark the chord done in Redis ({e})");
    }
}

async fn send_chord_body<T: Transport>(
    shared: &Worker<T>,
    task: &CeleryTask,
    redis: &crate::source::redis_backend::RedisBackend,
    group_id: &str,
    body: &Value,
) -> Result<(), String> {
    let body = crate::source::embed::Signature::from_json(body, "embed.chord")
        .map_err(|e| e.to_string())?;
    let parts = redis
        .chord_parts(group_id)
        .await
        .map_err(|e| format!("cannot read the chord's parts ({e})"))?;
    let mut results = Vec::with_capacity(parts.len());
    let mut failed = None;
    for part in &parts {
        let v: Value =
            serde_json::from_str(part).map_err(|e| format!("a chord part is not JSON ({e})"))?;
        if failed.is_none() && matches!(v[2].as_str(), Some(state::FAILURE | state::REVOKED)) {
            let message = v[3]["exc_message"][0].as_str().unwrap_or_default();
            let exc = v[3]["exc_type"].as_str().unwrap_or("Exception");
            let raised = crate::source::pyrepr::exception_repr(exc, message);
            failed = Some(format!(
                "Dependency {} raised {raised}",
                v[1].as_str().unwrap_or_default()
            ));
        }
        results.push(v[3].clone());
    }
    let node = shared.engine.nodename();
    let cx = Context {
        parent: task,
        node: &node,
        default_queue: DEFAULT_QUEUE,
    };
    if let Some(why) = failed {
        let Some(body_id) = body.options.get("task_id").and_then(Value::as_str) else {
            return Err(format!("{why}, and the body has no task id to fail"));
        };
        let failure = celery::chord_error(&why);
        let meta = celery::result_body(body_id, state::FAILURE, failure, None);
        let reply_to = body.options.get("reply_to").and_then(Value::as_str);
        shared
            .deliver_final(body_id, reply_to, body_id, &meta, Returns::Retry)
            .await;
        return Ok(());
    }
    for m in canvas::chord_body(&cx, &body, results)? {
        match T::publish_task(shared, &m).await {
            Published::Confirmed => {}
            Published::Stopped => return Err("the worker stopped before the body was sent".into()),
            Published::Refused(why) => return Err(format!("cannot send the body: {why}")),
        }
    }
    Ok(())
}
