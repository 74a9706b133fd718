//! Celery's event stream, so Flower and `celery events` see this worker: `worker-online`, a
//! `worker-heartbeat` every 2 s and `worker-offline` always (monitors call a worker online
//! from its heartbeats), and the `task-*` events while task events are on (`task_events`,
//! `-E`, or the `enable_events` control command that Flower sends every 5 s).
//!
//! Events never slow a task: a task event is queued with `try_send` into a bounded buffer
//! (dropped and counted when full, e.g. while the broker is away) and published by the
//! session's own loop on its own channel, without confirms, transient, as a Celery worker does.

use super::SourceState;
use crate::source::celery::{state, CeleryTask};
use crate::source::engine::rules::Settlement;
use crate::source::pyrepr::{args_repr, exception_repr, kwargs_repr, repr};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Celery's event exchange (`event_exchange`).
const EXCHANGE: &str = "celeryev";

/// Seconds between heartbeats, as a Celery worker sends them (`freq`).
pub(super) const HEARTBEAT: Duration = Duration::from_secs(2);

/// Events waiting for the session's loop; past this they are dropped and counted.
const BUFFER: usize = 4096;

/// At most this many task events go out in one `task.multi` message.
const BATCH: usize = 256;

/// How long a task event waits for others to share its message: monitors see it at most this
/// late, and the broker routes one message per `GATHER` instead of three per task.
const GATHER: Duration = Duration::from_millis(50);

/// The worker's side of Celery's event stream: whether task events are on, the Lamport clock,
/// the count of tasks started, and the queue of events for the session to publish.
pub(super) struct Monitor {
    task_events: AtomicBool,
    clock: AtomicU64,
    processed: AtomicU64,
    dropped: AtomicU64,
    /// `utcoffset()` as f64 bits, refreshed with each heartbeat (reading the zone per event
    /// would cost a `stat` of /etc/localtime each time).
    utcoffset: AtomicU64,
    tx: mpsc::Sender<(String, Value)>,
    rx: tokio::sync::Mutex<mpsc::Receiver<(String, Value)>>,
}

impl Monitor {
    pub(super) fn new(task_events: bool) -> Monitor {
        let (tx, rx) = mpsc::channel(BUFFER);
        Monitor {
            task_events: AtomicBool::new(task_events),
            clock: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            utcoffset: AtomicU64::new(utcoffset().to_bits()),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    /// `enable_events`, answered as Celery's worker answers it.
    pub(super) fn enable(&self) -> Value {
        match self.task_events.swap(true, Ordering::Relaxed) {
            true => json!({"ok": "task events already enabled"}),
            false => {
                tracing::info!("task events enabled by remote control");
                json!({"ok": "task events enabled"})
            }
        }
    }

    /// `disable_events`, answered as Celery's worker answers it.
    pub(super) fn disable(&self) -> Value {
        match self.task_events.swap(false, Ordering::Relaxed) {
            true => {
                tracing::info!("task events disabled by remote control");
                json!({"ok": "task events disabled"})
            }
            false => json!({"ok": "task events already disabled"}),
        }
    }

    /// Counts a task handed to a plugin (the heartbeat's `processed`).
    pub(super) fn count_started(&self) {
        self.processed.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `task-*` events are being sent.
    pub(super) fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Events dropped because the buffer was full (the broker away, or far behind).
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `task-<kind>` for task `uuid` when task events are on; `fields` is only called
    /// then. Never waits.
    pub(super) fn task(
        &self,
        hostname: &str,
        kind: &str,
        uuid: &str,
        fields: impl FnOnce() -> Map<String, Value>,
    ) {
        if !self.task_events.load(Ordering::Relaxed) {
            return;
        }
        let mut fields = fields();
        fields.insert("uuid".into(), json!(uuid));
        self.queue(self.event(hostname, &format!("task-{kind}"), fields));
    }

    /// Queues the one heartbeat a `heartbeat` control command asks for: only `freq` 5 and
    /// the software fields, as Celery's worker sends it.
    pub(super) fn heartbeat_requested(&self, hostname: &str) {
        let mut fields = software();
        fields.insert("freq".into(), json!(5.0));
        self.queue(self.event(hostname, "worker-heartbeat", fields));
    }

    fn queue(&self, event: (String, Value)) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An event with the fields every Celery event carries; the routing key is its type with
    /// `-` as `.`.
    fn event(&self, hostname: &str, kind: &str, mut fields: Map<String, Value>) -> (String, Value) {
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        fields.insert("type".into(), json!(kind));
        fields.insert("hostname".into(), json!(hostname));
        fields.insert("timestamp".into(), json!(now_epoch()));
        let offset = f64::from_bits(self.utcoffset.load(Ordering::Relaxed));
        fields.insert("utcoffset".into(), json!(offset));
        fields.insert("pid".into(), json!(std::process::id()));
        fields.insert("clock".into(), json!(clock));
        (kind.replace('-', "."), Value::Object(fields))
    }

    /// A `worker-online`, `-heartbeat` or `-offline` event with the state Flower shows.
    fn worker_event(&self, shared: &SourceState, kind: &str) -> (String, Value) {
        self.utcoffset
            .store(utcoffset().to_bits(), Ordering::Relaxed);
        let mut fields = software();
        fields.insert("freq".into(), json!(HEARTBEAT.as_secs_f64()));
        fields.insert("active".into(), json!(shared.active_count()));
        fields.insert(
            "processed".into(),
            json!(self.processed.load(Ordering::Relaxed)),
        );
        fields.insert("loadavg".into(), json!(loadavg()));
        self.event(&shared.engine.nodename(), kind, fields)
    }
}

/// `sw_ident`, `sw_ver`, `sw_sys`: what Flower shows as the worker's software.
fn software() -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("sw_ident".into(), json!(crate::WORKER_NAME));
    fields.insert("sw_ver".into(), json!(crate::WORKER_VERSION));
    fields.insert("sw_sys".into(), json!("Linux"));
    fields
}

/// Hours west of UTC, as Celery computes it (receivers correct timestamps with it).
fn utcoffset() -> f64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    // `+ 0.0` turns UTC's -0.0 into 0.0.
    -(east as f64) / 3600.0 + 0.0
}

/// The 1, 5 and 15 minute load averages, each rounded up to 2 decimals as Celery does.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field
            .parse::<f64>()
            .map(|v| (v * 100.0).ceil() / 100.0)
            .unwrap_or(0.0);
    }
    out
}

/// Declares `celeryev` as a Celery worker finds it: topic, durable.
pub(super) async fn declare(channel: &Channel) -> lapin::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
}

async fn publish(channel: &Channel, hostname: &str, (key, event): (String, Value)) -> bool {
    let mut headers = FieldTable::default();
    headers.insert("hostname".into(), AMQPValue::LongString(hostname.into()));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(1)
        .with_priority(0);
    let body = serde_json::to_vec(&event).expect("an event serializes");
    let sent = channel
        .basic_publish(
            EXCHANGE.into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("cannot publish a Celery event ({e}); the session is ending");
            false
        }
    }
}

/// One session's event loop: `worker-online` at once, then queued events as they come and a
/// heartbeat every `HEARTBEAT`, until the channel fails or the task is dropped.
pub(super) async fn run(shared: Arc<SourceState>, channel: Channel) {
    let monitor = &shared.monitor;
    let node = shared.engine.nodename();
    if !publish(
        &channel,
        &node,
        monitor.worker_event(&shared, "worker-online"),
    )
    .await
    {
        return;
    }
    let mut queued = monitor.rx.lock().await;
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = beat.tick() => batch.push(monitor.worker_event(&shared, "worker-heartbeat")),
            e = queued.recv() => match e {
                Some(e) => batch.push(e),
                None => return,
            },
        };
        // Task events wait up to `GATHER` for company, then go out as one `task.multi`
        // message: under load one broker message carries the events of many tasks.
        if batch.iter().any(|(key, _)| key.starts_with("task.")) {
            let until = tokio::time::Instant::now() + GATHER;
            while batch.len() < BATCH {
                tokio::select! {
                    e = queued.recv() => match e {
                        Some(e) => batch.push(e),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        if !publish_batch(&channel, &shared.engine.nodename(), &mut batch).await {
            return;
        }
    }
}

/// Publishes `batch` (emptying it): worker events one by one, task events together as a JSON
/// array on `task.multi` when there are several, as Celery's worker buffers its task group.
async fn publish_batch(
    channel: &Channel,
    hostname: &str,
    batch: &mut Vec<(String, Value)>,
) -> bool {
    let (tasks, others): (Vec<_>, Vec<_>) = batch
        .drain(..)
        .partition(|(key, _)| key.starts_with("task."));
    for event in others {
        if !publish(channel, hostname, event).await {
            return false;
        }
    }
    match tasks.len() {
        0 => true,
        1 => publish(channel, hostname, tasks.into_iter().next().expect("one")).await,
        _ => {
            let events = tasks.into_iter().map(|(_, e)| e).collect();
            publish(
                channel,
                hostname,
                ("task.multi".into(), Value::Array(events)),
            )
            .await
        }
    }
}

/// Queues `task-retried` (then `task-started` again) for a task the dispatcher runs again
/// after its plugin's process died under it (`reason` as the exception, as Celery's `Retry`
/// carries it).
pub(super) fn announce_rerun(shared: &SourceState, task: &CeleryTask, reason: &str) {
    let node = shared.engine.nodename();
    shared.monitor.task(&node, "retried", &task.id, || {
        let mut f = Map::new();
        f.insert("exception".into(), json!(exception_repr("Retry", reason)));
        f.insert("traceback".into(), json!(""));
        f
    });
    shared.monitor.task(&node, "started", &task.id, Map::new);
}

/// `task-received` and `task-started` for Flower and `celery events` (when task events are on).
pub(super) fn announce_start(shared: &SourceState, task: &CeleryTask) {
    shared.monitor.count_started();
    // Off (the default): nothing built on a task's way, not even the node name.
    if !shared.monitor.task_events() {
        return;
    }
    let node = shared.engine.nodename();
    shared.monitor.task(&node, "received", &task.id, || {
        let iso = |t: Option<SystemTime>| {
            t.map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
        };
        let mut f = Map::new();
        f.insert("name".into(), json!(task.name));
        f.insert("args".into(), json!(args_repr(&task.args)));
        f.insert("kwargs".into(), json!(kwargs_repr(&task.kwargs)));
        f.insert(
            "root_id".into(),
            json!(task.root_id.as_deref().unwrap_or(&task.id)),
        );
        f.insert("parent_id".into(), json!(task.parent_id));
        f.insert("retries".into(), json!(task.retries));
        f.insert("eta".into(), json!(iso(task.eta)));
        f.insert("expires".into(), json!(iso(task.expires)));
        f
    });
    shared.monitor.task(&node, "started", &task.id, Map::new);
}

/// `task-retried` for a task its plugin asked to run again later.
pub(super) fn announce_retried(
    shared: &SourceState,
    task: &CeleryTask,
    result: &Value,
    traceback: Option<&str>,
) {
    if !shared.monitor.task_events() {
        return;
    }
    let exc_type = result["exc_type"].as_str().unwrap_or("Retry");
    let message = result["exc_message"][0].as_str().unwrap_or_default();
    let exception = exception_repr(exc_type, message);
    shared
        .monitor
        .task(&shared.engine.nodename(), "retried", &task.id, || {
            let mut f = Map::new();
            f.insert("exception".into(), json!(exception));
            f.insert("traceback".into(), json!(traceback.unwrap_or_default()));
            f
        });
}

/// `task-revoked` for a task revoked or expired before it started.
pub(super) fn announce_revoked(shared: &SourceState, task: &CeleryTask, reason: &str) {
    shared
        .monitor
        .task(&shared.engine.nodename(), "revoked", &task.id, || {
            let mut f = Map::new();
            f.insert("terminated".into(), json!(false));
            f.insert("signum".into(), Value::Null);
            f.insert("expired".into(), json!(reason == "expired"));
            f
        });
}

/// `task-succeeded`, `task-failed` or `task-revoked` for a task that ran; nothing for one
/// given back to the queue.
pub(super) fn announce_end(
    shared: &SourceState,
    task: &CeleryTask,
    settlement: &Settlement,
    runtime: std::time::Duration,
) {
    let Settlement::Answer {
        status,
        result,
        traceback,
        ..
    } = settlement
    else {
        return;
    };
    if !shared.monitor.task_events() {
        return;
    }
    let node = shared.engine.nodename();
    let mut f = Map::new();
    let kind = match *status {
        state::SUCCESS => {
            f.insert("result".into(), json!(repr(result)));
            f.insert("runtime".into(), json!(runtime.as_secs_f64()));
            "succeeded"
        }
        state::REVOKED => {
            let terminated = result["exc_message"]
                .as_array()
                .and_then(|m| m.first())
                .and_then(Value::as_str)
                == Some("terminated");
            f.insert("terminated".into(), json!(terminated));
            f.insert(
                "signum".into(),
                if terminated { json!(15) } else { Value::Null },
            );
            f.insert("expired".into(), json!(false));
            "revoked"
        }
        _ => {
            let exc_type = result["exc_type"].as_str().unwrap_or("Exception");
            let message = match &result["exc_message"] {
                Value::Array(parts) => parts
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Value::String(m) => m.clone(),
                _ => String::new(),
            };
            f.insert(
                "exception".into(),
                json!(exception_repr(exc_type, &message)),
            );
            f.insert(
                "traceback".into(),
                json!(traceback.clone().unwrap_or_default()),
            );
            "failed"
        }
    };
    shared.monitor.task(&node, kind, &task.id, || f);
}

/// `worker-offline`, sent once as the worker stops, so monitors mark it offline at once.
pub(super) async fn offline(shared: &SourceState, channel: &Channel) {
    let event = shared.monitor.worker_event(shared, "worker-offline");
    publish(channel, &shared.engine.nodename(), event).await;
}

/// Seconds since the epoch, as Celery's events and messages carry time.
pub(super) fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_what_every_celery_event_carries() {
        let m = Monitor::new(false);
        m.task("w@h", "received", "id-1", Map::new);
        assert_eq!(m.tx.capacity(), BUFFER, "task events off: nothing queued");
        assert_eq!(m.enable(), json!({"ok": "task events enabled"}));
        assert_eq!(m.enable(), json!({"ok": "task events already enabled"}));
        m.task("w@h", "succeeded", "id-1", || {
            let mut f = Map::new();
            f.insert("result".into(), json!("5"));
            f
        });
        let (key, e) = m.rx.try_lock().unwrap().try_recv().unwrap();
        assert_eq!(key, "task.succeeded");
        assert_eq!(e["type"], "task-succeeded");
        assert_eq!(e["uuid"], "id-1");
        assert_eq!(e["hostname"], "w@h");
        assert_eq!(e["clock"], 1);
        assert!(e["timestamp"].as_f64().unwrap() > 1.7e9);
        assert!(e["utcoffset"].is_number() && e["pid"].is_number());
        assert_eq!(m.disable(), json!({"ok": "task events disabled"}));
        assert_eq!(m.disable(), json!({"ok": "task events already disabled"}));
        let load = loadavg();
        assert!(load.iter().all(|v| *v >= 0.0));
    }
}
