//! Celery's event stream, so Flower and `celery events` see this worker: `worker-online`, a
//! `worker-heartbeat` every 2 s and `worker-offline` always (monitors call a worker online
//! from its heartbeats), and the `task-*` events while task events are on (`task_events`,
//! `-E`, or the `enable_events` control command that Flower sends every 5 s).
//!
//! Events never slow a task: a task event is queued with `try_send` into a bounded buffer
//! (dropped and counted when full, e.g. while the broker is away) and published by the
//! transport's own loop (on AMQP its own channel, without confirms, transient, as a Celery worker
//! does). The loop's batching is here: [`Monitor::next_batch`].

use crate::json_object::{EventFields, ObjectWriter};
use serde_json::{json, Value};
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

/// How often a gathering loop takes what was queued meanwhile (see [`Monitor::next_batch`]).
const GATHER_POLL: Duration = Duration::from_millis(5);

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
    tx: mpsc::Sender<Event>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Event>>,
}

/// One Celery event as it will be published: its routing key (the type with `-` as `.`) and
/// its body, a JSON object written once when the event is made, so neither the queue nor the
/// publishing loop builds or walks a map per event.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) key: String,
    pub(crate) body: Vec<u8>,
}

impl Event {
    /// Whether it is a `task-*` event (batched on `task.multi`).
    pub(crate) fn is_task(&self) -> bool {
        self.key.starts_with("task.")
    }

    /// The body as a value (tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn value(&self) -> Value {
        serde_json::from_slice(&self.body).expect("an event body is JSON")
    }
}

/// The body of a `task.multi` message: the events' bodies as one JSON array.
pub(crate) fn multi_body(events: &[Event]) -> Vec<u8> {
    let len = events.iter().map(|e| e.body.len() + 1).sum::<usize>() + 1;
    let mut body = Vec::with_capacity(len);
    body.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.body);
    }
    body.push(b']');
    body
}

/// The fields every Celery event carries; a handler's field of the same name gives way to them.
const COMMON: &[&str] = &["type", "hostname", "timestamp", "utcoffset", "pid", "clock"];

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
        fields: impl FnOnce(&mut EventFields),
    ) {
        if !self.task_events.load(Ordering::Relaxed) {
            return;
        }
        let event = self.event(hostname, &format!("task-{kind}"), |body| {
            fields(body);
            body.field("uuid", uuid);
        });
        self.queue(event);
    }

    /// Queues the one heartbeat a `heartbeat` control command asks for: only `freq` 5 and
    /// the software fields, as Celery's worker sends it.
    pub(crate) fn heartbeat_requested(&self, hostname: &str) {
        let event = self.event(hostname, "worker-heartbeat", |body| {
            software(body);
            body.field("freq", &5.0);
        });
        self.queue(event);
    }

    fn queue(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An event of type `kind` with what `fields` writes and the fields every Celery event
    /// carries.
    fn event(&self, hostname: &str, kind: &str, fields: impl FnOnce(&mut EventFields)) -> Event {
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let offset = f64::from_bits(self.utcoffset.load(Ordering::Relaxed));
        let mut own = EventFields::new(ObjectWriter::with_capacity(256), COMMON);
        fields(&mut own);
        let mut body = own.into_object();
        body.field("type", kind);
        body.field("hostname", hostname);
        body.field("timestamp", &now_epoch());
        body.field("utcoffset", &offset);
        body.field("pid", &crate::worker_pid());
        body.field("clock", &clock);
        Event {
            key: kind.replace('-', "."),
            body: body.finish(),
        }
    }

    /// A `worker-online`, `-heartbeat` or `-offline` event with the state Flower shows.
    pub(crate) fn worker_event(&self, node: &str, active: usize, kind: &str) -> Event {
        self.utcoffset
            .store(utcoffset().to_bits(), Ordering::Relaxed);
        let processed = self.processed.load(Ordering::Relaxed);
        self.event(node, kind, |body| {
            software(body);
            body.field("freq", &HEARTBEAT.as_secs_f64())
                .field("active", &active)
                .field("processed", &processed)
                .field("loadavg", &loadavg());
        })
    }
}

/// `sw_ident`, `sw_ver`, `sw_sys`: what Flower shows as the worker's software.
fn software(body: &mut EventFields) {
    body.field("sw_ident", crate::WORKER_NAME)
        .field("sw_ver", crate::WORKER_VERSION)
        .field("sw_sys", "Linux");
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
    pub(crate) async fn queued(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<Event>> {
        self.rx.lock().await
    }

    /// Fills `batch` with what is due next: a heartbeat when `beat` ticks, else the next
    /// queued event; task events then wait up to `GATHER` for company (up to `BATCH`), so
    /// under load one broker message carries the events of many tasks. While it gathers, the
    /// loop looks at the queue every `GATHER_POLL` instead of waiting on it, so the tasks that
    /// queue events do not wake it once per event. False once the queue is closed.
    pub(crate) async fn next_batch(
        &self,
        heartbeat: impl Fn() -> Event,
        queued: &mut mpsc::Receiver<Event>,
        beat: &mut tokio::time::Interval,
        batch: &mut Vec<Event>,
    ) -> bool {
        tokio::select! {
            _ = beat.tick() => batch.push(heartbeat()),
            e = queued.recv() => match e {
                Some(e) => batch.push(e),
                None => return false,
            },
        };
        if !batch.iter().any(Event::is_task) {
            return true;
        }
        let until = tokio::time::Instant::now() + GATHER;
        loop {
            while batch.len() < BATCH {
                match queued.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    // Closed: what was gathered still goes out; the next call says so.
                    Err(mpsc::error::TryRecvError::Disconnected) => return true,
                }
            }
            let now = tokio::time::Instant::now();
            if batch.len() >= BATCH || now >= until {
                return true;
            }
            tokio::time::sleep_until(until.min(now + GATHER_POLL)).await;
        }
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
        m.task("w@h", "received", "id-1", |_| {});
        assert_eq!(m.tx.capacity(), BUFFER, "task events off: nothing queued");
        assert_eq!(m.enable(), json!({"ok": "task events enabled"}));
        assert_eq!(m.enable(), json!({"ok": "task events already enabled"}));
        m.task("w@h", "succeeded", "id-1", |f| {
            f.field("result", "5");
        });
        let event = m.rx.try_lock().unwrap().try_recv().unwrap();
        let e = event.value();
        assert_eq!(event.key, "task.succeeded");
        assert_eq!(e["type"], "task-succeeded");
        assert_eq!(e["uuid"], "id-1");
        assert_eq!(e["hostname"], "w@h");
        assert_eq!(e["clock"], 1);
        assert!(e["timestamp"].as_f64().unwrap() > 1.7e9);
        assert!(e["utcoffset"].is_number() && e["pid"].is_number());
        // A handler's field named like a common one gives way to it; bodies join into an array.
        m.task("w@h", "failed", "id-2", |f| {
            f.field("hostname", "spoofed")
                .field("exception", "ValueError('x')");
        });
        let failed = m.rx.try_lock().unwrap().try_recv().unwrap();
        let body = String::from_utf8(failed.body.clone()).unwrap();
        assert_eq!(body.matches("\"hostname\"").count(), 1, "{body}");
        assert_eq!(failed.value()["hostname"], "w@h");
        let multi: Value = serde_json::from_slice(&multi_body(&[event, failed])).unwrap();
        assert_eq!(multi[0]["uuid"], "id-1");
        assert_eq!(multi[1]["exception"], "ValueError('x')");
        assert_eq!(multi[1]["clock"], 2);
        assert_eq!(m.disable(), json!({"ok": "task events disabled"}));
        assert_eq!(m.disable(), json!({"ok": "task events already disabled"}));
        let load = loadavg();
        assert!(load.iter().all(|v| *v >= 0.0));
    }

    /// A batch of task events waits `GATHER` for company (taking what came every
    /// `GATHER_POLL`), leaves at once when full, and a heartbeat alone does not wait.
    #[tokio::test(start_paused = true)]
    async fn a_batch_gathers_task_events_for_its_deadline_or_until_full() {
        let m = Monitor::new(true);
        let mut queued = m.queued().await;
        let mut beat = heartbeats();
        let beat_event = || m.worker_event("w@h", 0, "worker-heartbeat");
        let mut batch = Vec::new();
        let started = tokio::time::Instant::now();
        for i in 0..BATCH + 10 {
            m.task("w@h", "started", &format!("id-{i}"), |_| {});
        }
        assert!(
            m.next_batch(beat_event, &mut queued, &mut beat, &mut batch)
                .await
        );
        assert_eq!(batch.len(), BATCH, "full: it leaves at once");
        assert_eq!(started.elapsed(), Duration::ZERO);
        batch.clear();
        // The last ten, then two more that come while they wait: one batch at the deadline.
        let late = async {
            tokio::time::sleep(GATHER / 2).await;
            m.task("w@h", "succeeded", "id-late-1", |_| {});
            m.task("w@h", "succeeded", "id-late-2", |_| {});
        };
        let (gathered, ()) = tokio::join!(
            m.next_batch(beat_event, &mut queued, &mut beat, &mut batch),
            late
        );
        assert!(gathered);
        assert_eq!(batch.len(), 12);
        assert_eq!(batch[11].value()["uuid"], "id-late-2");
        assert!(started.elapsed() >= GATHER && started.elapsed() < GATHER + GATHER_POLL);
        batch.clear();
        // Nothing queued: the heartbeat comes at its period and goes out alone.
        let before = tokio::time::Instant::now();
        assert!(
            m.next_batch(beat_event, &mut queued, &mut beat, &mut batch)
                .await
        );
        assert_eq!(
            (batch.len(), batch[0].key.as_str()),
            (1, "worker.heartbeat")
        );
        assert!(before.elapsed() <= HEARTBEAT);
    }
}
