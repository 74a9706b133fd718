//! Countdown and eta tasks wait at the broker, not in the worker. Held unacked, a task waiting
//! for its time takes a prefetch slot, so 30 countdown tasks once blocked every other task;
//! and holding 100,000 of them would keep 100,000 messages in memory. Instead, a task whose
//! eta is a second or more away is parked: published again (publisher confirms first, then
//! the original acked) into RabbitMQ's delay topology, the one Celery 5.5's native delayed
//! delivery uses (kombu `transport/native_delayed_delivery.py`), and the broker brings it back
//! to its queue when its time has come. What the worker holds is only what is due within a
//! second: bounded by a second of arrivals, never by how many tasks wait.
//!
//! The topology: topic exchanges and queues `celery_delayed_27` ... `celery_delayed_0`; level
//! n holds a message 2^n seconds (queue TTL) and dead-letters it to level n-1; level 0 to the
//! topic exchange `celery_delayed_delivery`. A message enters at level 27 with the routing key
//! `<28 binary digits of the delay, dot-separated>.<routing key>`: each level's queue takes it
//! when its bit is 1, else its exchange passes it down. Each consumed queue is bound to
//! `celery_delayed_delivery` with `#.<routing key>` (through its exchange when that is a topic
//! exchange, as Celery's worker binds it; directly otherwise, which Celery's worker does not
//! do, so the two never deliver one message twice), so Celery clients' delayed tasks arrive
//! here too. A sink queue (see [`SINK`]) keeps one task whose queue was deleted from stalling
//! the levels.

use super::QueueSpec;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

/// Levels of the topology: delays up to 2^28 - 1 seconds (8.5 years) in one trip.
const LEVELS: u32 = 28;
/// Where a parked task enters.
pub const ENTRY: &str = "celery_delayed_27";
/// Where the last level hands tasks back, by routing key, to the queues bound to it.
pub const DELIVERY: &str = "celery_delayed_delivery";
/// Bound to `DELIVERY` with `#` and keeping nothing (message TTL 0): every task the last level
/// hands back is routed at least here. The level queues dead-letter at-least-once, which holds
/// a message until some queue takes it; a task whose own queue was deleted meanwhile would be
/// held and retried for ever, and a few dozen such stalled every delayed task on the broker
/// (seen: parked tasks of deleted test queues). With the sink, such a task is dropped, as any
/// message for a queue that no longer exists is.
pub const SINK: &str = "celery_delayed_sink";
/// A task due sooner than this is held here (unacked) instead of parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// The longest routing key a parked task can carry back: AMQP's short string less the prefix.
const MAX_KEY: usize = 255 - 2 * LEVELS as usize;

fn level(n: u32) -> String {
    format!("celery_delayed_{n}")
}

/// The routing key that parks a message `delay_secs` (clamped to the topology's range) and
/// brings it back with `key`; `None` if the key is too long to carry.
pub fn routing_key(delay_secs: u64, key: &str) -> Option<String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return None;
    }
    let delay = delay_secs.clamp(1, (1 << LEVELS) - 1);
    let mut out = String::with_capacity(2 * LEVELS as usize + key.len());
    for bit in (0..LEVELS).rev() {
        out.push(if delay >> bit & 1 == 1 { '1' } else { '0' });
        out.push('.');
    }
    out.push_str(key);
    Some(out)
}

/// Whole seconds to park a task whose eta is `remaining` away; `None` to hold it here.
pub fn park_for(remaining: Duration) -> Option<u64> {
    (remaining >= PARK_AFTER).then_some(remaining.as_secs())
}

/// The pattern selecting bit `n` of the delay equal to `digit` (bit 27 comes first).
fn bit_pattern(n: u32, digit: char) -> String {
    format!("{}{digit}.#", "*.".repeat((LEVELS - 1 - n) as usize))
}

/// Declares the topology as kombu does, quorum queues by default. A level queue that already
/// exists with other arguments (declared classic by a Celery fleet) is used as it is.
pub async fn declare(conn: &Connection) -> lapin::Result<()> {
    let mut channel = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for name in (0..LEVELS).map(level).chain([DELIVERY.to_string()]) {
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    for n in (0..LEVELS).rev() {
        let name = level(n);
        let next = if n > 0 { level(n - 1) } else { DELIVERY.into() };
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-overflow".into(), text("reject-publish"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((1i64 << n) * 1000),
        );
        args.insert("x-dead-letter-exchange".into(), text(&next));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(name.as_str().into(), opts, args)
            .await;
        if let Err(e) = declared {
            if !super::publish::refused_by_broker(&e) {
                return Err(e);
            }
            // Declared otherwise by someone else (406 inequivalent arguments): use it.
            tracing::debug!(queue = %name, "delay queue exists with other arguments ({e}); using it");
            channel = conn.create_channel().await?;
        }
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                bit_pattern(n, '1').as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_bind(
                next.as_str().into(),
                name.as_str().into(),
                bit_pattern(n, '0').as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    declare_sink(&channel).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// The sink queue that keeps a task whose queue is gone from stalling the levels (see `SINK`).
async fn declare_sink(channel: &Channel) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(0));
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(SINK.into(), durable_queue, args)
        .await?;
    channel
        .queue_bind(
            SINK.into(),
            DELIVERY.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Binds `q` so that parked tasks (and Celery clients' delayed ones) with its routing key come
/// back to it: through its exchange when that is a topic exchange, as Celery's worker binds
/// it, else the queue itself.
pub async fn bind(channel: &Channel, q: &QueueSpec) -> lapin::Result<()> {
    let key = match q.routing_key.starts_with('#') {
        true => q.routing_key.clone(),
        false => format!("#.{}", q.routing_key),
    };
    if key.len() > 255 {
        return Ok(());
    }
    if q.exchange_type == "topic" {
        channel
            .exchange_bind(
                q.exchange.as_str().into(),
                DELIVERY.into(),
                key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        return channel
            .queue_bind(
                q.name.as_str().into(),
                q.exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
    }
    channel
        .queue_bind(
            q.name.as_str().into(),
            DELIVERY.into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_are_kombus_28_binary_digits() {
        let k = routing_key(5, "celery").unwrap();
        assert_eq!(k, format!("{}1.0.1.celery", "0.".repeat(25)));
        assert_eq!(k.len(), 56 + 6);
        let max = routing_key(u64::MAX, "q").unwrap();
        assert_eq!(max, format!("{}q", "1.".repeat(28)), "clamped");
        assert!(routing_key(0, "q").unwrap().starts_with(&"0.".repeat(27)));
        assert_eq!(routing_key(3, &"k".repeat(MAX_KEY + 1)), None);
        assert_eq!(routing_key(3, ""), None);
    }

    #[test]
    fn only_tasks_a_second_or_more_away_are_parked() {
        assert_eq!(park_for(Duration::from_millis(999)), None);
        assert_eq!(park_for(Duration::from_millis(1000)), Some(1));
        assert_eq!(park_for(Duration::from_millis(3_600_700)), Some(3600));
    }

    #[test]
    fn bit_patterns_select_one_digit() {
        assert_eq!(bit_pattern(27, '1'), "1.#");
        assert_eq!(bit_pattern(0, '0'), format!("{}0.#", "*.".repeat(27)));
    }
}
