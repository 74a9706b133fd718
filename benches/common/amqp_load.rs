//! The AMQP bench's load: queues declared as Celery declares them, N protocol-v2 task messages
//! published exactly as the Python client does (reply_to = one replies queue), and the replies
//! counted as they come back, per task queue.

use futures_lite::stream::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use std::time::{Duration, Instant};

pub const REPLIES: &str = "bench.replies";

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// Declares (durable exchange + queue + binding, like Celery) and empties each task queue, and
/// the replies queue.
pub async fn declare(ch: &Channel, queues: &[String]) {
    for q in queues {
        let ex = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            q.as_str().into(),
            ExchangeKind::Direct,
            ex,
            FieldTable::default(),
        )
        .await
        .unwrap();
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(q.as_str().into(), opts, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            q.as_str().into(),
            q.as_str().into(),
            q.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    ch.queue_declare(
        REPLIES.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge(REPLIES.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// Publishes `n` task messages for `task`, spread evenly over `queues` (persistent, confirmed).
/// Task ids start `bench-q<index of the queue>-`, so replies can be told apart by queue.
pub async fn preload(ch: &Channel, task: &str, queues: &[String], n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    let body = br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    let mut pending = Vec::with_capacity(1000);
    for i in 0..n {
        let q = i % queues.len();
        let id = format!("bench-q{q}-{i}-{}", fastrand::u64(..));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(REPLIES.into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers(task, &id));
        pending.push(
            ch.basic_publish(
                "".into(),
                queues[q].as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap(),
        );
        if pending.len() == 1000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

/// Celery protocol v2 headers, as `send_task` writes them.
fn headers(task: &str, id: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("lang".into(), s("py"));
    h.insert("task".into(), s(task));
    h.insert("id".into(), s(id));
    h.insert("root_id".into(), s(id));
    h.insert("retries".into(), AMQPValue::LongInt(0));
    let mut tl = FieldArray::default();
    tl.push(AMQPValue::Void);
    tl.push(AMQPValue::Void);
    h.insert("timelimit".into(), AMQPValue::FieldArray(tl));
    for k in ["eta", "expires", "group", "parent_id", "shadow"] {
        h.insert(k.into(), AMQPValue::Void);
    }
    h.insert("argsrepr".into(), s("()"));
    h.insert("kwargsrepr".into(), s("{}"));
    h
}

/// When the SUCCESS replies of one task queue came: the first, the last, and how many.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub first: Instant,
    pub last: Instant,
    pub count: usize,
}

impl Span {
    /// Replies per second from the first to the last (start-up excluded).
    pub fn rate(&self) -> f64 {
        (self.count.max(2) - 1) as f64 / (self.last - self.first).as_secs_f64().max(1e-9)
    }
}

/// What the counting saw: every queue's span, and the span of all replies together.
#[derive(Debug, Clone)]
pub struct Replies {
    pub all: Span,
    pub per_queue: Vec<Span>,
}

/// Counts SUCCESS replies until `n` arrived (None if `limit` passes first); `at_first` runs
/// when the first one arrives (the bench reads CPU counters there).
pub async fn count_replies(
    ch: &Channel,
    n: usize,
    queues: usize,
    limit: Duration,
    mut at_first: impl FnMut(),
) -> Option<Replies> {
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(REPLIES.into(), "".into(), no_ack, FieldTable::default())
        .await
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut spans: Vec<Option<Span>> = vec![None; queues];
    let mut seen = 0;
    while seen < n {
        let left = deadline.checked_duration_since(Instant::now())?;
        let d = tokio::time::timeout(left, consumer.next())
            .await
            .ok()??
            .ok()?;
        if !d.data.windows(9).any(|w| w == b"\"SUCCESS\"") {
            continue;
        }
        let now = Instant::now();
        if seen == 0 {
            at_first();
        }
        seen += 1;
        let q = queue_of(&d.data).min(queues - 1);
        let span = spans[q].get_or_insert(Span {
            first: now,
            last: now,
            count: 0,
        });
        span.last = now;
        span.count += 1;
    }
    let per_queue: Vec<Span> = spans.into_iter().flatten().collect();
    let all = Span {
        first: per_queue.iter().map(|s| s.first).min()?,
        last: per_queue.iter().map(|s| s.last).max()?,
        count: n,
    };
    Some(Replies { all, per_queue })
}

/// The queue index in a reply's task id (`bench-q<index>-...`).
fn queue_of(body: &[u8]) -> usize {
    let Some(at) = body.windows(7).position(|w| w == b"bench-q") else {
        return 0;
    };
    body[at + 7..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0, |n, b| n * 10 + usize::from(b - b'0'))
}
