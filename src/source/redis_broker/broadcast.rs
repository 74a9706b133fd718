//! Remote control and Celery's event stream over Redis pub/sub, as kombu carries fanout
//! exchanges there: requests arrive on `/<db>.celery.pidbox` (each answered by pushing to the
//! client's reply list through the `reply.celery.pidbox` bindings), and events go out on
//! `/<db>.celeryev/<routing key>` (Celery makes `celeryev` a fanout exchange on Redis), where
//! Flower and `celery events` subscribe. Pub/sub keeps nothing for absent subscribers, so a
//! lost subscription is made again at once, then with backoff.

use super::envelope::{self, Outgoing as Envelope};
use super::ops;
use super::SourceState;
use crate::source::engine::announce::worker_event;
use crate::source::engine::monitor::{heartbeats, multi_body, Event, BATCH};
use crate::source::pidbox;
use crate::supervisor::restart;
use futures_lite::StreamExt;
use serde_json::{json, Map};
use std::sync::Arc;
use std::time::Duration;

const PIDBOX: &str = "celery.pidbox";
const EVENTS: &str = "celeryev";
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Listens for remote-control requests until the worker finishes.
pub(super) async fn pidbox_loop(shared: Arc<SourceState>) {
    let channel = shared.transport.keys.fanout_channel(PIDBOX, "");
    let mut failures = 0;
    loop {
        let listened = tokio::select! {
            r = listen(&shared, &channel) => r,
            _ = shared.engine.finished.cancelled() => return,
        };
        if let Err(e) = listened {
            tracing::debug!("remote control subscription lost ({e}); subscribing again");
        }
        failures += 1;
        let wait = restart::delay(failures, RETRY_MIN, RETRY_MAX, fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.engine.finished.cancelled() => return,
        }
    }
}

async fn listen(shared: &Arc<SourceState>, channel: &str) -> redis::RedisResult<()> {
    let mut pubsub = shared
        .transport
        .server
        .client()
        .await?
        .get_async_pubsub()
        .await?;
    pubsub.subscribe(channel).await?;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload = message.get_payload_bytes().to_vec();
        let state = shared.clone();
        shared
            .engine
            .handlers
            .spawn(async move { answer(&state, &payload).await });
    }
    Ok(())
}

/// Answers one remote-control message addressed to this node.
async fn answer(shared: &SourceState, payload: &[u8]) {
    let message = match envelope::decode(payload, shared.transport.max_message_size) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("ignoring a remote control message that cannot be read: {e}");
            return;
        }
    };
    let node = shared.engine.nodename();
    let Some(reply) = pidbox::answer(&message.body, &node, shared).await else {
        return;
    };
    let mut headers = Map::new();
    if let Some(ticket) = &reply.ticket {
        headers.insert("ticket".into(), json!(ticket));
    }
    headers.insert("clock".into(), json!(0));
    let (exchange, routing_key) = (reply.exchange.as_str(), reply.routing_key.as_str());
    let message = Envelope {
        headers,
        delivery_mode: 1,
        ..Envelope::plain(&reply.body, exchange, routing_key)
    };
    let payload = envelope::encode(&message);
    let t = &shared.transport;
    let pushed = match t.connection().await {
        Ok(mut conn) => ops::push(&mut conn, &t.keys, exchange, routing_key, 0, &payload)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match pushed {
        Ok(0) => {
            tracing::debug!(method = %reply.method, "the client of a remote control request is gone; reply dropped")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot answer remote control `{}`: {e}", reply.method),
    }
}

/// Publishes the worker's events: `worker-online` at once, then queued events and a heartbeat
/// every 2 s, until the worker finishes.
pub(super) async fn events_loop(shared: Arc<SourceState>) {
    let monitor = &shared.monitor;
    let mut batch = vec![worker_event(&shared, "worker-online")];
    let mut queued = monitor.queued().await;
    let mut beat = heartbeats();
    loop {
        publish_batch(&shared, &mut batch).await;
        let next = monitor.next_batch(
            || worker_event(&shared, "worker-heartbeat"),
            &mut queued,
            &mut beat,
            &mut batch,
        );
        tokio::select! {
            more = next => if !more { return },
            _ = shared.engine.finished.cancelled() => return,
        }
    }
}

/// `worker-offline`, sent once as the worker stops, so monitors mark it offline at once.
pub(super) async fn offline(shared: &SourceState) {
    let mut batch = vec![worker_event(shared, "worker-offline")];
    publish_batch(shared, &mut batch).await;
}

/// Publishes `batch` (emptying it): worker events one by one, task events together as a JSON
/// array on `task.multi` when there are several, as Celery's worker buffers its task group.
/// Best effort: events are dropped while Redis is away.
async fn publish_batch(shared: &SourceState, batch: &mut Vec<Event>) {
    if batch.is_empty() {
        return;
    }
    let (tasks, mut events): (Vec<_>, Vec<_>) = batch.drain(..).partition(Event::is_task);
    match tasks.len() {
        0 => {}
        1 => events.extend(tasks),
        _ => {
            for chunk in tasks.chunks(BATCH) {
                events.push(Event {
                    key: "task.multi".into(),
                    body: multi_body(chunk),
                });
            }
        }
    }
    let Ok(mut conn) = shared.transport.connection().await else {
        return;
    };
    let node = shared.engine.nodename();
    let keys = &shared.transport.keys;
    let mut pipe = redis::pipe();
    for Event { key, body } in &events {
        let mut headers = Map::new();
        headers.insert("hostname".into(), json!(node));
        let message = Envelope {
            headers,
            delivery_mode: 1,
            ..Envelope::plain(body, EVENTS, key)
        };
        pipe.publish(keys.fanout_channel(EVENTS, key), envelope::encode(&message))
            .ignore();
    }
    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
        tracing::debug!("cannot publish Celery events ({e}); dropped");
    }
}
