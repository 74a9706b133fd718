//! The benchmark's ceiling: a bare lapin loop that consumes Celery task messages, publishes a
//! SUCCESS reply (publisher confirms on, like `worker`) and acks, with no plugin in between.
//! Usage: amqp-ceiling AMQP_URL QUEUE [PREFETCH (default 64)]. Not a worker: it runs nothing.

use futures_lite::stream::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, queue) = (&args[1], &args[2]);
    let prefetch: u16 = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(64);
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let consume = conn.create_channel().await.expect("channel");
    let results = conn.create_channel().await.expect("channel");
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
    while let Some(Ok(d)) = consumer.next().await {
        let results = results.clone();
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
            let _ = d.ack(BasicAckOptions::default()).await;
        });
    }
}
