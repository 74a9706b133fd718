//! Redis as the Celery engine's [`Transport`]: acks and requeues through the atomic scripts
//! (retried while Redis is away, so a result stored is never followed by a lost ack), task
//! messages pushed as kombu pushes them, retries pushed with their headers changed, rpc://
//! replies pushed to the client's reply list. Eta tasks are held here (their lease renewed),
//! as Celery's worker holds them on Redis.

use super::envelope::{self, KombuMessage, Outgoing as Envelope};
use super::ops::{self, Placement, Requeued};
use super::{Redis, SourceState};
use crate::source::canvas::Outgoing;
use crate::source::celery::CeleryTask;
use crate::source::engine::transport::{
    BrokerSettings, Delivered, Published, Returns, WantedQueue,
};
use crate::source::engine::worker::Transport;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Runs `op` on the connection until it succeeds, waiting while Redis is away; `None` once
/// the worker stops for good first.
async fn until_done<T, F, Fut>(shared: &SourceState, what: &str, op: F) -> Option<T>
where
    F: Fn(redis::aio::ConnectionManager) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut wait = RETRY_MIN;
    loop {
        let attempt = match shared.transport.connection().await {
            Ok(conn) => op(conn).await,
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!("cannot {what} in Redis ({e}); trying again in {wait:?}");
                shared.transport.connection_failed().await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.engine.finished.cancelled() => return None,
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Pushes a message as kombu's `_put` does; how many queues it reached.
async fn push(
    shared: &SourceState,
    what: &str,
    (exchange, routing_key, priority): (&str, &str, u8),
    payload: &[u8],
) -> Option<usize> {
    let keys = &shared.transport.keys;
    until_done(shared, what, |mut conn| async move {
        ops::push(&mut conn, keys, exchange, routing_key, priority, payload)
            .await
            .map_err(|e| e.to_string())
    })
    .await
}

/// Puts back every message still held here, at the front of its queue (kombu's
/// `restore_unacked` at shutdown), so nothing waits for the visibility timeout.
pub(super) async fn restore_held(shared: &SourceState) {
    let held = shared.transport.held();
    if held.is_empty() {
        return;
    }
    let Ok(mut conn) = shared.transport.connection().await else {
        tracing::warn!(
            messages = held.len(),
            "Redis is away: the messages still held here come back after the visibility timeout"
        );
        return;
    };
    let mut restored = 0;
    for tag in &held {
        let requeued = ops::requeue(&mut conn, &shared.transport.keys, tag, Placement::Front).await;
        if matches!(requeued, Ok(Requeued::Restored { .. })) {
            restored += 1;
        }
        // Given back: its handler, still running, must not settle it later (another worker
        // may hold it by then, under the same tag). One left in `unacked` stays ours.
        if matches!(requeued, Ok(Requeued::Restored { .. } | Requeued::Missing)) {
            shared.transport.release(tag);
        }
    }
    tracing::info!(restored, "put the messages still held back to their queues");
}

/// Whether `tag` is still ours to settle: taken here and not given back at shutdown.
fn ours(shared: &SourceState, tag: &str) -> bool {
    crate::sync::lock(&shared.transport.held).contains(tag)
}

impl Transport for Redis {
    type Ack = Arc<str>;
    type Raw = KombuMessage;
    const NAME: &'static str = "redis";

    /// Forgets the message (`unacked` and its index), retried while Redis is away: the lease
    /// goes on being renewed until then, so it is not restored meanwhile. False, untouched,
    /// once it was given back at shutdown.
    async fn ack(shared: &SourceState, tag: &Arc<str>) -> bool {
        if !ours(shared, tag) {
            return false;
        }
        let keys = &shared.transport.keys;
        let done = until_done(shared, "ack a message", |mut conn| async move {
            ops::ack(&mut conn, keys, tag)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        shared.transport.release(tag);
        done.is_some()
    }

    /// Back to the front of its queue with `requeue` (taken next), else forgotten.
    async fn reject(shared: &SourceState, tag: &Arc<str>, requeue: bool) -> bool {
        if !requeue {
            return Self::ack(shared, tag).await;
        }
        if !ours(shared, tag) {
            return false;
        }
        let keys = &shared.transport.keys;
        let done = until_done(shared, "requeue a message", |mut conn| async move {
            ops::requeue(&mut conn, keys, tag, Placement::Front)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        shared.transport.release(tag);
        if let Some(Requeued::Stuck(why)) = &done {
            tracing::error!(delivery_tag = %tag, "cannot put a message back to its queue ({why:?}); it stays in `unacked`");
        }
        done.is_some()
    }

    /// Redis has no delay queues: an eta task is held here, unacked, its lease renewed.
    async fn park(
        _: &SourceState,
        _: &str,
        _: &CeleryTask,
        _: &KombuMessage,
        _: &Arc<str>,
    ) -> bool {
        false
    }

    async fn publish_task(shared: &SourceState, m: &Outgoing) -> Published {
        let body = m.body_bytes();
        let message = Envelope {
            correlation_id: Some(&m.id),
            reply_to: m.reply_to.as_deref(),
            priority: m.priority.unwrap_or(0),
            ..Envelope::task(&body, m.headers.clone(), &m.exchange, &m.routing_key)
        };
        let payload = envelope::encode(&message);
        let to = (
            m.exchange.as_str(),
            m.routing_key.as_str(),
            message.priority,
        );
        match push(shared, "publish a task message", to, &payload).await {
            Some(0) => Published::Refused(format!(
                "no queue is bound to exchange `{}` with routing key `{}`",
                m.exchange, m.routing_key
            )),
            Some(_) => Published::Confirmed,
            None => Published::Stopped,
        }
    }

    /// Protocol 2 carries the retry count and eta as headers (the body goes as it came);
    /// protocol 1 in the body.
    async fn publish_retry(
        shared: &SourceState,
        task: &CeleryTask,
        raw: &KombuMessage,
        retries: u64,
        eta: &str,
    ) -> Published {
        let mut headers = raw.headers.clone();
        let body = match headers.contains_key("task") {
            true => {
                headers.insert("retries".into(), json!(retries));
                headers.insert("eta".into(), json!(eta));
                raw.body.clone()
            }
            false => {
                let mut body: Value = serde_json::from_slice(&raw.body).unwrap_or_default();
                if let Some(b) = body.as_object_mut() {
                    b.insert("retries".into(), json!(retries));
                    b.insert("eta".into(), json!(eta));
                }
                serde_json::to_vec(&body).unwrap_or_else(|_| raw.body.clone())
            }
        };
        let queue = raw.routing_key.as_deref().unwrap_or_default();
        let exchange = raw.exchange.as_deref().unwrap_or_default();
        let message = Envelope {
            content_type: raw.content_type.as_deref().unwrap_or("application/json"),
            content_encoding: raw.content_encoding.as_deref().unwrap_or("utf-8"),
            correlation_id: raw.correlation_id.as_deref().or(Some(&task.id)),
            reply_to: raw.reply_to.as_deref(),
            priority: raw.priority,
            ..Envelope::task(&body, headers, exchange, queue)
        };
        let payload = envelope::encode(&message);
        match push(
            shared,
            "publish a retry",
            (exchange, queue, raw.priority),
            &payload,
        )
        .await
        {
            Some(0) => Published::Refused(format!("no queue takes routing key `{queue}`")),
            Some(_) => Published::Confirmed,
            None => Published::Stopped,
        }
    }

    /// rpc:// on Redis: the result goes to the list named by `reply_to`, as Celery's rpc
    /// backend publishes it (the default exchange).
    async fn reply(
        shared: &SourceState,
        _task_id: &str,
        (reply_to, correlation_id): (&str, &str),
        body: &[u8],
        _returns: Returns,
    ) -> Delivered {
        let message = Envelope {
            correlation_id: Some(correlation_id),
            delivery_mode: 1,
            ..Envelope::plain(body, "", reply_to)
        };
        let payload = envelope::encode(&message);
        match push(shared, "send a result", ("", reply_to, 0), &payload).await {
            Some(_) => Delivered::Confirmed,
            None => Delivered::GaveUp,
        }
    }

    async fn reply_progress(shared: &SourceState, reply: (&str, &str), body: &[u8]) {
        Self::reply(shared, "", reply, body, Returns::Report).await;
    }

    fn active_queues(shared: &SourceState) -> Vec<Value> {
        shared
            .transport
            .queues
            .borrow()
            .iter()
            .map(|q| {
                json!({
                    "name": q, "exchange": {"name": q, "type": "direct", "durable": true, "auto_delete": false},
                    "routing_key": q, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
                    "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null
                })
            })
            .collect()
    }

    fn settings(shared: &SourceState) -> BrokerSettings {
        let t = &shared.transport;
        let mut conf = Map::new();
        conf.insert(
            "visibility_timeout".into(),
            json!(t.visibility_timeout.as_secs_f64()),
        );
        conf.insert("global_keyprefix".into(), json!(t.keys.global_keyprefix()));
        BrokerSettings {
            url: t.configured_url.clone(),
            prefetch: t.prefetch,
            queues: t.queues.borrow().clone(),
            conf,
        }
    }

    /// A Redis queue is a list: nothing to declare, consumed from the next round.
    async fn add_consumer(shared: &SourceState, queue: WantedQueue) -> Result<bool, String> {
        if queue.exchange != queue.name || queue.routing_key != queue.name {
            return Err(format!("on Redis a queue is consumed by its name; exchange `{}` and routing key `{}` cannot be bound here (bind them from the client)", queue.exchange, queue.routing_key));
        }
        let added = shared.transport.queues.send_if_modified(|queues| {
            let new = !queues.contains(&queue.name);
            if new {
                queues.push(queue.name.clone());
            }
            new
        });
        if added {
            let board = shared.engine.dispatcher.metrics().broker();
            board.want(shared.transport.queues.borrow().iter().map(String::as_str));
            board.consuming(&queue.name);
        }
        Ok(added)
    }

    fn cancel_consumer(shared: &SourceState, queue: &str) {
        let changed = shared.transport.queues.send_if_modified(|queues| {
            let before = queues.len();
            queues.retain(|q| q != queue);
            queues.len() != before
        });
        if changed {
            let board = shared.engine.dispatcher.metrics().broker();
            board.want(shared.transport.queues.borrow().iter().map(String::as_str));
        }
    }
}
