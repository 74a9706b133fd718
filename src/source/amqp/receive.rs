//! RabbitMQ as the Celery engine's [`Transport`]: a delivery read into the engine's
//! [`Received`] (one that is unreadable or breaks a limit rejected at once), settled through
//! its channel's [`acks`](super::acks) (acks coalesced, rejects sent at once), eta tasks
//! parked in the broker's delay queues, retries published again with their headers changed,
//! and replies through the publisher.

use super::acks::Tag;
use super::inbound::{self, Inbound};
use super::publish::Raw;
use super::value::json_to_amqp;
use super::{delayed, Amqp, SourceState};
use crate::metrics::Settled;
use crate::source::canvas::Outgoing;
use crate::source::celery::CeleryTask;
use crate::source::engine::delivery::{self, Received};
use crate::source::engine::monitor::now_epoch;
use crate::source::engine::transport::{
    BrokerSettings, Delivered, Published, Returns, WantedQueue,
};
use crate::source::engine::worker::Transport;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// Handles one task message (settled through `tag`) to its end. `lost` fires when the
/// connection it came on is gone.
pub(super) async fn handle(
    shared: Arc<SourceState>,
    queue: Arc<str>,
    delivery: Delivery,
    tag: Tag,
    lost: CancellationToken,
) {
    if let Some(received) = decode(&shared, &queue, delivery, tag).await {
        delivery::handle(shared, queue, received, lost).await
    }
}

/// Reads the Celery task out of a delivery; one that is unreadable or breaks a limit is
/// rejected without requeue (dead-lettered if the queue has a DLX), with one log line.
async fn decode(
    shared: &SourceState,
    queue: &str,
    delivery: Delivery,
    tag: Tag,
) -> Option<Received<Amqp>> {
    let message = Inbound {
        queue,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        redelivered: delivery.redelivered,
        properties: &delivery.properties,
        body: &delivery.data,
    };
    let max = shared.transport.options.max_message_size;
    match inbound::read(&message, max, &shared.engine.nodename(), now_epoch()) {
        Ok((task, info)) => {
            // Kept (moved, not copied) while the task is handled: it may be parked until its
            // eta, or published again for a retry, as it came.
            let raw = Raw {
                properties: delivery.properties,
                body: delivery.data,
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
            };
            Some(Received {
                task,
                info: info.into(),
                ack: tag,
                raw,
                redelivered: delivery.redelivered,
            })
        }
        Err(refusal) => {
            tracing::error!(
                queue = %delivery.routing_key,
                delivery_tag = delivery.delivery_tag,
                bytes = delivery.data.len(),
                "rejecting a task message (dead-lettered if the queue has a DLX): {refusal}"
            );
            shared.reject(&tag, Settled::Rejected).await;
            None
        }
    }
}

impl Transport for Amqp {
    type Ack = Tag;
    type Raw = Raw;
    const NAME: &'static str = "amqp";

    /// Coalesced with its channel's other answers (see `acks`): true once taken on an open
    /// channel, sent within `acks::FLUSH_DEADLINE`.
    async fn ack(_: &SourceState, tag: &Tag) -> bool {
        tag.ack().await
    }

    /// Sent at once, never coalesced.
    async fn reject(_: &SourceState, tag: &Tag, requeue: bool) -> bool {
        tag.reject(requeue).await
    }

    /// An eta task a second or more away goes to the broker's delay topology (see `delayed`):
    /// published again, confirmed, then the original acked. Held here instead when it is due
    /// within a second, the topology is not declared, or the broker refuses it.
    async fn park(
        shared: &SourceState,
        queue: &str,
        task: &CeleryTask,
        raw: &Raw,
        tag: &Tag,
    ) -> bool {
        let Some(eta) = task.eta else { return false };
        let remaining = eta.duration_since(SystemTime::now()).unwrap_or_default();
        let Some(secs) = delayed::park_for(remaining) else {
            return false;
        };
        if !shared
            .transport
            .parking
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return false;
        }
        let spec = shared
            .transport
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
                shared.ack(tag).await;
                true
            }
            Published::Refused(why) => {
                tracing::warn!(task_id = %task.id, "cannot park an eta task in the delay queues ({why}); holding it here");
                false
            }
            Published::Stopped => false,
        }
    }

    async fn publish_task(shared: &SourceState, message: &Outgoing) -> Published {
        shared.publish_task(message).await
    }

    /// Protocol 2 carries the retry count and eta as headers (the body goes as it came);
    /// protocol 1 in the body.
    async fn publish_retry(
        shared: &SourceState,
        task: &CeleryTask,
        raw: &Raw,
        retries: u64,
        eta: &str,
    ) -> Published {
        let (props, body) = match raw.properties.headers() {
            Some(h) if h.inner().contains_key("task") => {
                let mut headers = h.clone();
                headers.insert("retries".into(), AMQPValue::LongLongInt(retries as i64));
                headers.insert("eta".into(), json_to_amqp(&json!(eta)));
                (
                    raw.properties.clone().with_headers(headers),
                    raw.body.clone(),
                )
            }
            _ => {
                let mut body: Value = serde_json::from_slice(&raw.body).unwrap_or_default();
                if let Some(b) = body.as_object_mut() {
                    b.insert("retries".into(), json!(retries));
                    b.insert("eta".into(), json!(eta));
                }
                let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| raw.body.clone());
                (raw.properties.clone(), bytes)
            }
        };
        let props = props.with_delivery_mode(2);
        shared
            .publish_confirmed(
                &task.id,
                raw.exchange.as_str().into(),
                raw.routing_key.as_str().into(),
                props,
                &body,
            )
            .await
    }

    async fn reply(
        shared: &SourceState,
        task_id: &str,
        (reply_to, correlation_id): (&str, &str),
        body: &[u8],
        returns: Returns,
    ) -> Delivered {
        shared
            .publish_final(task_id, reply_to, correlation_id, body, returns)
            .await
    }

    async fn reply_progress(
        shared: &SourceState,
        (reply_to, correlation_id): (&str, &str),
        body: &[u8],
    ) {
        shared.publish_event(reply_to, correlation_id, body).await
    }

    fn active_queues(shared: &SourceState) -> Vec<Value> {
        super::remote::active_queues(shared)
    }

    fn settings(shared: &SourceState) -> BrokerSettings {
        super::remote::settings(shared)
    }

    async fn add_consumer(shared: &SourceState, queue: WantedQueue) -> Result<bool, String> {
        super::remote::add_consumer(shared, queue).await
    }

    fn cancel_consumer(shared: &SourceState, queue: &str) {
        super::remote::cancel_consumer(shared, queue)
    }
}
