//! Celery's event stream, so Flower and `celery events` see this worker: `worker-online`, a
//! `worker-heartbeat` every 2 s and `worker-offline` always (monitors call a worker online
//! from its heartbeats), and the `task-*` events while task events are on (`task_events`,
//! `-E`, or the `enable_events` control command that Flower sends every 5 s).
//!
//! Events never slow a task: a task event is queued with `try_send` into a bounded buffer
//! (dropped and counted when full, e.g. while the broker is away) and published by the
//! transport's own loop (on AMQP its own channel, without confirms, transient, as a Celery worker
//! does). The loop's batching is here: [`Monitor::next_batch`].

use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Seconds between heartbeats, as a Celery worker sends them (`freq`).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);

/// Events waiting for the session's loop; past this they are dropped and counted.
const BUFFER: usize = 4096;

/// How long a task event waits for others to share its message: monitors see it at most this
/// late, and the broker routes one message per `GATHER` instead of three per task.
const GATHER: Duration = Duration::from_millis(50);

/// The worker's side of Celery's event stream: whether task events are on, the Lamport clock,
/// the count of tasks started, and the queue of events for the session to publish.
pub(crate) struct Monitor {
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
    pub(crate) fn new(task_events: bool) -> Monitor {
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
    pub(crate) fn enable(&self) -> Value {
        match self.task_events.swap(true, Ordering::Relaxed) {
            true => json!({"ok": "task events already enabled"}),
            false => {
                tracing::info!("task events enabled by remote control");
                json!({"ok": "task events enabled"})
            }
        }
    }

    /// `disable_events`, answered as Celery's worker answers it.
    pub(crate) fn disable(&self) -> Value {
        match self.task_events.swap(false, Ordering::Relaxed) {
            true => {
                tracing::info!("task events disabled by remote control");
                json!({"ok": "task events disabled"})
            }
            false => json!({"ok": "task events already disabled"}),
        }
    }

    /// Counts a task handed to a plugin (the heartbeat's `processed`).
    pub(crate) fn count_started(&self) {
        self.processed.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `task-*` events are being sent.
    pub(crate) fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Events dropped because the buffer was full (the broker away, or far behind).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `task-<kind>` for task `uuid` when task events are on; `fields` is only called
    /// then. Never waits.
    pub(crate) fn task(
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
    pub(crate) fn heartbeat_requested(&self, hostname: &str) {
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
    pub(crate) fn worker_event(&self, node: &str, active: usize, kind: &str) -> (String, Value) {
        self.utcoffset
            .store(utcoffset().to_bits(), Ordering::Relaxed);
        let mut fields = software();
        fields.insert("freq".into(), json!(HEARTBEAT.as_secs_f64()));
        fields.insert("active".into(), json!(active));
        fields.insert(
            "processed".into(),
            json!(self.processed.load(Ordering::Relaxed)),
        );
        fields.insert("loadavg".into(), json!(loadavg()));
        self.event(node, kind, fields)
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

impl Monitor {
    /// The queued events, read by one publishing loop at a time.
    pub(crate) async fn queued(
        &self,
    ) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<(String, Value)>> {
        self.rx.lock().await
    }

    /// Fills `batch` with what is due next: a heartbeat when `beat` ticks, else the next
    /// queued event; task events then wait up to `GATHER` for company (up to `BATCH`), so
    /// under load one broker message carries the events of many tasks. False once the queue
    /// is closed.
    pub(crate) async fn next_batch(
        &self,
        heartbeat: impl Fn() -> (String, Value),
        queued: &mut mpsc::Receiver<(String, Value)>,
        beat: &mut tokio::time::Interval,
        batch: &mut Vec<(String, Value)>,
    ) -> bool {
        tokio::select! {
            _ = beat.tick() => batch.push(heartbeat()),
            e = queued.recv() => match e {
                Some(e) => batch.push(e),
                None => return false,
            },
        };
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
        true
    }
}

/// The heartbeat timer of a publishing loop: the first tick one period from now.
pub(crate) fn heartbeats() -> tokio::time::Interval {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

/// At most this many task events go out in one `task.multi` message.
pub(crate) const BATCH: usize = 256;

/// Seconds since the epoch, as Celery's events and messages carry time.
pub(crate) fn now_epoch() -> f64 {
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
