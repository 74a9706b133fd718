//! The Redis bench's load: a private `redis-server`, N protocol-v2 task messages in kombu's
//! envelope pushed to a queue's list exactly as the Python client pushes them, and the
//! `SUCCESS` states counted as the result backend publishes them.

use redis::Commands;
use serde_json::{json, Map, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use worker::source::redis_broker::envelope::{encode, Outgoing};
use worker::source::redis_broker::keys::Keys;

/// A `redis-server` of the bench's own: a free port, its own directory, no snapshots; killed
/// when dropped.
pub struct Server {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free local port");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian's redis-server)");
        let server = Server {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.connection().is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn connection(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url(0))
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    /// Empties every database: the queues, `unacked`, the results.
    pub fn flush(&self) {
        let mut c = self.connection().expect("the bench's redis-server answers");
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
    }

    /// What a drain left: results stored in db 1, messages still in `queue`'s list and in
    /// `unacked` (a clean drain of N leaves N, 0, 0).
    pub fn left(&self, queue: &str) -> (usize, usize, usize) {
        let mut c = self.connection().expect("the bench's redis-server answers");
        let queued: usize = c.llen(Keys::new("", 0).list_for(queue, 0)).unwrap();
        let unacked: usize = c.hlen(Keys::new("", 0).unacked()).unwrap();
        redis::cmd("SELECT").arg(1).query::<()>(&mut c).unwrap();
        let results: usize = redis::cmd("DBSIZE").query(&mut c).unwrap();
        (results, queued, unacked)
    }

    /// Pushes `n` messages for `task` to `queue`'s list in db 0, as `send_task` does with
    /// kombu's Redis transport (default exchange: LPUSH to the queue's priority-0 list), a
    /// thousand per LPUSH. Task ids start `bench-`.
    pub fn preload(&self, task: &str, queue: &str, n: usize) {
        let mut c = self.connection().expect("the bench's redis-server answers");
        let list = Keys::new("", 0).list_for(queue, 0);
        let body =
            br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
        let reply_to = format!("{:032x}", fastrand::u128(..));
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(1000);
        for i in 0..n {
            let id = format!("bench-{i}-{:016x}", fastrand::u64(..));
            let mut m = Outgoing::task(body, headers(task, &id), "", queue);
            m.correlation_id = Some(&id);
            m.reply_to = Some(&reply_to);
            batch.push(encode(&m));
            if batch.len() == 1000 || i + 1 == n {
                let _: usize = c.lpush(&list, &batch).unwrap();
                batch.clear();
            }
        }
        let queued: usize = c.llen(&list).unwrap();
        assert_eq!(queued, n, "the preloaded queue holds every message");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Celery protocol v2 headers as Celery 5.7's `send_task` writes them to Redis (the AMQP
/// bench's headers, plus the ones the Python client adds on Redis: `origin`,
/// `ignore_result`, `group_index`, `replaced_task_nesting`, `stamped_headers`, `stamps`).
fn headers(task: &str, id: &str) -> Map<String, Value> {
    let h = json!({
        "lang": "py", "task": task, "id": id, "shadow": null, "eta": null, "expires": null,
        "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
        "root_id": id, "parent_id": null, "argsrepr": "()", "kwargsrepr": "{}",
        "origin": "bench@localhost", "ignore_result": null, "replaced_task_nesting": 0,
        "stamped_headers": null, "stamps": {},
    });
    match h {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// When the `SUCCESS` states came: the first, the last, and how many.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub first: Instant,
    pub last: Instant,
    pub count: usize,
}

impl Span {
    /// Completions per second from the first to the last (start-up excluded).
    pub fn rate(&self) -> f64 {
        (self.count.max(2) - 1) as f64 / (self.last - self.first).as_secs_f64().max(1e-9)
    }
}

/// Subscribes to every `celery-task-meta-*` channel (the result backend PUBLISHes each state
/// there as it SETs it; pub/sub spans databases), runs `start`, then counts `SUCCESS` states
/// until `n` came (None if `limit` passes first). `at(&started, k)` runs at the first and at
/// the `n/2`-th one (the bench reads CPU counters and memory there).
pub fn drain<T>(
    server: &Server,
    n: usize,
    limit: Duration,
    start: impl FnOnce() -> T,
    mut at: impl FnMut(&T, usize),
) -> (T, Option<Span>) {
    let mut c = redis::Client::open(server.url(1))
        .and_then(|c| c.get_connection())
        .expect("the bench's redis-server answers");
    let mut sub = c.as_pubsub();
    sub.psubscribe("celery-task-meta-*").unwrap();
    sub.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let started = start();
    let deadline = Instant::now() + limit;
    let mut span: Option<Span> = None;
    while span.map_or(0, |s| s.count) < n {
        if Instant::now() > deadline {
            return (started, None);
        }
        let msg = match sub.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(e) => panic!("reading the result channel: {e}"),
        };
        if !msg
            .get_payload_bytes()
            .windows(9)
            .any(|w| w == b"\"SUCCESS\"")
        {
            continue;
        }
        let now = Instant::now();
        let s = span.get_or_insert(Span {
            first: now,
            last: now,
            count: 0,
        });
        s.last = now;
        s.count += 1;
        if s.count == 1 || s.count == n / 2 {
            at(&started, s.count);
        }
    }
    (started, span)
}
