//! The RabbitMQ task source: consumes Celery task messages, runs them through the dispatcher,
//! and answers through Celery's rpc:// result backend, so an unmodified Celery client cannot
//! tell this worker from a Celery worker.
//!
//! Delivery guarantees: a task message is acked only after its final state is published and
//! confirmed by the broker; a worker killed at any moment loses nothing (RabbitMQ redelivers).
//! After a lost connection the worker reconnects at once (then with backoff), without touching
//! plugins; tasks already running finish and their results are published on the new
//! connection; each task id has one owner (`ledger`), so redelivered copies are acked with
//! it, or without publishing again once its result was confirmed.

mod delivery;
mod ledger;
mod publish;
mod value;

use super::pidbox;
use crate::dispatch::Dispatcher;
use futures_lite::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use ledger::Ledger;
use publish::ResultsChannel;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
pub use value::amqp_to_json;
use value::json_to_amqp;

/// How many revoked task ids are remembered, and for how long (Celery's figures).
const REVOKED_MAX: usize = 50_000;
const REVOKED_TTL: Duration = Duration::from_secs(3 * 3600);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

pub use crate::config::QueueDeclare as Declare;

#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub url: String,
    pub queues: Vec<String>,
    pub declare: Declare,
    /// Per-consumer prefetch (never global).
    pub prefetch: u16,
    pub nodename: String,
    /// Answered task ids remembered, so redelivered copies are acked without running again.
    pub result_memory: usize,
    /// How long a final state whose reply queue does not exist is retried before it is
    /// logged as undeliverable.
    pub result_retry_timeout: Duration,
}

/// A running AMQP source.
pub struct AmqpSource {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl AmqpSource {
    pub fn start(options: AmqpOptions, dispatcher: Arc<Dispatcher>) -> AmqpSource {
        let shared = Arc::new(Shared {
            nodename: Mutex::new(options.nodename.clone()),
            tasks: Mutex::new(Tasks {
                ledger: Ledger::new(options.result_memory),
                reserved: HashMap::new(),
            }),
            options,
            dispatcher,
            results: watch::channel(None).0,
            revoked: Mutex::new(Revoked::default()),
            revoke_signal: Notify::new(),
            stopping: CancellationToken::new(),
            finished: CancellationToken::new(),
            shutdown_requested: CancellationToken::new(),
            started: SystemTime::now(),
            totals: Mutex::new(BTreeMap::new()),
            handlers: TaskTracker::new(),
            connected: watch::channel(false).0,
        });
        let task = tokio::spawn(connection_loop(shared.clone()));
        AmqpSource { shared, task }
    }

    /// Fires when a `celery control shutdown` asks this worker to stop.
    pub fn shutdown_requested(&self) -> CancellationToken {
        self.shared.shutdown_requested.clone()
    }

    /// Waits until the source is connected and consuming, up to `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.connected.subscribe();
        let connected = tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await;
        matches!(connected, Ok(Ok(_)))
    }

    pub fn nodename(&self) -> String {
        self.shared.nodename()
    }

    /// Graceful stop, phase 1: consume no more; tasks not yet started go back to the queue.
    pub fn stop_consuming(&self) {
        self.shared.stopping.cancel();
        self.shared.revoke_signal.notify_waiters();
    }

    /// Phase 2: wait (up to `timeout`) for every message handler to publish and ack, then
    /// close the connection.
    pub async fn finish(self, timeout: Duration) {
        self.shared.handlers.close();
        if tokio::time::timeout(timeout, self.shared.handlers.wait())
            .await
            .is_err()
        {
            tracing::warn!("some task messages were still being answered at shutdown; RabbitMQ will redeliver them");
        }
        self.shared.finished.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// State shared by the connection loop, the message handlers and the pidbox.
pub struct Shared {
    options: AmqpOptions,
    dispatcher: Arc<Dispatcher>,
    nodename: Mutex<String>,
    /// The current result channel (publisher confirms on) and its connection's number;
    /// `None` while disconnected.
    results: watch::Sender<ResultsChannel>,
    connected: watch::Sender<bool>,
    tasks: Mutex<Tasks>,
    revoked: Mutex<Revoked>,
    /// Wakes handlers holding an eta task so they re-check revocations and stops.
    revoke_signal: Notify,
    stopping: CancellationToken,
    finished: CancellationToken,
    shutdown_requested: CancellationToken,
    started: SystemTime,
    totals: Mutex<BTreeMap<String, u64>>,
    handlers: TaskTracker,
}

/// The task ids this worker holds: owners and answered ids, and eta tasks being held.
struct Tasks {
    ledger: Ledger<Acker, ActiveInfo>,
    reserved: HashMap<String, ActiveInfo>,
}

/// What `celery inspect active` shows for a task.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveInfo {
    id: String,
    name: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    #[serde(rename = "type")]
    type_: String,
    hostname: String,
    time_start: f64,
    acknowledged: bool,
    delivery_info: Value,
    worker_pid: u32,
}

#[derive(Default)]
struct Revoked {
    map: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Revoked {
    fn insert(&mut self, id: &str) {
        let now = Instant::now();
        self.map.insert(id.to_string(), now);
        self.order.push_back((id.to_string(), now));
        self.prune(now);
    }

    fn contains(&mut self, id: &str) -> bool {
        self.prune(Instant::now());
        self.map.contains_key(id)
    }

    fn prune(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= REVOKED_MAX && now.duration_since(*at) < REVOKED_TTL {
                break;
            }
            if self.map.get(id) == Some(at) {
                self.map.remove(id);
            }
            self.order.pop_front();
        }
    }
}

impl Shared {
    pub fn nodename(&self) -> String {
        self.nodename
            .lock()
            .expect("nodename lock poisoned")
            .clone()
    }

    pub fn registered(&self) -> Vec<String> {
        self.dispatcher.task_names()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().expect("task table lock poisoned")
    }

    pub fn active(&self) -> Vec<ActiveInfo> {
        self.tasks().ledger.active()
    }

    pub fn reserved(&self) -> Vec<ActiveInfo> {
        self.tasks().reserved.values().cloned().collect()
    }

    fn count_answered(&self, task: &str) {
        *self
            .totals
            .lock()
            .expect("totals lock poisoned")
            .entry(task.to_string())
            .or_default() += 1;
    }

    pub fn active_queues(&self) -> Vec<Value> {
        self.options
            .queues
            .iter()
            .map(|q| {
                json!({
                    "name": q, "exchange": {"name": q, "type": "direct", "durable": true, "auto_delete": false},
                    "routing_key": q, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
                    "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null
                })
            })
            .collect()
    }

    pub async fn stats(&self) -> Value {
        let plugins = self.dispatcher.status().await;
        let processes: Vec<u32> = plugins
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect();
        let capacity = self.dispatcher.capacity();
        let uptime = self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        json!({
            "pid": std::process::id(),
            "clock": "0",
            "uptime": uptime,
            "total": *self.totals.lock().expect("totals lock poisoned"),
            "pool": {
                "implementation": "worker (out-of-process plugins)",
                "max-concurrency": capacity,
                "processes": processes,
                "prefetch_count": self.options.prefetch,
            },
            "broker": { "transport": "amqp", "hostname": redact(&self.options.url) },
            "prefetch_count": self.options.prefetch,
            "plugins": plugins.iter().map(|p| json!({
                "name": p.name, "version": p.version, "state": p.state.to_string(), "tasks": p.tasks,
                "instances": p.instances.len(), "queued": p.queued,
            })).collect::<Vec<_>>(),
            "worker": { "name": crate::WORKER_NAME, "version": crate::WORKER_VERSION },
        })
    }

    /// Remembers the ids as revoked; with `terminate`, running ones are cancelled (then killed
    /// after the plugin's cancel grace) and answered REVOKED ("terminated").
    pub async fn revoke(&self, ids: &[String], terminate: bool) {
        let mut to_cancel = Vec::new();
        {
            let mut revoked = self.revoked.lock().expect("revoked lock poisoned");
            let mut tasks = self.tasks();
            for id in ids {
                revoked.insert(id);
                if tasks.ledger.owns(id) {
                    if terminate {
                        tasks.ledger.mark_revoked(id, "terminated");
                    }
                    to_cancel.push((id.clone(), terminate));
                }
            }
        }
        self.revoke_signal.notify_waiters();
        for (id, terminate) in to_cancel {
            if terminate {
                self.dispatcher.cancel(&id, "revoked (terminate)").await;
            } else {
                // Not started yet (waiting for a free plugin slot): drop it; REVOKED follows.
                if self.dispatcher.cancel_queued(&id, "revoked").await {
                    self.tasks().ledger.mark_revoked(&id, "revoked");
                }
            }
        }
    }

    pub fn request_shutdown(&self) {
        tracing::info!("shutdown requested through remote control");
        self.shutdown_requested.cancel();
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .expect("revoked lock poisoned")
            .contains(id)
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

enum SessionEnd {
    Finished,
    /// The connection failed; `was_up` if it had been consuming.
    Lost {
        reason: String,
        was_up: bool,
    },
}

async fn connection_loop(shared: Arc<Shared>) {
    // After losing a connection that was up, the first attempt is immediate; failed attempts
    // back off from RECONNECT_MIN, doubling, with jitter.
    let mut delay = Duration::ZERO;
    let mut number = 0;
    loop {
        number += 1;
        let began = Instant::now();
        match session(&shared, number).await {
            SessionEnd::Finished => return,
            SessionEnd::Lost { reason, was_up } => {
                shared.results.send_replace(None);
                shared.connected.send_replace(false);
                if was_up && began.elapsed() > Duration::from_secs(1) {
                    delay = Duration::ZERO;
                }
                let wait = delay.mul_f64(0.8 + 0.4 * fastrand::f64());
                let when = match wait.is_zero() {
                    true => "at once".to_string(),
                    false => format!("in {wait:?}"),
                };
                tracing::warn!(
                    broker = %redact(&shared.options.url),
                    "broker connection lost or refused ({reason}); reconnecting {when}. Plugins keep running; results of running tasks are published after reconnecting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.finished.cancelled() => return,
                }
                delay = (delay * 2).clamp(RECONNECT_MIN, RECONNECT_MAX);
            }
        }
    }
}

async fn declare_task_queue(channel: &Channel, queue: &str, declare: Declare) -> lapin::Result<()> {
    match declare {
        Declare::Passive => {
            let opts = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.into(), opts, FieldTable::default())
                .await?;
        }
        Declare::Kombu => {
            let ex = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    queue.into(),
                    ExchangeKind::Direct,
                    ex,
                    FieldTable::default(),
                )
                .await?;
            let q = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.into(), q, FieldTable::default())
                .await?;
            channel
                .queue_bind(
                    queue.into(),
                    queue.into(),
                    queue.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
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
async fn session(shared: &Arc<Shared>, number: u64) -> SessionEnd {
    match open_session(shared, number).await {
        Ok(end) => end,
        Err(e) => SessionEnd::Lost {
            reason: e.to_string(),
            was_up: false,
        },
    }
}

async fn open_session(shared: &Arc<Shared>, number: u64) -> lapin::Result<SessionEnd> {
    let o = &shared.options;
    let props = ConnectionProperties::default().with_connection_name(shared.nodename().into());
    let conn = Connection::connect(&o.url, props).await?;
    let consume = conn.create_channel().await?;
    let results = conn.create_channel().await?;
    results
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for q in &o.queues {
        declare_task_queue(&consume, q, o.declare).await?;
    }
    consume
        .basic_qos(o.prefetch, BasicQosOptions { global: false })
        .await?;

    // The pidbox queue is exclusive: a second process with our node name gets
    // RESOURCE_LOCKED, and then this one takes a per-process name instead.
    let mut control = conn.create_channel().await?;
    let pidbox_queue = match declare_pidbox(&control, &shared.nodename()).await {
        Ok(q) => q,
        Err(e) if e.to_string().contains("RESOURCE_LOCKED") || e.to_string().contains("405") => {
            let taken = shared.nodename();
            let (name, host) = taken
                .split_once('@')
                .unwrap_or((taken.as_str(), "localhost"));
            let unique = format!("{name}-{}@{host}", std::process::id());
            tracing::warn!("node name {taken} is in use by another worker; this one answers remote control as {unique}");
            *shared.nodename.lock().expect("nodename lock poisoned") = unique.clone();
            control = conn.create_channel().await?;
            declare_pidbox(&control, &unique).await?
        }
        Err(e) => return Err(e),
    };

    let (tx, mut deliveries) = mpsc::channel::<lapin::Result<Delivery>>(256);
    let mut forwarders = Vec::new();
    let mut tags = Vec::new();
    for q in &o.queues {
        let tag = format!("{}-{q}", shared.nodename());
        let consumer = consume
            .basic_consume(
                q.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(tag);
        forwarders.push(forward(consumer, tx.clone()));
    }
    let pidbox_consumer = control
        .basic_consume(
            pidbox_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    forwarders.push(forward(pidbox_consumer, tx.clone()));
    drop(tx);
    let _stop_forwarders = AbortOnDrop(forwarders);

    // Fired when this session ends, so eta holds let their deliveries go back to the broker.
    let lost = CancellationToken::new();
    let _lost_guard = lost.clone().drop_guard();
    shared.results.send_replace(Some((number, results.clone())));
    shared.connected.send_replace(true);
    tracing::info!(
        broker = %redact(&o.url),
        queues = %o.queues.join(","),
        node = %shared.nodename(),
        prefetch = o.prefetch,
        "consuming Celery tasks"
    );
    let mut cancelled = false;
    loop {
        tokio::select! {
            d = deliveries.recv() => match d {
                Some(Ok(delivery)) if delivery.routing_key.as_str().is_empty() || delivery.exchange.as_str() == "celery.pidbox" => {
                    let shared = shared.clone();
                    let control = control.clone();
                    tokio::spawn(async move { remote_control(&shared, &control, delivery).await });
                }
                Some(Ok(delivery)) => {
                    if shared.stopping.is_cancelled() {
                        let _ = delivery.acker.reject(BasicRejectOptions { requeue: true }).await;
                        continue;
                    }
                    let (shared2, lost) = (shared.clone(), lost.clone());
                    shared.handlers.spawn(async move { delivery::handle(shared2, delivery, lost).await });
                }
                Some(Err(e)) => return Ok(SessionEnd::Lost { reason: e.to_string(), was_up: true }),
                None => return Ok(SessionEnd::Lost { reason: "the broker closed the consumers".into(), was_up: true }),
            },
            _ = shared.stopping.cancelled(), if !cancelled => {
                cancelled = true;
                for tag in &tags {
                    if let Err(e) = consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                        tracing::warn!("cannot cancel consumer {tag}: {e}");
                    }
                }
                tracing::info!("stopped consuming; finishing tasks in flight");
            }
            _ = shared.finished.cancelled() => {
                shared.results.send_replace(None);
                let _ = conn.close(200, "worker stopping".into()).await;
                return Ok(SessionEnd::Finished);
            }
        }
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

fn forward(
    mut consumer: lapin::Consumer,
    tx: mpsc::Sender<lapin::Result<Delivery>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            let failed = d.is_err();
            if tx.send(d).await.is_err() || failed {
                return;
            }
        }
    })
}

async fn remote_control(shared: &Shared, channel: &Channel, delivery: Delivery) {
    let req = match pidbox::parse(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("ignoring a remote control message that cannot be read: {e}");
            return;
        }
    };
    let node = shared.nodename();
    if !pidbox::addressed_to(&req, &node) {
        return;
    }
    tracing::debug!(method = %req.method, "remote control request");
    let Some(result) = pidbox::handle(&req, shared).await else {
        return;
    };
    let Some((exchange, routing_key)) = &req.reply_to else {
        return;
    };
    let mut headers = FieldTable::default();
    if let Some(ticket) = &req.ticket {
        headers.insert("ticket".into(), json_to_amqp(&json!(ticket)));
    }
    headers.insert("clock".into(), AMQPValue::LongLongInt(0));
    let body = serde_json::to_vec(&json!({ node: result })).expect("reply serializes");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(1);
    if let Err(e) = channel
        .basic_publish(
            exchange.as_str().into(),
            routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
    {
        tracing::warn!("cannot answer remote control `{}`: {e}", req.method);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672//"),
            "amqp://host:5672//"
        );
        assert_eq!(redact("amqp://host//"), "amqp://host//");
    }
}
