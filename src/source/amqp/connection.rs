//! The broker connection: connect, declare (kombu-exact task queues, the exclusive pidbox
//! queue), consume, and hand each delivery to its handler; reconnect when the connection is
//! lost, at once the first time, then with the restart policy's backoff.

use super::acks::Tag;
use super::consumers::{self, Consumers, Relay, Relayed, QUEUE_RETRY_MAX, QUEUE_RETRY_MIN};
use super::{monitor, receive, redact, remote, SessionRequest, SourceState};
use crate::metrics::Settled;
use crate::supervisor::restart;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// True for the broker's 405 RESOURCE_LOCKED: another connection holds an exclusive queue.
fn resource_locked(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

enum SessionEnd {
    Finished,
    /// The connection failed; `was_up` if it had been consuming.
    Lost {
        reason: String,
        was_up: bool,
    },
}

pub(super) async fn connection_loop(shared: Arc<SourceState>) {
    // After losing a connection that was up, the first attempt is immediate; failed attempts
    // back off like plugin restarts: RECONNECT_MIN doubling, with jitter, up to RECONNECT_MAX.
    let mut failures = 0;
    loop {
        let began = Instant::now();
        match session(&shared).await {
            SessionEnd::Finished => return,
            SessionEnd::Lost { reason, was_up } => {
                shared.transport.results.send_replace(None);
                shared.transport.connected.send_replace(false);
                shared.engine.dispatcher.metrics().broker_connected(false);
                if was_up && began.elapsed() > Duration::from_secs(1) {
                    failures = 0;
                }
                let wait = restart::delay(failures, RECONNECT_MIN, RECONNECT_MAX, fastrand::f64());
                failures += 1;
                let when = match wait.is_zero() {
                    true => "at once".to_string(),
                    false => format!("in {wait:?}"),
                };
                let hint = super::tls::hint(&reason);
                let failed = shared.broker_url().to_string();
                // Celery's failover: the next URL after each lost or refused connection.
                shared.next_broker();
                let next = match shared.broker_url() == failed {
                    true => String::new(),
                    false => format!(" to {}", redact(shared.broker_url())),
                };
                // A failure repeated while the broker stays away (a wrong password, a node
                // down) is named once; each loss of a connection that was up is news.
                let news = shared
                    .engine
                    .dispatcher
                    .metrics()
                    .broker()
                    .lost(&redact(&failed), &reason);
                if news || was_up {
                    let quiet = match was_up {
                        true => "",
                        false => ". Until a connection comes up, the same failure again is logged at debug level only; `worker plugins list` shows the broker's state",
                    };
                    tracing::warn!(
                        broker = %redact(&failed),
                        "broker connection lost or refused ({reason}){hint}; reconnecting{next} {when}. Plugins keep running; results of running tasks are published after reconnecting{quiet}"
                    );
                } else {
                    tracing::debug!(broker = %redact(&failed), "broker connection refused again ({reason}); reconnecting{next} {when}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.engine.finished.cancelled() => return,
                }
            }
        }
    }
}

async fn declare_pidbox(channel: &Channel, nodename: &str) -> lapin::Result<String> {
    let ex = ExchangeDeclareOptions {
        durable: false,
        auto_delete: false,
        ..Default::default()
    };
    channel
        .exchange_declare(
            "celery.pidbox".into(),
            ExchangeKind::Fanout,
            ex,
            FieldTable::default(),
        )
        .await?;
    let queue = format!("{nodename}.celery.pidbox");
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(300_000));
    args.insert("x-expires".into(), AMQPValue::LongInt(10_000));
    let opts = QueueDeclareOptions {
        durable: false,
        auto_delete: true,
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), opts, args)
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            "celery.pidbox".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// One connection, from connecting to its loss. Errors before consuming mean it never was up.
async fn session(shared: &Arc<SourceState>) -> SessionEnd {
    match open_session(shared).await {
        Ok(end) => end,
        Err(e) => SessionEnd::Lost {
            reason: e.to_string(),
            was_up: false,
        },
    }
}

async fn open_session(shared: &Arc<SourceState>) -> lapin::Result<SessionEnd> {
    let o = &shared.transport.options;
    let props =
        ConnectionProperties::default().with_connection_name(shared.engine.nodename().into());
    let conn = o.tls.connect(shared.broker_url(), props).await?;
    let consume = conn.create_channel().await?;
    let results = conn.create_channel().await?;
    results
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    consume
        .basic_qos(o.prefetch, BasicQosOptions { global: false })
        .await?;
    let (control, pidbox_queue) = claim_pidbox(shared, &conn).await?;
    let events = conn.create_channel().await?;
    monitor::declare(&events).await?;
    let parking = match super::delayed::declare(&conn).await {
        Ok(()) => true,
        Err(e) if super::publish::refused_by_broker(&e) => {
            tracing::warn!("cannot declare the delay queues ({e}); countdown and eta tasks are held here, unacked, until due");
            false
        }
        Err(e) => return Err(e),
    };
    shared
        .transport
        .parking
        .store(parking, std::sync::atomic::Ordering::Relaxed);
    let (tx, deliveries) = mpsc::channel::<Relayed>(256);
    let mut consumers = Consumers::new(consume.clone(), o.prefetch, tx.clone());
    let wanted = shared.transport.queues.borrow().clone();
    let board = shared.engine.dispatcher.metrics().broker();
    board.new_session();
    board.want(wanted.iter().map(|q| q.name.as_str()));
    for q in &wanted {
        // A queue the broker refuses is left out; the session tries it again with backoff.
        consumers.start_reported(shared, &conn, q, false).await?;
    }
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let pidbox = control
        .basic_consume(
            pidbox_queue.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await?;
    // Dropped with the session: the pidbox relay and the event loop of a dead connection stop
    // with it (the consumers' relays stop with `consumers`).
    let _pidbox = consumers::relay(pidbox, None, None, tx, 0);
    let _events =
        AbortOnDropHandle::new(tokio::spawn(monitor::run(shared.clone(), events.clone())));
    shared
        .transport
        .results
        .send_replace(Some((shared.next_channel_number(), results.clone())));
    shared.transport.connected.send_replace(true);
    shared.engine.dispatcher.metrics().broker_connected(true);
    board.connected(&redact(shared.broker_url()));
    tracing::info!(
        broker = %redact(shared.broker_url()),
        queues = %shared.queue_names().join(","),
        node = %shared.engine.nodename(),
        prefetch = o.prefetch,
        results = shared.result_backend.as_ref().map_or("rpc://", |r| r.url()),
        "consuming Celery tasks"
    );
    let mut session = Session {
        conn: &conn,
        control: &control,
        events: &events,
        consumers,
    };
    Ok(session.serve(shared, deliveries).await)
}

/// Declares this node's pidbox queue. It is exclusive: a second process with our node name
/// gets RESOURCE_LOCKED, and then this one takes a per-process name instead.
async fn claim_pidbox(shared: &SourceState, conn: &Connection) -> lapin::Result<(Channel, String)> {
    let control = conn.create_channel().await?;
    match declare_pidbox(&control, &shared.engine.nodename()).await {
        Ok(q) => Ok((control, q)),
        Err(e) if resource_locked(&e) => {
            let taken = shared.engine.nodename();
            let (name, host) = taken
                .split_once('@')
                .unwrap_or((taken.as_str(), "localhost"));
            let unique = format!("{name}-{}@{host}", std::process::id());
            tracing::warn!("node name {taken} is in use by another worker; this one answers remote control as {unique}");
            *crate::sync::lock(&shared.engine.nodename) = unique.clone();
            let control = conn.create_channel().await?;
            let q = declare_pidbox(&control, &unique).await?;
            Ok((control, q))
        }
        Err(e) => Err(e),
    }
}

/// The channels of a connected session.
struct Session<'a> {
    conn: &'a Connection,
    control: &'a Channel,
    /// Celery events (`celeryev`), published by `monitor::run`.
    events: &'a Channel,
    consumers: Consumers,
}

impl Session<'_> {
    /// Hands each delivery to its handler until the connection is lost or the worker stops.
    async fn serve(
        &mut self,
        shared: &Arc<SourceState>,
        mut deliveries: mpsc::Receiver<Relayed>,
    ) -> SessionEnd {
        // Fired when this session ends, so eta holds let their deliveries go back to the broker.
        let lost = CancellationToken::new();
        let _lost_guard = lost.clone().drop_guard();
        let mut cancelled = false;
        let mut queues = shared.transport.queues.subscribe();
        let mut inbox = shared.transport.session_inbox.lock().await;
        // Wanted queues the broker refused (not there yet for a passive declare, another
        // connection's exclusive queue...) are tried again with backoff, the others consumed.
        let mut refused = 0;
        let retry_in = |refused: u32| {
            restart::delay(refused, QUEUE_RETRY_MIN, QUEUE_RETRY_MAX, fastrand::f64())
        };
        let mut retry = tokio::time::Instant::now() + retry_in(refused);
        loop {
            let missing = !cancelled && self.consumers.missing(&queues.borrow());
            tokio::select! {
                Some(request) = inbox.recv() => {
                    if let Err(reason) = self.answer(shared, request).await {
                        return SessionEnd::Lost { reason, was_up: true };
                    }
                }
                _ = tokio::time::sleep_until(retry), if missing => {
                    let wanted = queues.borrow().clone();
                    self.consumers.follow(shared, self.conn, &wanted).await;
                    refused += 1;
                    retry = tokio::time::Instant::now() + retry_in(refused);
                }
                _ = queues.changed(), if !cancelled => {
                    let wanted = queues.borrow_and_update().clone();
                    shared.engine.dispatcher.metrics().broker().want(wanted.iter().map(|q| q.name.as_str()));
                    self.consumers.follow(shared, self.conn, &wanted).await;
                    refused = 0;
                    retry = tokio::time::Instant::now() + retry_in(refused);
                }
                d = deliveries.recv() => match d {
                    Some((queue, Relay::Delivery(Ok(delivery)))) => self.dispatch(shared, queue, delivery, &lost).await,
                    Some((Some(_), Relay::Delivery(Err(e)))) if !cancelled && self.conn.status().connected() => {
                        match self.consumers.reopen(self.conn).await {
                            Ok(true) => {
                                tracing::warn!("the broker closed the task consumers' channel ({e}); consuming on a new channel (tasks running go on; their messages come back and join them)");
                                refused = 0;
                                retry = tokio::time::Instant::now();
                            }
                            Ok(false) => {}
                            Err(e) => return SessionEnd::Lost { reason: e.to_string(), was_up: true },
                        }
                    }
                    Some((_, Relay::Delivery(Err(e)))) => return SessionEnd::Lost { reason: e.to_string(), was_up: true },
                    Some((Some(queue), Relay::Ended(start))) => {
                        if !cancelled && self.consumers.ended(&queue, start) {
                            tracing::warn!(queue = %queue, "the consumer of {queue} was cancelled by the broker (queue deleted, or its node gone); declaring and consuming it again");
                            refused = 0;
                            retry = tokio::time::Instant::now() + retry_in(refused);
                        }
                    }
                    Some((None, Relay::Ended(_))) => return SessionEnd::Lost { reason: "the broker cancelled the remote-control consumer".into(), was_up: true },
                    None => return SessionEnd::Lost { reason: "the broker closed the consumers".into(), was_up: true },
                },
                _ = shared.engine.stopping.cancelled(), if !cancelled => {
                    cancelled = true;
                    self.consumers.cancel_all().await;
                    tracing::info!("stopped consuming; finishing tasks in flight");
                }
                _ = shared.engine.finished.cancelled() => {
                    // Handlers that answered flushed their acks; any still pending go now.
                    self.consumers.flush_acks().await;
                    monitor::offline(shared, self.events).await;
                    shared.transport.results.send_replace(None);
                    let _ = self.conn.close(200, "worker stopping".into()).await;
                    return SessionEnd::Finished;
                }
            }
        }
    }

    /// Opens a channel for a caller, or replaces a results channel the broker closed (a
    /// refused publish closes the channel it was sent on, never the connection). An error
    /// ends the session: the connection itself is gone.
    async fn answer(&self, shared: &SourceState, request: SessionRequest) -> Result<(), String> {
        match request {
            SessionRequest::Channel(reply) => {
                // A caller that gave up meanwhile leaves no channel open behind it.
                if let Err(Ok(channel)) = reply.send(self.conn.create_channel().await) {
                    let _ = channel.close(200, "unused".into()).await;
                }
                Ok(())
            }
            SessionRequest::ResultsFailed(number) => {
                let current = shared.transport.results.borrow().clone();
                let Some((n, channel)) = current else {
                    return Ok(());
                };
                if n != number || channel.status().connected() {
                    return Ok(());
                }
                let reopened = async {
                    let channel = self.conn.create_channel().await?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await?;
                    lapin::Result::Ok(channel)
                };
                let channel = reopened.await.map_err(|e| {
                    format!(
                        "the broker closed the results channel and another cannot be opened ({e})"
                    )
                })?;
                tracing::warn!("the broker closed the results channel (a publish it refused); results go on a new channel");
                shared
                    .transport
                    .results
                    .send_replace(Some((shared.next_channel_number(), channel)));
                Ok(())
            }
        }
    }

    /// A remote-control message or a task message (with its tag on the consumers' channel),
    /// each to its tracked handler.
    async fn dispatch(
        &self,
        shared: &Arc<SourceState>,
        queue: Option<Arc<str>>,
        (delivery, tag): (Delivery, Option<Tag>),
        lost: &CancellationToken,
    ) {
        // A task queue delivers whatever its bindings route to it: a task published through a
        // fanout exchange (an empty routing key) is a task like any other.
        let pidbox = delivery.exchange.as_str() == "celery.pidbox";
        match queue.zip(tag) {
            None => {
                let (state, control) = (shared.clone(), self.control.clone());
                shared
                    .engine
                    .handlers
                    .spawn(async move { remote::answer(&state, &control, delivery).await });
            }
            // A task queue bound to the pidbox exchange: the control message is answered and
            // acked, or it would hold a prefetch slot until the channel closed.
            Some((_, tag)) if pidbox => {
                let (state, control) = (shared.clone(), self.control.clone());
                shared.engine.handlers.spawn(async move {
                    remote::answer(&state, &control, delivery).await;
                    tag.ack().await;
                });
            }
            Some((_, tag)) if shared.engine.stopping.is_cancelled() => {
                shared.reject(&tag, Settled::Requeued).await;
            }
            Some((queue, tag)) => {
                let (state, lost) = (shared.clone(), lost.clone());
                // Boxed: the handler's future is large, and spawning moved it by value twice
                // (about 2% of the worker's time under load, in memcpy).
                let handler = Box::pin(receive::handle(state, queue, delivery, tag, lost));
                shared.engine.handlers.spawn(handler);
            }
        }
    }
}
