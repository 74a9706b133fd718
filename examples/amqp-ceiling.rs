//! The benchmark's ceiling: a bare lapin loop that consumes Celery task messages, publishes a
//! SUCCESS reply (publisher confirms on, like `worker`) and acks, with no plugin in between.
//! Usage: amqp-ceiling AMQP_URL QUEUE [PREFETCH (default 64)] [ACK_EVERY (default 1)]
//! [CHANNELS (default 2)]. Not a worker: it runs nothing.
//!
//! ACK_EVERY 1 acks each delivery on its own once its reply is confirmed. ACK_EVERY N > 1 is
//! the broker's ceiling with multiple-ack: one `basic.ack` `multiple` for every N deliveries
//! whose replies are all confirmed (in delivery order, so it never covers one still being
//! answered), and one for whatever is left when no reply has come for `IDLE_FLUSH`.
//!
//! CHANNELS 2 consumes on one channel and publishes the replies on another, as `worker` does;
//! CHANNELS 1 does both on one (confirms on the consuming channel): whether fewer channels
//! would be cheaper for lapin and the broker.

use futures_lite::stream::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc;

/// With ACK_EVERY > 1, what is answered but not acked yet is acked after this long without a
/// reply (the tail of a drain).
const IDLE_FLUSH: Duration = Duration::from_millis(5);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, queue) = (&args[1], &args[2]);
    let prefetch: u16 = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(64);
    let ack_every: u64 = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(1);
    let channels: u8 = args.get(5).and_then(|n| n.parse().ok()).unwrap_or(2);
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let consume = conn.create_channel().await.expect("channel");
    let results = match channels {
        1 => consume.clone(),
        _ => conn.create_channel().await.expect("channel"),
    };
    results
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    consume
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // ACK_EVERY > 1: each answered delivery's tag goes to one acker.
    let (answered, batches) = mpsc::unbounded_channel();
    let multiple = ack_every > 1;
    if multiple {
        tokio::spawn(ack_in_batches(consume.clone(), batches, ack_every));
    }
    while let Some(Ok(d)) = consumer.next().await {
        let results = results.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let id = d.properties.correlation_id().clone().unwrap_or_default();
            let reply_to = d.properties.reply_to().clone().unwrap_or_default();
            let body = format!(
                r#"{{"task_id": "{id}", "status": "SUCCESS", "result": null, "traceback": null, "children": []}}"#
            );
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(id)
                .with_delivery_mode(1);
            if let Ok(c) = results
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
            {
                let _ = c.await;
            }
            if multiple {
                let _ = answered.send(d.delivery_tag);
            } else {
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
    }
}

/// Acks `every` answered deliveries at a time with one multiple ack up to the highest tag
/// below which all are answered; the rest when the answers pause for `IDLE_FLUSH`.
async fn ack_in_batches(channel: Channel, mut answered: mpsc::UnboundedReceiver<u64>, every: u64) {
    use mpsc::error::TryRecvError;
    let mut waiting = BTreeSet::new();
    // Every tag up to `contiguous` is answered, and up to `acked` acked.
    let (mut contiguous, mut acked) = (0, 0);
    loop {
        let tag = match answered.try_recv() {
            Ok(tag) => Some(tag),
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {
                match tokio::time::timeout(IDLE_FLUSH, answered.recv()).await {
                    Ok(Some(tag)) => Some(tag),
                    Ok(None) => return,
                    Err(_) => None,
                }
            }
        };
        if let Some(tag) = tag {
            waiting.insert(tag);
            while waiting.remove(&(contiguous + 1)) {
                contiguous += 1;
            }
        }
        let due = contiguous - acked >= every || (tag.is_none() && contiguous > acked);
        if due {
            let options = BasicAckOptions { multiple: true };
            let _ = channel.basic_ack(contiguous, options).await;
            acked = contiguous;
        }
    }
}
