//! Taking task messages: one loop takes a message (popped and recorded unacked in one script,
//! see `ops::take`) whenever the window has room, reads it and hands it to the engine's
//! delivery handler. Queues are visited as kombu visits them (priority steps first, queues in
//! round robin). Lua cannot block, so an empty round waits a moment before the next (5 ms,
//! doubling to 50 ms while nothing comes): a message waits at most that long when the worker
//! was idle, and never while it is busy.

use super::envelope::{self, KombuMessage};
use super::keys::QueueCycle;
use super::ops::{self, Taken};
use super::SourceState;
use crate::metrics::Settled;
use crate::source::engine::delivery::{self, Received};
use crate::source::engine::monitor::now_epoch;
use crate::source::engine::request::{read_task, DeliveryFacts};
use crate::supervisor::restart;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const IDLE_MIN: Duration = Duration::from_millis(5);
const IDLE_MAX: Duration = Duration::from_millis(50);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Takes messages until the worker stops consuming.
pub(super) async fn consume_loop(shared: Arc<SourceState>) {
    let t = &shared.transport;
    let mut queues = t.queues.subscribe();
    let mut cycle = QueueCycle::new(&queues.borrow_and_update());
    let mut idle = IDLE_MIN;
    let mut failures = 0;
    // Messages never leave `unacked` by a lost connection: nothing makes a handler let go.
    let never = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            p = t.window.clone().acquire_owned() => p.expect("the window is never closed"),
            _ = shared.engine.stopping.cancelled() => return,
        };
        if queues.has_changed().unwrap_or(false) {
            cycle = QueueCycle::new(&queues.borrow_and_update());
        }
        let taken = match t.connection().await {
            Ok(mut conn) => ops::take(&mut conn, &t.keys, &t.keys.watch_order(&cycle), now_epoch())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let wait = match taken {
            Ok(taken) => {
                up(&shared, &mut failures);
                match taken {
                    Some(Taken::Message {
                        queue,
                        payload,
                        tag,
                        ..
                    }) => {
                        idle = IDLE_MIN;
                        cycle.rotate(&queue);
                        t.hold(&tag);
                        let (state, lost) = (shared.clone(), never.clone());
                        // Boxed, as the AMQP source's: a large future moved once, not twice.
                        shared.engine.handlers.spawn(Box::pin(async move {
                            let _permit = permit;
                            handle(state, queue, payload, tag, lost).await
                        }));
                        continue;
                    }
                    Some(Taken::Unreadable {
                        queue,
                        payload,
                        reason,
                        ..
                    }) => {
                        tracing::error!(
                            queue,
                            bytes = payload.len(),
                            "dropping a message that is not a kombu message ({reason}): {}",
                            preview(&payload)
                        );
                        continue;
                    }
                    None => {
                        let wait = idle;
                        idle = (idle * 2).min(IDLE_MAX);
                        wait
                    }
                }
            }
            Err(e) => {
                t.connection_failed().await;
                down(&shared, &mut failures, &e)
            }
        };
        drop(permit);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // `changed` marks the new list seen, so the check above would miss it: take it now.
            _ = queues.changed() => cycle = QueueCycle::new(&queues.borrow_and_update()),
            _ = shared.engine.stopping.cancelled() => return,
        }
    }
}

/// The broker answered: the first answer after a failure says so.
fn up(shared: &SourceState, failures: &mut u32) {
    let t = &shared.transport;
    if !*t.connected.borrow() {
        t.connected.send_replace(true);
        let board = shared.engine.dispatcher.metrics().broker();
        board.connected(&t.url);
        for q in t.queues.borrow().iter() {
            board.consuming(q);
        }
        shared.engine.dispatcher.metrics().broker_connected(true);
        tracing::info!(broker = %t.url, queues = ?*t.queues.borrow(), "consuming from Redis");
    }
    *failures = 0;
}

/// The broker failed: named once per reason while it stays away; how long to wait.
fn down(shared: &SourceState, failures: &mut u32, reason: &str) -> Duration {
    let t = &shared.transport;
    let was_up = t.connected.send_replace(false);
    shared.engine.dispatcher.metrics().broker_connected(false);
    let news = shared
        .engine
        .dispatcher
        .metrics()
        .broker()
        .lost(&t.url, reason);
    let wait = restart::delay(*failures + 1, RETRY_MIN, RETRY_MAX, fastrand::f64());
    *failures += 1;
    if news || was_up {
        tracing::warn!(broker = %t.url, "Redis failed ({reason}); trying again in {wait:?}. Tasks running here go on; their results wait for Redis. `worker plugins list` shows the broker's state");
    } else {
        tracing::debug!(broker = %t.url, "Redis failed again ({reason})");
    }
    wait
}

/// The first bytes of an unreadable message, for its log line.
fn preview(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(&payload[..payload.len().min(120)]);
    format!("{text:?}")
}

/// Reads one taken message and handles it to its end; one that is not a readable task is
/// dropped (removed from `unacked`) with one log line, as a rejected AMQP message is.
async fn handle(
    shared: Arc<SourceState>,
    queue: String,
    payload: Vec<u8>,
    tag: String,
    lost: CancellationToken,
) {
    let ack: Arc<str> = tag.into();
    match read(&shared, &queue, &payload) {
        Ok((task, info, raw)) => {
            let received = Received {
                task,
                info: info.into(),
                ack,
                redelivered: raw.redelivered,
                raw,
            };
            delivery::handle(shared, queue.into(), received, lost).await
        }
        Err(why) => {
            tracing::error!(queue, delivery_tag = %ack, bytes = payload.len(), "dropping a task message: {why}");
            shared.reject(&ack, Settled::Rejected).await;
        }
    }
}

type Read = (
    crate::source::celery::CeleryTask,
    crate::source::engine::ActiveInfo,
    KombuMessage,
);

fn read(shared: &SourceState, queue: &str, payload: &[u8]) -> Result<Read, String> {
    let message =
        envelope::decode(payload, shared.transport.max_message_size).map_err(|e| e.to_string())?;
    let facts = DeliveryFacts {
        queue,
        exchange: message.exchange.as_deref().unwrap_or_default(),
        routing_key: message.routing_key.as_deref().unwrap_or(queue),
        priority: Some(message.priority),
        redelivered: message.redelivered,
        delivery_count: None,
    };
    let (task, info) = read_task(
        &message.envelope(),
        &facts,
        &shared.engine.nodename(),
        now_epoch(),
    )
    .map_err(|e| e.to_string())?;
    Ok((task, info, message))
}
