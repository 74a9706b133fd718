//! Celery's event stream on RabbitMQ: the `celeryev` topic exchange and one loop per session
//! publishing what the engine's [`Monitor`](crate::source::engine::monitor::Monitor) queued, on
//! its own channel, without confirms, transient, as a Celery worker does.

use super::SourceState;
use crate::source::engine::announce::worker_event;
use crate::source::engine::monitor::{heartbeats, multi_body, Event, BATCH};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use std::sync::Arc;

/// Celery's event exchange (`event_exchange`).
const EXCHANGE: &str = "celeryev";

/// Declares `celeryev` as a Celery worker finds it: topic, durable.
pub(super) async fn declare(channel: &Channel) -> lapin::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
}

async fn publish(channel: &Channel, hostname: &str, key: &str, body: &[u8]) -> bool {
    let mut headers = FieldTable::default();
    headers.insert("hostname".into(), AMQPValue::LongString(hostname.into()));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(1)
        .with_priority(0);
    let sent = channel
        .basic_publish(
            EXCHANGE.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("cannot publish a Celery event ({e}); the session is ending");
            false
        }
    }
}

/// One session's event loop: `worker-online` at once, then queued events as they come and a
/// heartbeat every 2 s, until the channel fails or the task is dropped.
pub(super) async fn run(shared: Arc<SourceState>, channel: Channel) {
    let monitor = &shared.monitor;
    let node = shared.engine.nodename();
    let online = worker_event(&shared, "worker-online");
    if !publish(&channel, &node, &online.key, &online.body).await {
        return;
    }
    let mut queued = monitor.queued().await;
    let mut beat = heartbeats();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if !monitor
            .next_batch(
                || worker_event(&shared, "worker-heartbeat"),
                &mut queued,
                &mut beat,
                &mut batch,
            )
            .await
        {
            return;
        }
        if !publish_batch(&channel, &shared.engine.nodename(), &mut batch).await {
            return;
        }
    }
}

/// Publishes `batch` (emptying it): worker events one by one, task events together as a JSON
/// array on `task.multi` when there are several, as Celery's worker buffers its task group.
async fn publish_batch(channel: &Channel, hostname: &str, batch: &mut Vec<Event>) -> bool {
    let (tasks, others): (Vec<_>, Vec<_>) = batch.drain(..).partition(Event::is_task);
    for event in others {
        if !publish(channel, hostname, &event.key, &event.body).await {
            return false;
        }
    }
    match tasks.as_slice() {
        [] => true,
        [one] => publish(channel, hostname, &one.key, &one.body).await,
        _ => publish(channel, hostname, "task.multi", &multi_body(&tasks)).await,
    }
}

/// `worker-offline`, sent once as the worker stops, so monitors mark it offline at once.
pub(super) async fn offline(shared: &SourceState, channel: &Channel) {
    let event = worker_event(shared, "worker-offline");
    publish(channel, &shared.engine.nodename(), &event.key, &event.body).await;
}
