//! The queue-backend bench's load, both sides of it: one client that keeps a window of
//! JSON-RPC requests in flight over a line-delimited connection (a queue backend's
//! `task.offer`s over its stdio, or `task.submit`s over the control socket: the same loop, the
//! same parsing), and the queue backend itself, the bench's own binary run by the worker with
//! `BENCH_OFFERS_CHILD=1`, which offers as fast as its window allows (`BENCH_OFFERS_MODE=window`)
//! or ignores the window and floods (`flood`), and writes its figures as JSON to
//! `BENCH_OFFERS_OUT`. It reads the worker's CPU and memory from `/proc/<its parent>`.

use super::procstat;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The task both contenders run: the Rust example plugin's echo.
pub const ECHO: &str = "rust.echo";

/// One timed run of `tasks` requests with a window in flight, from the first request written
/// to the last answer read; CPU seconds over the same span.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Requests answered, `failed` of them not with a success.
    pub tasks: usize,
    pub secs: f64,
    /// The worker's own process (all its threads).
    pub worker_cpu: f64,
    /// The worker's other children: the task plugin's instances.
    pub plugins_cpu: f64,
    /// The process driving it (the queue backend, or the bench as control client).
    pub client_cpu: f64,
    pub failed: usize,
    pub first_failure: Option<String>,
    /// The worker's VmRSS (KiB) once the last answer was read.
    pub worker_rss_kib: u64,
}

impl Tally {
    /// Tasks that ran, per second.
    pub fn rate(&self) -> f64 {
        self.ran() as f64 / self.secs.max(1e-9)
    }

    /// `cpu` seconds as microseconds per task that ran.
    pub fn per_task(&self, cpu: f64) -> f64 {
        cpu * 1e6 / self.ran().max(1) as f64
    }

    fn ran(&self) -> usize {
        self.tasks - self.failed
    }
}

/// Runs `work` and times it, reading the CPU of `worker` (its own process), of its children
/// other than `me`, and of `me`, before and after, and the worker's memory after.
pub fn measure(
    tasks: usize,
    worker: u32,
    me: u32,
    work: impl FnOnce() -> (usize, Option<String>),
) -> Tally {
    let read = || {
        let plugins: Duration = procstat::descendants(worker)
            .into_iter()
            .filter(|&p| p != me)
            .map(procstat::cpu)
            .sum();
        (procstat::cpu(worker), plugins, procstat::cpu(me))
    };
    let before = read();
    let start = Instant::now();
    let (failed, first_failure) = work();
    let secs = start.elapsed().as_secs_f64();
    let after = read();
    let diff = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64();
    Tally {
        tasks,
        secs,
        worker_cpu: diff(before.0, after.0),
        plugins_cpu: diff(before.1, after.1),
        client_cpu: diff(before.2, after.2),
        failed,
        first_failure,
        worker_rss_kib: procstat::status_kib(worker, "VmRSS"),
    }
}

/// What one line from the peer was.
enum Incoming {
    /// A response: `Ok` for a success (`SUCCESS` for an offer), else the line.
    Answer(Result<(), String>),
    /// A request to answer (`ping`, `shutdown`, `initialize`).
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    /// `exit`, or the peer closed the connection.
    Gone,
    /// Anything else: a notification (`task.accepted`, `initialized`).
    Note(String),
}

fn classify(line: &[u8]) -> Incoming {
    let Ok(msg) = serde_json::from_slice::<Value>(line) else {
        return Incoming::Note(String::new());
    };
    if let Some(method) = msg["method"].as_str() {
        return match (&msg["id"], method) {
            (_, "exit") => Incoming::Gone,
            (Value::Null, m) => Incoming::Note(m.to_string()),
            (id, m) => Incoming::Request {
                id: id.clone(),
                method: m.to_string(),
                params: msg["params"].clone(),
            },
        };
    }
    let ok = msg
        .get("result")
        .is_some_and(|r| r.get("state").is_none_or(|s| s == "SUCCESS"));
    let text = || String::from_utf8_lossy(line).trim_end().to_string();
    Incoming::Answer(if ok { Ok(()) } else { Err(text()) })
}

/// The answer to a request from the worker (only a queue backend gets any).
fn reply(id: &Value, method: &str) -> Vec<u8> {
    let result = match method {
        "initialize" => {
            json!({"protocol_version": "1.5", "plugin": {"name": "bench-offers", "version": "1"},
                   "tasks": [], "capabilities": []})
        }
        "ping" => json!({}),
        "shutdown" => Value::Null,
        other => {
            let e = json!({"code": -32601, "message": format!("no method {other}")});
            let line = json!({"jsonrpc": "2.0", "id": id, "error": e});
            return format!("{line}\n").into_bytes();
        }
    };
    format!(
        "{}\n",
        json!({"jsonrpc": "2.0", "id": id, "result": result})
    )
    .into_bytes()
}

/// A line-delimited JSON-RPC connection, read and written from one thread; the writes are
/// flushed whenever no whole line waits to be read, so a batch of requests goes out in one
/// write.
pub struct Lines<R: Read, W: Write> {
    input: BufReader<R>,
    output: std::io::BufWriter<W>,
    line: Vec<u8>,
}

impl<R: Read, W: Write> Lines<R, W> {
    pub fn new(read: R, write: W) -> Self {
        Lines {
            input: BufReader::with_capacity(1 << 16, read),
            output: std::io::BufWriter::with_capacity(1 << 16, write),
            line: Vec::with_capacity(1024),
        }
    }

    fn next(&mut self) -> Incoming {
        if !self.input.buffer().contains(&b'\n') {
            self.output.flush().expect("the peer reads");
        }
        self.line.clear();
        match self.input.read_until(b'\n', &mut self.line) {
            Ok(0) | Err(_) => Incoming::Gone,
            Ok(_) => classify(&self.line),
        }
    }

    fn answer(&mut self, id: &Value, method: &str) {
        self.output
            .write_all(&reply(id, method))
            .expect("the peer reads");
    }

    /// The reader and the writer apart, for a reader thread; unread input stays buffered.
    fn into_parts(mut self) -> (BufReader<R>, std::io::BufWriter<W>) {
        self.output.flush().expect("the peer reads");
        (self.input, self.output)
    }

    /// Keeps `window` requests (`request(i)` for i in 0..n) in flight until all `n` are
    /// answered, answering the peer's own requests meanwhile. Returns the failures (and the
    /// first one's line), or `None` if the peer went away first.
    pub fn pump(
        &mut self,
        n: usize,
        window: usize,
        mut request: impl FnMut(usize) -> Vec<u8>,
    ) -> Option<(usize, Option<String>)> {
        let (mut sent, mut done, mut failed, mut first) = (0, 0, 0, None);
        while done < n {
            while sent < n && sent - done < window {
                self.output
                    .write_all(&request(sent))
                    .expect("the peer reads");
                sent += 1;
            }
            match self.next() {
                Incoming::Answer(a) => {
                    done += 1;
                    if let Err(line) = a {
                        failed += 1;
                        first.get_or_insert(line);
                    }
                }
                Incoming::Request { id, method, .. } => self.answer(&id, &method),
                Incoming::Note(_) => {}
                Incoming::Gone => return None,
            }
        }
        Some((failed, first))
    }

    /// Answers requests until `initialized`; the window `initialize` gave.
    fn handshake(&mut self) -> usize {
        let mut window = 16;
        loop {
            match self.next() {
                Incoming::Request { id, method, params } => {
                    if method == "initialize" {
                        window = params["queue_backend"]["window"].as_u64().unwrap_or(16) as usize;
                    }
                    self.answer(&id, &method);
                }
                Incoming::Note(m) if m == "initialized" => return window,
                Incoming::Gone => std::process::exit(0),
                _ => {}
            }
        }
    }

    /// Answers requests until `exit` or the end of input.
    fn serve_until_exit(&mut self) {
        loop {
            match self.next() {
                Incoming::Request { id, method, .. } => self.answer(&id, &method),
                Incoming::Gone => return,
                _ => {}
            }
        }
    }
}

/// A `task.offer` request line.
pub fn offer(id: usize, task_id: &str, task: &str, args: &str) -> Vec<u8> {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"task.offer\",\"params\":{{\"task_id\":\"{task_id}\",\"task\":\"{task}\",\"args\":{args},\"kwargs\":{{}}}}}}\n").into_bytes()
}

/// A control-socket `task.submit` request line (with the task id given, as an offer gives it).
pub fn submit(id: usize, task_id: &str, task: &str, args: &str) -> Vec<u8> {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"task.submit\",\"params\":{{\"id\":\"{task_id}\",\"name\":\"{task}\",\"args\":{args},\"kwargs\":{{}}}}}}\n").into_bytes()
}

/// Warms a connection up with `n` echo tasks until a round of them all succeeds (the task
/// plugin may still be starting when the first round goes); false if the peer went away
/// first (a queue backend run by `worker plugins install`'s probe, which takes no offer).
pub fn warm_up<R: Read, W: Write>(
    conn: &mut Lines<R, W>,
    n: usize,
    window: usize,
    line: fn(usize, &str, &str, &str) -> Vec<u8>,
) -> bool {
    for attempt in 0..200 {
        let Some((failed, _)) = conn.pump(n, window, |i| {
            line(
                i + 1,
                &format!("warm-{attempt}-{i}"),
                ECHO,
                &format!("[{i}]"),
            )
        }) else {
            return false;
        };
        if failed == 0 {
            return true;
        }
        // Not taken yet: try again shortly.
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the echo plugin never took {n} tasks in a row");
}

/// Writes `value` to `path` whole (a temporary file renamed over it), for the bench to read.
fn report(value: &impl Serialize) {
    let path = std::env::var("BENCH_OFFERS_OUT").expect("BENCH_OFFERS_OUT is set");
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, serde_json::to_vec(value).expect("serializes")).expect("writable");
    std::fs::rename(&tmp, &path).expect("renamed");
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The queue backend: handshake, a warm-up (the daemon's first offers may wait for the task
/// plugin; `plugins install`'s probe takes none and stops it there), then the mode's work,
/// then serve until the worker stops it. A flood runs once: a restarted flooder only serves.
pub fn child() {
    let mut conn = Lines::new(std::io::stdin(), std::io::stdout());
    let window = conn.handshake();
    let out = std::env::var("BENCH_OFFERS_OUT").expect("BENCH_OFFERS_OUT is set");
    let started = Path::new(&out).with_extension("started");
    let flood_mode = std::env::var("BENCH_OFFERS_MODE").as_deref() == Ok("flood");
    if flood_mode && started.exists() {
        return conn.serve_until_exit();
    }
    if !warm_up(&mut conn, 2 * window, window, offer) {
        return;
    }
    if flood_mode {
        return flood(conn, window, &started);
    }
    offer_window(&mut conn, window);
    conn.serve_until_exit();
}

/// `BENCH_OFFERS_N` echo offers (default 100,000), as many in flight as the window allows.
fn offer_window<R: Read, W: Write>(conn: &mut Lines<R, W>, window: usize) {
    let n = env_usize("BENCH_OFFERS_N", 100_000);
    let worker = nix::unistd::getppid().as_raw() as u32;
    let tally = measure(n, worker, std::process::id(), || {
        conn.pump(n, window, |i| {
            offer(i + 1, &format!("t-{i}"), ECHO, &format!("[{i}]"))
        })
        .unwrap_or_else(|| std::process::exit(0))
    });
    report(&tally);
}

/// What the flood saw: the worker's memory (KiB) before, once all but a window were answered
/// and once all were answered; the answers by kind. The `*_before` figures are also written to
/// `<BENCH_OFFERS_OUT>.started` as the flood begins, for a flood the worker ends midway.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Flood {
    pub offers: usize,
    pub window: usize,
    /// Offers it lets go unanswered at most (0: no limit).
    pub ahead: usize,
    pub bytes_written: usize,
    /// Seconds from the first offer written to the last written.
    pub write_secs: f64,
    /// Seconds from the first offer written until all but `window` were answered.
    pub flood_secs: f64,
    pub rss_before: u64,
    pub hwm_before: u64,
    pub rss_flooded: u64,
    pub hwm_flooded: u64,
    pub rss_end: u64,
    pub hwm_end: u64,
    pub refused: usize,
    pub succeeded: usize,
    pub other: usize,
    pub first_other: Option<String>,
}

impl Flood {
    fn count(&mut self, a: Answered) {
        match a {
            Answered::Success => self.succeeded += 1,
            Answered::Refused => self.refused += 1,
            Answered::Other(line) => {
                self.other += 1;
                self.first_other.get_or_insert(line);
            }
        }
    }
}

/// What one answer to a flooded offer was.
enum Answered {
    Success,
    Refused,
    Other(String),
}

/// `BENCH_OFFERS_N` offers (default 200,000) of a task that sleeps (`rust.count` of
/// `BENCH_FLOOD_STEPS` steps of 100 ms, default 100: 10 s), whatever the window: as fast as
/// the pipe takes them, or (`BENCH_FLOOD_AHEAD=k`) never more than k unanswered. A second
/// thread reads and counts the answers.
fn flood(conn: Lines<std::io::Stdin, std::io::Stdout>, window: usize, started: &Path) {
    let n = env_usize("BENCH_OFFERS_N", 200_000);
    let steps = env_usize("BENCH_FLOOD_STEPS", 100);
    let ahead = env_usize("BENCH_FLOOD_AHEAD", 0);
    let (input, out) = conn.into_parts();
    let out = Arc::new(Mutex::new(out));
    let (tx, answers) = mpsc::channel::<Answered>();
    let (running, started_reading) = mpsc::channel::<()>();
    let reader = {
        let out = out.clone();
        std::thread::spawn(move || {
            let _ = running.send(());
            read_answers(input, tx, out)
        })
    };
    // The reader is on its way before the first offer goes.
    started_reading.recv().expect("the reader thread started");
    let worker = nix::unistd::getppid().as_raw() as u32;
    let mem = || {
        (
            procstat::status_kib(worker, "VmRSS"),
            procstat::status_kib(worker, "VmHWM"),
        )
    };
    let (rss_before, hwm_before) = mem();
    let mut f = Flood {
        offers: n,
        window,
        ahead,
        rss_before,
        hwm_before,
        ..Flood::default()
    };
    std::fs::write(started, serde_json::to_vec(&f).expect("serializes")).expect("writable");
    let args = format!("[{steps}, 100]");
    // Paced, in quarters of `ahead`: the offers that run hold their places for seconds, so
    // chunks of `ahead` would wait for them.
    let chunk = if ahead == 0 {
        1000
    } else {
        (ahead / 4).clamp(1, 1000)
    };
    let start = Instant::now();
    let mut seen = 0;
    let at_flooded = |f: &mut Flood, seen: usize| {
        if seen == n.saturating_sub(window) {
            f.flood_secs = start.elapsed().as_secs_f64();
            (f.rss_flooded, f.hwm_flooded) = mem();
        }
    };
    for from in (0..n).step_by(chunk) {
        let to = (from + chunk).min(n);
        // Paced: wait for answers until this chunk keeps within `ahead` unanswered.
        while ahead > 0 && to - seen > ahead {
            f.count(answers.recv().expect("the reader runs until exit"));
            seen += 1;
            at_flooded(&mut f, seen);
        }
        let mut out = out.lock().expect("no writer panicked");
        for i in from..to {
            let line = offer(i + 1, &format!("flood-{i}"), "rust.count", &args);
            f.bytes_written += line.len();
            out.write_all(&line).expect("the worker reads");
        }
        out.flush().expect("the worker reads");
    }
    f.write_secs = start.elapsed().as_secs_f64();
    while seen < n {
        let Ok(a) = answers.recv() else { break };
        f.count(a);
        seen += 1;
        at_flooded(&mut f, seen);
    }
    (f.rss_end, f.hwm_end) = mem();
    report(&f);
    let _ = reader.join();
}

/// Reads the worker's lines until `exit`: answers go to `answers`, requests are answered.
fn read_answers(
    mut input: BufReader<impl Read>,
    answers: mpsc::Sender<Answered>,
    out: Arc<Mutex<impl Write>>,
) {
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        // Counted by substring: this thread must keep up with the worker's refusals.
        let has = |s: &[u8]| line.windows(s.len()).any(|w| w == s);
        let a = if has(b"\"method\"") {
            match classify(&line) {
                Incoming::Request { id, method, .. } => {
                    let mut out = out.lock().expect("no writer panicked");
                    let _ = out.write_all(&reply(&id, &method));
                    let _ = out.flush();
                    continue;
                }
                Incoming::Gone => return,
                _ => continue,
            }
        } else if has(b"-32005") {
            Answered::Refused
        } else if has(b"\"SUCCESS\"") {
            Answered::Success
        } else {
            Answered::Other(String::from_utf8_lossy(&line).trim_end().to_string())
        };
        let _ = answers.send(a);
    }
}

/// Waits (up to `limit`) for the JSON a queue backend writes to `path`.
pub fn wait_report<T: for<'de> Deserialize<'de>>(path: &Path, limit: Duration) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read(path) {
            return serde_json::from_slice(&text).ok();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
