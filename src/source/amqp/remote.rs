//! Celery remote control on RabbitMQ: the queues it may change (`add_consumer`,
//! `cancel_consumer`, `active_queues`), the broker settings it shows, and the replies on the
//! wire. What it asks of the worker is answered by the engine (`engine::remote`).

use super::value::json_to_amqp;
use super::{Declare, QueueSpec, SourceState};
use crate::source::engine::transport::{BrokerSettings, WantedQueue};
use crate::source::pidbox;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::{json, Map, Value};

/// The queues consumed now, as `inspect active_queues` shows them.
pub(super) fn active_queues(shared: &SourceState) -> Vec<Value> {
    shared
        .transport
        .queues
        .borrow()
        .iter()
        .map(|q| {
            json!({
                "name": q.name, "exchange": {"name": q.exchange, "type": q.exchange_type, "durable": true, "auto_delete": false},
                "routing_key": q.routing_key, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
                "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null
            })
        })
        .collect()
}

pub(super) fn settings(shared: &SourceState) -> BrokerSettings {
    let o = &shared.transport.options;
    let mut conf = Map::new();
    conf.insert("result_memory".into(), json!(o.result_memory));
    conf.insert(
        "result_retry_timeout".into(),
        json!(o.result_retry_timeout.as_secs_f64()),
    );
    BrokerSettings {
        url: shared.broker_url().to_string(),
        prefetch: o.prefetch,
        queues: shared.queue_names(),
        conf,
    }
}

/// Declares the queue on a channel of its own first, so a refusal never touches the running
/// consumers; then the live session consumes it.
pub(super) async fn add_consumer(shared: &SourceState, q: WantedQueue) -> Result<bool, String> {
    let queues = &shared.transport.queues;
    if queues.borrow().iter().any(|known| known.name == q.name) {
        return Ok(false);
    }
    let spec = QueueSpec {
        name: q.name,
        exchange: q.exchange,
        exchange_type: q.exchange_type,
        routing_key: q.routing_key,
    };
    shared.try_declare(&spec).await?;
    Ok(queues.send_if_modified(|queues| {
        let new = !queues.iter().any(|known| known.name == spec.name);
        if new {
            queues.push(spec);
        }
        new
    }))
}

pub(super) fn cancel_consumer(shared: &SourceState, queue: &str) {
    shared.transport.queues.send_if_modified(|queues| {
        let before = queues.len();
        queues.retain(|q| q.name != queue);
        queues.len() != before
    });
}

impl SourceState {
    /// Declares `q` (as the consumers would) on a channel of its own, so that a queue the
    /// broker refuses (a reserved `amq.` name, another connection's exclusive queue, other
    /// arguments) closes only that channel.
    async fn try_declare(&self, q: &QueueSpec) -> Result<(), String> {
        for name in [&q.name, &q.exchange, &q.routing_key] {
            if name.len() > 255 {
                return Err(format!(
                    "`{}...` is longer than AMQP's 255-byte limit",
                    &name[..32]
                ));
            }
        }
        let args = super::value::json_to_table(&self.transport.options.queue_arguments);
        let mut how = self.transport.options.declare;
        loop {
            let channel = self.own_channel().await?;
            let declared = super::consumers::declare(&channel, q, how, &args).await;
            if channel.status().connected() {
                let _ = channel.close(200, "declared".into()).await;
            }
            match declared {
                // It exists with other arguments: the consumer takes it as it is.
                Err(e) if super::consumers::inequivalent(&e) && how == Declare::Kombu => {
                    how = Declare::Passive;
                }
                other => return other.map_err(|e| e.to_string()),
            }
        }
    }
}

/// Answers one remote-control message addressed to this node.
pub(super) async fn answer(shared: &SourceState, channel: &Channel, delivery: Delivery) {
    let node = shared.engine.nodename();
    let Some(reply) = pidbox::answer(&delivery.data, &node, shared).await else {
        return;
    };
    let (Ok(exchange), Ok(routing_key)) = (
        lapin::types::ShortString::try_new(reply.exchange.as_str()),
        lapin::types::ShortString::try_new(reply.routing_key.as_str()),
    ) else {
        tracing::warn!("not answering remote control `{}`: its reply exchange or routing key is longer than AMQP's 255-byte limit", reply.method);
        return;
    };
    let mut headers = FieldTable::default();
    if let Some(ticket) = &reply.ticket {
        headers.insert("ticket".into(), json_to_amqp(&json!(ticket)));
    }
    headers.insert("clock".into(), AMQPValue::LongLongInt(0));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(1);
    if let Err(e) = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            &reply.body,
            props,
        )
        .await
    {
        tracing::warn!("cannot answer remote control `{}`: {e}", reply.method);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_masked_as_celery_masks_them() {
        assert_eq!(
            crate::source::engine::remote::mask_password("amqp://guest:secret@host:5672//"),
            "amqp://guest:********@host:5672//"
        );
        assert_eq!(
            crate::source::engine::remote::mask_password("amqp://host//"),
            "amqp://host//"
        );
    }
}
