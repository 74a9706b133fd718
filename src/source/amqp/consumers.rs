//! The task-queue consumers of one broker session: each wanted queue declared (as Celery
//! declares it, or passively) and consumed into the session's single delivery stream, and the
//! set changed while connected as `celery control add_consumer` / `cancel_consumer` change
//! the wanted list.

use super::acks::{ChannelAcks, Tag};
use super::{Declare, QueueSpec, SourceState};
use futures_lite::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// What a consumer relays, with the task queue it reads (`None`: the pidbox).
pub(super) type Relayed = (Option<Arc<str>>, Relay);

// Deliveries are the hot path: boxing them would allocate once per message for the rare end.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Relay {
    /// A delivery, and for a task queue's how to settle it (its tag on the consumers' channel,
    /// recorded there as it was handed on; the pidbox consumes without acks).
    Delivery(lapin::Result<(Delivery, Option<Tag>)>),
    /// The consumer of this start (see [`Consumers::start`]) ended without the worker asking:
    /// the broker cancelled it (the queue was deleted, its node went away).
    Ended(u64),
}

/// Declares `q` as kombu does (durable exchange of its type, durable queue with `args`, bound
/// with its routing key), or checks that it exists (`passive`).
pub(super) async fn declare(
    channel: &Channel,
    q: &QueueSpec,
    how: Declare,
    args: &FieldTable,
) -> lapin::Result<()> {
    if how == Declare::Passive {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .queue_declare(q.name.as_str().into(), opts, FieldTable::default())
            .await?;
        return Ok(());
    }
    let kind = match q.exchange_type.as_str() {
        "topic" => ExchangeKind::Topic,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Direct,
    };
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            q.exchange.as_str().into(),
            kind,
            durable,
            FieldTable::default(),
        )
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(q.name.as_str().into(), durable, args.clone())
        .await?;
    channel
        .queue_bind(
            q.name.as_str().into(),
            q.exchange.as_str().into(),
            q.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Backoff for a wanted queue the broker refuses to declare or consume.
pub(super) const QUEUE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(250);
pub(super) const QUEUE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// True for the broker's 406 PRECONDITION_FAILED: the queue exists with other arguments.
pub(super) fn inequivalent(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Declares `q` on a channel of its own and returns that channel; a queue that exists with
/// other arguments (a client declared it quorum, with a priority, a dead-letter exchange...) is
/// taken as it is, with one warning per queue naming what differs and the setting that would
/// match it. Never a reconnect for it.
async fn declare_or_take(
    shared: &SourceState,
    conn: &Connection,
    q: &QueueSpec,
) -> lapin::Result<Channel> {
    let args = super::value::json_to_table(&shared.transport.options.queue_arguments);
    let probe = conn.create_channel().await?;
    match declare(&probe, q, shared.transport.options.declare, &args).await {
        Err(e) if inequivalent(&e) && shared.transport.options.declare == Declare::Kombu => {
            let probe = conn.create_channel().await?;
            declare(&probe, q, Declare::Passive, &args).await?;
            if shared
                .engine
                .dispatcher
                .metrics()
                .broker()
                .differs(&q.name, &e.to_string())
            {
                tracing::warn!(queue = %q.name, "queue {} exists with other arguments than this worker declares ({e}); consuming it as it is. To declare it the same way, set `queue_type` (classic or quorum) and `queue_arguments` in worker.toml", q.name);
            }
            Ok(probe)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(probe),
    }
}

/// What an operator can do about the broker's refusal of a queue.
fn refusal_hint(reason: &str, declare: Declare) -> &'static str {
    if reason.contains("NOT_FOUND") && declare == Declare::Passive {
        " (with `queue_declare = \"passive\"` the worker declares nothing: declare the queue, or set `queue_declare = \"kombu\"`)"
    } else if reason.contains("ACCESS_REFUSED") {
        " (the broker user needs configure, write and read permission on the queue and its exchange, and names starting with `amq.` are reserved)"
    } else if reason.contains("RESOURCE_LOCKED") {
        " (another connection holds it as an exclusive queue)"
    } else {
        ""
    }
}

/// Relays one consumer's deliveries into the session's single stream, then says when it
/// ended (`start` tells which start of the queue's consumer it is). A task queue's
/// deliveries are recorded in `acks`, the acks of the channel it is consumed on.
pub(super) fn relay(
    mut consumer: lapin::Consumer,
    queue: Option<Arc<str>>,
    acks: Option<Arc<ChannelAcks>>,
    tx: mpsc::Sender<Relayed>,
    start: u64,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            let failed = d.is_err();
            let d = d.map(|d| {
                let tag = acks.as_ref().map(|a| a.delivered(d.delivery_tag));
                (d, tag)
            });
            if tx.send((queue.clone(), Relay::Delivery(d))).await.is_err() || failed {
                return;
            }
        }
        let _ = tx.send((queue, Relay::Ended(start))).await;
    }))
}

/// The consumers of the task queues on one session's channel, by queue name.
pub(super) struct Consumers {
    channel: Channel,
    /// The acks of `channel`'s deliveries (replaced with it).
    acks: Arc<ChannelAcks>,
    prefetch: u16,
    tx: mpsc::Sender<Relayed>,
    /// Consumer tag, start number and relay of each consumed queue.
    running: BTreeMap<String, (String, u64, AbortOnDropHandle<()>)>,
    starts: u64,
    /// Relays of cancelled consumers: they still hand on what the broker had sent before the
    /// cancel (so it is answered, not held unacked), until the session ends.
    retired: Vec<AbortOnDropHandle<()>>,
}

impl Consumers {
    /// The consumers on `channel`, whose prefetch is `prefetch`.
    pub(super) fn new(channel: Channel, prefetch: u16, tx: mpsc::Sender<Relayed>) -> Consumers {
        Consumers {
            acks: ChannelAcks::new(channel.clone(), prefetch),
            channel,
            prefetch,
            tx,
            running: BTreeMap::new(),
            starts: 0,
            retired: Vec::new(),
        }
    }

    /// Declares and consumes `q` (nothing if it is consumed already). The declaration goes on
    /// a channel of its own: a queue the broker refuses (reserved name, another connection's
    /// exclusive queue, other arguments) closes only that channel, never the consumers'.
    pub(super) async fn start(
        &mut self,
        shared: &SourceState,
        conn: &Connection,
        q: &QueueSpec,
    ) -> lapin::Result<()> {
        if self.running.contains_key(&q.name) {
            return Ok(());
        }
        let probe = declare_or_take(shared, conn, q).await?;
        // So that parked eta tasks (and Celery clients' delayed ones) come back to it.
        if let Err(e) = super::delayed::bind(&probe, q).await {
            tracing::warn!(queue = %q.name, "cannot bind the queue to the delay exchange ({e}); countdown and eta tasks are held here, unacked, until due");
            shared
                .transport
                .parking
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        if probe.status().connected() {
            let _ = probe.close(200, "declared".into()).await;
        }
        let tag = format!("{}-{}", shared.engine.nodename(), q.name);
        let consumer = self
            .channel
            .basic_consume(
                q.name.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.starts += 1;
        let relay = relay(
            consumer,
            Some(q.name.as_str().into()),
            Some(self.acks.clone()),
            self.tx.clone(),
            self.starts,
        );
        self.running
            .insert(q.name.clone(), (tag, self.starts, relay));
        Ok(())
    }

    /// Starts `q` and records how it went on the broker board. A queue the broker refuses
    /// (it closed only the declaring channel) is logged once while the same refusal lasts, and
    /// left for the session to try again with backoff; `Ok(false)` then. A queue consumed
    /// after a refusal is logged, others only when `announce`. Errors of the connection
    /// itself are returned.
    pub(super) async fn start_reported(
        &mut self,
        shared: &SourceState,
        conn: &Connection,
        q: &QueueSpec,
        announce: bool,
    ) -> lapin::Result<bool> {
        let board = shared.engine.dispatcher.metrics().broker();
        match self.start(shared, conn, q).await {
            Ok(()) => {
                match board.consuming(&q.name) {
                    Some(was) => {
                        tracing::info!(queue = %q.name, "consuming from {}, which the broker had refused ({was})", q.name)
                    }
                    None if announce => {
                        tracing::info!(queue = %q.name, "consuming from {}", q.name)
                    }
                    None => {}
                }
                Ok(true)
            }
            Err(e) if super::publish::refused_by_broker(&e) => {
                let reason = e.to_string();
                match board.refused(&q.name, &reason) {
                    true => {
                        tracing::error!(queue = %q.name, "cannot consume from {}: {reason}{}. Tried again with backoff (up to {:?} apart) and logged again only if the reason changes; `worker plugins list` shows the queue's state", q.name, refusal_hint(&reason, shared.transport.options.declare), QUEUE_RETRY_MAX)
                    }
                    false => {
                        tracing::debug!(queue = %q.name, "cannot consume from {} yet: {reason}", q.name)
                    }
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the consumers' channel after the broker closed it while the connection lives
    /// (a delivery unacked past `consumer_timeout`, a channel error): a new channel with the
    /// same prefetch; the queues are consumed again by the session's next `follow`. The
    /// deliveries of the closed channel went back to their queues: copies that come again
    /// join their owners. False if the channel is open (an error of a channel replaced
    /// already). The new channel's tags start again at 1: it has acks of its own, and what
    /// the old one had pending is dropped with it.
    pub(super) async fn reopen(&mut self, conn: &Connection) -> lapin::Result<bool> {
        if self.channel.status().connected() {
            return Ok(false);
        }
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await?;
        // Their consumers went with the channel; what their relays still hold is handed on.
        let gone = std::mem::take(&mut self.running);
        self.retired
            .extend(gone.into_values().map(|(_, _, relay)| relay));
        self.acks = ChannelAcks::new(channel.clone(), self.prefetch);
        self.channel = channel;
        Ok(true)
    }

    /// Sends the acks still waiting on the consumers' channel (a graceful stop, before the
    /// connection closes: an answered message left unacked would be delivered again).
    pub(super) async fn flush_acks(&self) {
        self.acks.flush().await;
    }

    /// Stops consuming `queue`. Deliveries already relayed are still handled (and acked).
    pub(super) async fn cancel(&mut self, queue: &str) {
        let Some((tag, _, relay)) = self.running.remove(queue) else {
            return;
        };
        self.retired.push(relay);
        let cancel = self
            .channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        if let Err(e) = cancel.await {
            tracing::warn!("cannot cancel the consumer of queue {queue}: {e}");
        }
    }

    /// Makes the consumed queues the `wanted` ones. A queue that cannot be declared or
    /// consumed is logged and left out (it may come back through `add_consumer`).
    pub(super) async fn follow(
        &mut self,
        shared: &SourceState,
        conn: &Connection,
        wanted: &[QueueSpec],
    ) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.iter().any(|q| &q.name == *name))
            .cloned()
            .collect();
        for queue in gone {
            self.cancel(&queue).await;
            tracing::info!(queue, "no longer consuming from {queue} (remote control)");
        }
        for q in wanted {
            if self.running.contains_key(&q.name) {
                continue;
            }
            if let Err(e) = self.start_reported(shared, conn, q, true).await {
                tracing::error!(queue = %q.name, "cannot consume from {}: {e}", q.name)
            }
        }
    }

    /// Forgets the consumer of `queue` that the broker cancelled (if it is still the one of
    /// that `start`), so it is declared and consumed again like a refused queue. True if it
    /// was.
    pub(super) fn ended(&mut self, queue: &str, start: u64) -> bool {
        match self.running.get(queue) {
            Some((_, s, _)) if *s == start => {
                self.running.remove(queue);
                true
            }
            _ => false,
        }
    }

    /// True if a wanted queue is not consumed (the broker refused it).
    pub(super) fn missing(&self, wanted: &[QueueSpec]) -> bool {
        wanted.iter().any(|q| !self.running.contains_key(&q.name))
    }

    /// Stops consuming every queue (the worker is stopping).
    pub(super) async fn cancel_all(&mut self) {
        let queues: Vec<String> = self.running.keys().cloned().collect();
        for queue in queues {
            self.cancel(&queue).await;
        }
    }
}
