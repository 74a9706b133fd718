//! The RabbitMQ task source: consumes Celery task messages, runs them through the dispatcher,
//! and answers through Celery's rpc:// result backend, so an unmodified Celery client cannot
//! tell this worker from a Celery worker.
//!
//! Delivery guarantees: a task message is acked only after its result is published and
//! confirmed by the broker; a worker killed at any moment loses nothing (RabbitMQ redelivers).
//! After a lost connection the worker reconnects with backoff, without touching plugins; tasks
//! already running finish and their results are published on the new connection; the copies
//! RabbitMQ redelivers are answered from the memory of recent results instead of running twice.

use super::celery::{self, state, CeleryTask, Envelope};
use super::pidbox;
use crate::dispatch::Dispatcher;
use crate::task::{FailureKind, Outcome, TaskEvent, TaskRequest};
use futures_lite::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many revoked task ids are remembered, and for how long (Celery's figures).
const REVOKED_MAX: usize = 50_000;
const REVOKED_TTL: Duration = Duration::from_secs(3 * 3600);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// How the worker declares the task queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declare {
    /// Exactly as kombu does: durable queue, durable direct exchange of the same name, bound
    /// with the queue name as routing key, no arguments.
    Kombu,
    /// Passive: the queue must already exist (any flags or arguments).
    Passive,
}

#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub url: String,
    pub queues: Vec<String>,
    pub declare: Declare,
    /// Per-consumer prefetch (never global).
    pub prefetch: u16,
    pub nodename: String,
    /// Recent results remembered to answer redelivered copies.
    pub result_memory: usize,
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
                running: HashMap::new(),
                reserved: HashMap::new(),
                done: Recent::new(options.result_memory),
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
    /// The current result channel (publisher confirms on); `None` while disconnected.
    results: watch::Sender<Option<Channel>>,
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

struct Tasks {
    running: HashMap<String, Running>,
    reserved: HashMap<String, ActiveInfo>,
    done: Recent,
}

struct Running {
    info: ActiveInfo,
    /// Redelivered copies that arrived while the task ran; acked with the original.
    copies: Vec<Acker>,
    /// Set when a revoke stopped it: its Cancelled outcome is answered REVOKED with this
    /// reason ("terminated" while running, "revoked" while still queued).
    revoked: Option<&'static str>,
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

/// A published result, kept to answer redelivered copies.
#[derive(Clone)]
struct Done {
    reply_to: Option<String>,
    correlation_id: String,
    body: Vec<u8>,
}

/// A bounded memory of recent results, oldest forgotten first.
struct Recent {
    map: HashMap<String, Done>,
    order: VecDeque<String>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Recent {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, id: String, done: Done) {
        if self.map.insert(id.clone(), done).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
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
        let mut names = self.dispatcher.supervisor().task_names();
        names.sort();
        names
    }

    pub fn active(&self) -> Vec<ActiveInfo> {
        let tasks = self.tasks.lock().expect("task table lock poisoned");
        tasks.running.values().map(|r| r.info.clone()).collect()
    }

    pub fn reserved(&self) -> Vec<ActiveInfo> {
        let tasks = self.tasks.lock().expect("task table lock poisoned");
        tasks.reserved.values().cloned().collect()
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
        let plugins = self.dispatcher.supervisor().status().await;
        let processes: Vec<u32> = plugins
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect();
        let capacity: usize = self
            .dispatcher
            .supervisor()
            .plugins()
            .iter()
            .map(|p| p.manifest().capacity())
            .sum();
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
            let mut tasks = self.tasks.lock().expect("task table lock poisoned");
            for id in ids {
                revoked.insert(id);
                if let Some(run) = tasks.running.get_mut(id) {
                    if terminate {
                        run.revoked = Some("terminated");
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
                    if let Some(run) = self
                        .tasks
                        .lock()
                        .expect("task table lock poisoned")
                        .running
                        .get_mut(&id)
                    {
                        run.revoked = Some("revoked");
                    }
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

    /// Publishes to the default exchange, retrying across reconnects. With `confirm`, returns
    /// only once the broker confirmed. False if the worker gave up (final stop).
    async fn publish(
        &self,
        routing_key: &str,
        correlation_id: &str,
        body: &[u8],
        confirm: bool,
    ) -> bool {
        let mut channels = self.results.subscribe();
        loop {
            let channel = channels.borrow_and_update().clone();
            let Some(channel) = channel else {
                tokio::select! {
                    changed = channels.changed() => if changed.is_err() { return false },
                    _ = self.finished.cancelled() => return false,
                }
                continue;
            };
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_correlation_id(correlation_id.into())
                .with_delivery_mode(1);
            let sent = channel
                .basic_publish(
                    "".into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await;
            match sent {
                Ok(pending) if !confirm => {
                    drop(pending);
                    return true;
                }
                Ok(pending) => match pending.await {
                    Ok(c) if c.is_ack() || matches!(c, lapin::Confirmation::NotRequested) => {
                        return true
                    }
                    Ok(_) => tracing::warn!(
                        routing_key,
                        "broker refused (nack) a result; publishing it again"
                    ),
                    Err(e) => tracing::warn!(
                        routing_key,
                        "result publish not confirmed ({e}); retrying after reconnect"
                    ),
                },
                Err(e) => tracing::warn!(
                    routing_key,
                    "cannot publish result ({e}); retrying after reconnect"
                ),
            }
            // Wait for a different channel (a reconnect) before trying again.
            tokio::select! {
                _ = channels.wait_for(|c| c.as_ref().map(|c| c.id()) != Some(channel.id())) => {}
                _ = self.finished.cancelled() => return false,
            }
        }
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
    Lost(String),
}

async fn connection_loop(shared: Arc<Shared>) {
    let mut delay = RECONNECT_MIN;
    loop {
        let began = Instant::now();
        match session(&shared).await {
            SessionEnd::Finished => return,
            SessionEnd::Lost(reason) => {
                shared.results.send_replace(None);
                shared.connected.send_replace(false);
                if began.elapsed() > Duration::from_secs(30) {
                    delay = RECONNECT_MIN;
                }
                let wait = delay.mul_f64(0.8 + 0.4 * fastrand::f64());
                tracing::warn!(
                    broker = %redact(&shared.options.url),
                    "broker connection lost or refused ({reason}); reconnecting in {wait:?}. Plugins keep running; results of running tasks are published after reconnecting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.finished.cancelled() => return,
                }
                delay = (delay * 2).min(RECONNECT_MAX);
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

async fn session(shared: &Arc<Shared>) -> SessionEnd {
    match open_session(shared).await {
        Ok(end) => end,
        Err(e) => SessionEnd::Lost(e.to_string()),
    }
}

async fn open_session(shared: &Arc<Shared>) -> lapin::Result<SessionEnd> {
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
    shared.results.send_replace(Some(results.clone()));
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
                    shared.handlers.spawn(async move { handle_delivery(shared2, delivery, lost).await });
                }
                Some(Err(e)) => return Ok(SessionEnd::Lost(e.to_string())),
                None => return Ok(SessionEnd::Lost("the broker closed the consumers".into())),
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

/// AMQP field values as JSON (every numeric type accepted).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
            .collect(),
    )
}

fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for x in a {
                arr.push(json_to_amqp(x));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(o) => {
            let mut t = FieldTable::default();
            for (k, x) in o {
                t.insert(ShortString::from(k.as_str()), json_to_amqp(x));
            }
            AMQPValue::FieldTable(t)
        }
    }
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

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn ack(acker: &Acker) {
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        // The channel is gone (connection lost): RabbitMQ redelivers, and the copy is answered
        // from the memory of results.
        tracing::debug!(
            "ack failed ({e}); the broker will redeliver and the result will be reused"
        );
    }
}

async fn reject(acker: &Acker, requeue: bool) {
    if let Err(e) = acker.reject(BasicRejectOptions { requeue }).await {
        tracing::debug!("reject failed ({e})");
    }
}

/// Publishes the final state and remembers it, then acks the message and its copies.
async fn answer(
    shared: &Shared,
    task: &CeleryTask,
    acker: &Acker,
    status: &str,
    result: Value,
    traceback: Option<&str>,
) {
    let body = celery::result_body(&task.id, status, result, traceback);
    let copies = {
        let mut tasks = shared.tasks.lock().expect("task table lock poisoned");
        tasks.done.insert(
            task.id.clone(),
            Done {
                reply_to: task.reply_to.clone(),
                correlation_id: task.correlation_id.clone(),
                body: body.clone(),
            },
        );
        tasks
            .running
            .remove(&task.id)
            .map(|r| r.copies)
            .unwrap_or_default()
    };
    if let (Some(reply_to), false) = (&task.reply_to, task.ignore_result) {
        if !shared
            .publish(reply_to, &task.correlation_id, &body, true)
            .await
        {
            tracing::warn!(task_id = %task.id, "gave up publishing the result at shutdown; the message is left unacked for redelivery");
            return;
        }
    }
    ack(acker).await;
    for copy in copies {
        ack(&copy).await;
    }
    *shared
        .totals
        .lock()
        .expect("totals lock poisoned")
        .entry(task.name.clone())
        .or_default() += 1;
}

async fn handle_delivery(shared: Arc<Shared>, delivery: Delivery, lost: CancellationToken) {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| match table_to_json(h) {
            Value::Object(m) => m,
            _ => Map::new(),
        })
        .unwrap_or_default();
    let env = Envelope {
        headers,
        body: &delivery.data,
        content_type: delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        reply_to: delivery.properties.reply_to().as_ref().map(|s| s.as_str()),
    };
    let task = match celery::decode(&env) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(
                queue = %delivery.routing_key,
                delivery_tag = delivery.delivery_tag,
                bytes = delivery.data.len(),
                "rejecting a message that is not a readable Celery task (dead-lettered if the queue has a DLX): {e}"
            );
            reject(&delivery.acker, false).await;
            return;
        }
    };
    let acker = delivery.acker.clone();
    let delivery_info = json!({
        "exchange": delivery.exchange.as_str(),
        "routing_key": delivery.routing_key.as_str(),
        "priority": delivery.properties.priority().unwrap_or(0),
        "redelivered": delivery.redelivered,
    });
    drop(delivery);

    // A copy of a task this worker answered or is running: never run it twice.
    enum Seen {
        Done(Done),
        Running,
        New,
    }
    let seen = {
        let mut tasks = shared.tasks.lock().expect("task table lock poisoned");
        if let Some(done) = tasks.done.map.get(&task.id) {
            Seen::Done(done.clone())
        } else if let Some(run) = tasks.running.get_mut(&task.id) {
            run.copies.push(acker.clone());
            Seen::Running
        } else {
            Seen::New
        }
    };
    match seen {
        Seen::Done(done) => {
            tracing::info!(task_id = %task.id, "redelivered task already answered; publishing the remembered result again");
            if let Some(reply_to) = &done.reply_to {
                shared
                    .publish(reply_to, &done.correlation_id, &done.body, true)
                    .await;
            }
            ack(&acker).await;
            return;
        }
        Seen::Running => {
            tracing::info!(task_id = %task.id, "redelivered task is still running here; it will be answered once");
            return;
        }
        Seen::New => {}
    }

    let info = ActiveInfo {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        type_: task.name.clone(),
        hostname: shared.nodename(),
        time_start: now_epoch(),
        acknowledged: false,
        delivery_info,
        worker_pid: std::process::id(),
    };

    // Held until its eta, unacked; revocations and stops wake it early.
    if let Some(eta) = task.eta {
        if eta > SystemTime::now() {
            shared
                .tasks
                .lock()
                .expect("task table lock poisoned")
                .reserved
                .insert(task.id.clone(), info.clone());
            let wait = eta.duration_since(SystemTime::now()).unwrap_or_default();
            let deadline = tokio::time::Instant::now() + wait;
            let released = loop {
                let woken = shared.revoke_signal.notified();
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break None,
                    _ = lost.cancelled() => break Some(false),
                    _ = woken => {
                        if shared.stopping.is_cancelled() { break Some(true) }
                        if shared.is_revoked(&task.id) { break None }
                    }
                }
            };
            shared
                .tasks
                .lock()
                .expect("task table lock poisoned")
                .reserved
                .remove(&task.id);
            match released {
                // Connection lost: the broker already took the message back.
                Some(false) => return,
                // Stopping: give it back for another worker.
                Some(true) => {
                    reject(&acker, true).await;
                    return;
                }
                None => {}
            }
        }
    }
    if shared.is_revoked(&task.id) {
        answer(
            &shared,
            &task,
            &acker,
            state::REVOKED,
            celery::revoked_result("revoked"),
            None,
        )
        .await;
        return;
    }
    if task.expires.is_some_and(|t| t <= SystemTime::now()) {
        tracing::info!(task_id = %task.id, task = %task.name, "task expired before it could start");
        answer(
            &shared,
            &task,
            &acker,
            state::REVOKED,
            celery::revoked_result("expired"),
            None,
        )
        .await;
        return;
    }
    if shared.dispatcher.supervisor().route(&task.name).is_none() {
        tracing::error!(task_id = %task.id, task = %task.name, "received a task no plugin serves; answering NotRegistered and rejecting it");
        let f = crate::task::Failure::not_registered(&task.name);
        let body = celery::result_body(&task.id, state::FAILURE, celery::failure_result(&f), None);
        if let (Some(reply_to), false) = (&task.reply_to, task.ignore_result) {
            shared
                .publish(reply_to, &task.correlation_id, &body, true)
                .await;
        }
        reject(&acker, false).await;
        return;
    }

    shared
        .tasks
        .lock()
        .expect("task table lock poisoned")
        .running
        .insert(
            task.id.clone(),
            Running {
                info,
                copies: Vec::new(),
                revoked: None,
            },
        );
    let request = TaskRequest {
        id: task.id.clone(),
        name: task.name.clone(),
        args: task.args.clone(),
        kwargs: task.kwargs.clone(),
        soft_time_limit: task.soft_time_limit,
        hard_time_limit: task.hard_time_limit,
    };
    let reporting = task.reply_to.clone().filter(|_| !task.ignore_result);
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let outcome = {
        let run = shared.dispatcher.submit(request, events);
        tokio::pin!(run);
        loop {
            tokio::select! {
                biased;
                Some(ev) = events_rx.recv() => publish_event(&shared, &task, reporting.as_deref(), ev).await,
                outcome = &mut run => break outcome,
            }
        }
    };
    while let Ok(ev) = events_rx.try_recv() {
        publish_event(&shared, &task, reporting.as_deref(), ev).await;
    }

    let revoked = shared
        .tasks
        .lock()
        .expect("task table lock poisoned")
        .running
        .get(&task.id)
        .and_then(|r| r.revoked);
    match outcome {
        Outcome::Success(value) => {
            answer(&shared, &task, &acker, state::SUCCESS, value, None).await
        }
        Outcome::Failure(f) if revoked.is_some() && matches!(f.kind, FailureKind::Cancelled) => {
            answer(
                &shared,
                &task,
                &acker,
                state::REVOKED,
                celery::revoked_result(revoked.unwrap_or("revoked")),
                None,
            )
            .await
        }
        // The worker is stopping: the task never ran to an end here, so another worker should.
        Outcome::Failure(f)
            if f.kind == FailureKind::ShuttingDown
                || (shared.stopping.is_cancelled()
                    && matches!(
                        f.kind,
                        FailureKind::PluginUnavailable | FailureKind::PluginCrashed
                    )) =>
        {
            let copies = shared
                .tasks
                .lock()
                .expect("task table lock poisoned")
                .running
                .remove(&task.id)
                .map(|r| r.copies)
                .unwrap_or_default();
            tracing::info!(task_id = %task.id, "worker stopping: returning the task to the queue");
            reject(&acker, true).await;
            for c in copies {
                ack(&c).await;
            }
        }
        Outcome::Failure(f) => {
            tracing::info!(task_id = %task.id, task = %task.name, "task failed: {f}");
            answer(
                &shared,
                &task,
                &acker,
                state::FAILURE,
                celery::failure_result(&f),
                f.traceback.as_deref(),
            )
            .await
        }
    }
}

/// Progress and streamed items become custom-state messages, in order, before the final state.
async fn publish_event(shared: &Shared, task: &CeleryTask, reply_to: Option<&str>, ev: TaskEvent) {
    let Some(reply_to) = reply_to else { return };
    let (status, meta) = match ev {
        TaskEvent::Progress {
            done,
            total,
            message,
        } => (
            state::PROGRESS,
            json!({ "done": done, "total": total, "message": message }),
        ),
        TaskEvent::Stream { items } => (state::STREAM, json!({ "items": items })),
    };
    let body = celery::result_body(&task.id, status, meta, None);
    shared
        .publish(reply_to, &task.correlation_id, &body, false)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::DecimalValue;

    #[test]
    fn every_amqp_numeric_type_becomes_a_json_number() {
        let cases = [
            (AMQPValue::ShortShortInt(-1), json!(-1)),
            (AMQPValue::ShortShortUInt(2), json!(2)),
            (AMQPValue::ShortInt(-3), json!(-3)),
            (AMQPValue::ShortUInt(4), json!(4)),
            (AMQPValue::LongInt(-5), json!(-5)),
            (AMQPValue::LongUInt(6), json!(6)),
            (AMQPValue::LongLongInt(-7), json!(-7)),
            (AMQPValue::Float(1.5), json!(1.5)),
            (AMQPValue::Double(2.5), json!(2.5)),
            (
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 125,
                }),
                json!(1.25),
            ),
            (AMQPValue::Timestamp(9), json!(9)),
            (AMQPValue::Void, Value::Null),
        ];
        for (v, want) in cases {
            assert_eq!(amqp_to_json(&v), want, "{v:?}");
        }
        let back = amqp_to_json(&json_to_amqp(
            &json!({"a": [1, "x", null, 2.5, {"b": true}]}),
        ));
        assert_eq!(back, json!({"a": [1, "x", null, 2.5, {"b": true}]}));
    }

    #[test]
    fn recent_results_forget_the_oldest() {
        let mut r = Recent::new(2);
        let done = || Done {
            reply_to: None,
            correlation_id: String::new(),
            body: Vec::new(),
        };
        r.insert("a".into(), done());
        r.insert("b".into(), done());
        r.insert("c".into(), done());
        assert!(!r.map.contains_key("a") && r.map.contains_key("b") && r.map.contains_key("c"));
    }

    #[test]
    fn broker_urls_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672//"),
            "amqp://host:5672//"
        );
        assert_eq!(redact("amqp://host//"), "amqp://host//");
    }
}
