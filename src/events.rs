//! What happens in the worker, told to the plugins that subscribe (`events` in plugin.toml):
//! tasks received, started, progressing and ending, instances starting and exiting, plugins
//! installed, replaced and removed.
//!
//! Delivery never slows a task. `publish` builds an event only when some subscriber wants its
//! kind, then `try_send`s it into each subscriber's bounded buffer: a full buffer drops the
//! event and counts it. The subscriber's pool takes events from the buffer only while it has a
//! ready instance, and the instance writes them to the plugin's stdin only while a quarter of
//! its queue is still free (the rest is kept for requests); when it is not, delivery pauses for
//! `BLOCKED_RETRY` and the bus drops meanwhile. So a subscriber that stops reading loses events (and is told how many, in the
//! `dropped` field of the next one it gets) while every task goes on at full speed.

pub use crate::json_object::EventFields;
use crate::json_object::ObjectWriter;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Events a subscriber's buffer holds while its plugin is not taking them.
pub const BUFFER: usize = 1024;

/// How long delivery pauses after a plugin's stdin had no room for an event.
pub const BLOCKED_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Every event kind, by family. A manifest subscribes with `"<family>.*"`, an exact kind, or
/// `"*"`.
pub const KINDS: &[&str] = &[
    "task.received",
    "task.started",
    "task.progress",
    "task.succeeded",
    "task.failed",
    "task.retried",
    "task.revoked",
    "instance.started",
    "instance.exited",
    "instance.failed",
    "plugin.installed",
    "plugin.replaced",
    "plugin.removed",
];

/// Whether `pattern` is one a manifest may subscribe with.
pub fn valid_pattern(pattern: &str) -> bool {
    pattern == "*"
        || KINDS.contains(&pattern)
        || pattern
            .strip_suffix(".*")
            .is_some_and(|family| KINDS.iter().any(|k| k.split('.').next() == Some(family)))
}

fn matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// One subscriber's delivery counts, shared by the bus, its pool and its instances.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    delivered: AtomicU64,
    dropped: AtomicU64,
    /// How many of `dropped` a sent event's `dropped` field has told: the next one tells the
    /// rest. (A drop is one increment, of `dropped` alone: it happens per task while a
    /// subscriber lags.)
    reported: AtomicU64,
    /// The plugin's stdin had no room for the last event: its pool stops taking events from the
    /// buffer for a while, so that while it is stuck an event costs one failed `try_send`.
    blocked: AtomicBool,
}

impl DeliveryStats {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the `event` notification line for `event` (a JSON object) to `out`, taking the
    /// drops not yet reported into its `dropped` field; `sent` counts it once it is queued.
    /// (Only a line that has a place in the stdin queue is written, so a written line is never
    /// dropped and the drops it took are reported.)
    pub fn write_notification(&self, event: &str, out: &mut Vec<u8>) {
        // `fetch_max`: of two notifications written at once, the later total wins, and each drop
        // is told once.
        let total = self.dropped.load(Ordering::Relaxed);
        let dropped = total.saturating_sub(self.reported.fetch_max(total, Ordering::Relaxed));
        let body = event.strip_suffix('}').unwrap_or(event);
        out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"params\":");
        out.extend_from_slice(body.as_bytes());
        if body.len() > 1 {
            out.push(b',');
        }
        // Writing into a Vec cannot fail.
        let _ = writeln!(out, "\"dropped\":{dropped}}}}}");
    }

    pub fn sent(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// The plugin's stdin had no room for the event: it is dropped, and delivery pauses (see
    /// `blocked`).
    pub fn unsent(&self) {
        self.count_drop();
        self.blocked.store(true, Ordering::Relaxed);
    }

    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Try the plugin's stdin again.
    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

/// An event on its way to one subscriber: the serialized object, shared by all of them.
pub type Event = Arc<str>;

/// A plugin's subscription: its buffer's receiving end. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub events: mpsc::Receiver<Event>,
    pub stats: Arc<DeliveryStats>,
    pub patterns: Vec<String>,
}

#[derive(Debug)]
struct Subscriber {
    patterns: Vec<String>,
    tx: mpsc::Sender<Event>,
    stats: Arc<DeliveryStats>,
}

impl Subscriber {
    fn wants(&self, kind: &str) -> bool {
        self.patterns.iter().any(|p| matches(p, kind))
    }
}

/// The worker's one event bus.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: RwLock<Vec<Subscriber>>,
}

impl EventBus {
    pub fn new() -> Arc<EventBus> {
        Arc::new(EventBus::default())
    }

    /// Subscribes to the kinds `patterns` match, with a buffer of `capacity` events.
    pub fn subscribe(&self, patterns: &[String], capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(DeliveryStats::default());
        let mut subscribers = self.subscribers.write().expect("event bus lock");
        subscribers.retain(|s| !s.tx.is_closed());
        subscribers.push(Subscriber {
            patterns: patterns.to_vec(),
            tx,
            stats: stats.clone(),
        });
        Subscription {
            events: rx,
            stats,
            patterns: patterns.to_vec(),
        }
    }

    /// Tells every subscriber that wants `kind`; `fields` writes the event's fields, and is
    /// called only if one does.
    pub fn publish(&self, kind: &'static str, fields: impl FnOnce(&mut EventFields)) {
        let subscribers = self.subscribers.read().expect("event bus lock");
        let (mut fields, mut event) = (Some(fields), None::<Event>);
        for s in subscribers
            .iter()
            .filter(|s| !s.tx.is_closed() && s.wants(kind))
        {
            // A full buffer drops the event before it is even built: a stuck subscriber
            // costs the task next to nothing.
            if s.tx.capacity() == 0 {
                s.stats.count_drop();
                continue;
            }
            let event = event.get_or_insert_with(|| {
                let fields = fields.take().expect("built once");
                serialize(kind, fields).into()
            });
            if s.tx.try_send(event.clone()).is_err() {
                s.stats.count_drop();
            }
        }
    }
}

/// The event as a JSON object: `event` and `time` first, then what `fields` writes.
fn serialize(kind: &str, fields: impl FnOnce(&mut EventFields)) -> String {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut object = ObjectWriter::with_capacity(192);
    object.field("event", kind);
    object.field("time", &time);
    let mut event = EventFields::new(object, &["event", "time"]);
    fields(&mut event);
    String::from_utf8(event.into_object().finish()).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn patterns_are_families_kinds_or_everything() {
        for ok in ["*", "task.*", "instance.*", "plugin.*", "task.succeeded"] {
            assert!(valid_pattern(ok), "{ok}");
        }
        for bad in ["task", "tasks.*", "task.done", "", "*.*"] {
            assert!(!valid_pattern(bad), "{bad}");
        }
        assert!(matches("task.*", "task.started"));
        assert!(!matches("task.*", "instance.started"));
        assert!(matches("*", "plugin.removed"));
        assert!(matches("instance.exited", "instance.exited"));
    }

    #[test]
    fn a_full_buffer_drops_and_the_next_notification_says_how_many() {
        let bus = EventBus::new();
        let mut sub = bus.subscribe(&["task.*".into()], 2);
        let mut built = 0;
        for i in 0..5 {
            bus.publish("task.received", |f| {
                built += 1;
                f.field("n", &i);
            });
        }
        bus.publish("plugin.installed", |_| {
            unreachable!("nobody wants plugin events")
        });
        assert_eq!(built, 2, "built only while a buffer has room");
        assert_eq!(sub.stats.dropped(), 3);
        let first = sub.events.try_recv().unwrap();
        let mut line = Vec::new();
        sub.stats.write_notification(&first, &mut line);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["method"], "event");
        assert_eq!(v["params"]["event"], "task.received");
        assert_eq!(v["params"]["n"], 0);
        assert_eq!(v["params"]["dropped"], 3);
        assert!(v["params"]["time"].as_f64().unwrap() > 1.7e9);
        sub.stats.sent();
        let mut line = b"before\n".to_vec();
        sub.stats
            .write_notification(&sub.events.try_recv().unwrap(), &mut line);
        let line = line.strip_prefix(b"before\n").expect("appended");
        assert_eq!(line.last(), Some(&b'\n'), "one whole line");
        let v: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(
            (v["params"]["n"].clone(), v["params"]["dropped"].clone()),
            (1.into(), 0.into())
        );
        assert_eq!(sub.stats.dropped(), 3, "the total stays");
    }

    #[test]
    fn every_drop_is_told_once_even_by_notifications_written_at_once() {
        let stats = DeliveryStats::default();
        let told = |stats: &DeliveryStats| {
            let mut line = Vec::new();
            stats.write_notification("{\"event\":\"task.received\"}", &mut line);
            let v: Value = serde_json::from_slice(&line).unwrap();
            v["params"]["dropped"].as_u64().unwrap()
        };
        for _ in 0..5 {
            stats.count_drop();
        }
        assert_eq!(told(&stats), 5);
        assert_eq!(told(&stats), 0);
        // Two threads writing while drops go on: what they tell adds up to every drop.
        let told_by_all: u64 = std::thread::scope(|s| {
            let writers: Vec<_> = (0..2)
                .map(|_| s.spawn(|| (0..1000).map(|_| told(&stats)).sum::<u64>()))
                .collect();
            for _ in 0..10_000 {
                stats.count_drop();
            }
            writers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(told_by_all + told(&stats), 10_000);
        assert_eq!(stats.dropped(), 10_005);
    }

    #[test]
    fn an_event_is_one_object_whose_kind_no_field_replaces() {
        let text = serialize("task.failed", |f| {
            f.field("event", "x")
                .field("time", &0)
                .field("error", "boom");
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["error"].as_str()),
            (Some("task.failed"), Some("boom"))
        );
        assert_eq!(text.matches("\"event\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"time\"").count(), 1, "{text}");
    }

    #[test]
    fn a_dropped_subscription_is_forgotten() {
        let bus = EventBus::new();
        drop(bus.subscribe(&["*".into()], 4));
        bus.publish("task.received", |_| unreachable!("no live subscriber"));
        let _live = bus.subscribe(&["*".into()], 4);
        assert_eq!(bus.subscribers.read().unwrap().len(), 1);
    }
}
