//! `/metrics` (`metrics_listen`) read by the reference OpenMetrics parser (`prometheus_client`,
//! in the Celery venv): counters match known work through the broker and the control socket,
//! and scraping while tasks flow answers every time without losing a task. Hostile clients of
//! the port (idle keep-alive, silent, pipelining) cannot hold its connections: a scrape is
//! answered at once (503 when every connection is taken) and they are closed in bounded time.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use worker::metrics::http::{HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_REQUESTS};

/// The samples of `text`, as the reference parser reads them (it fails on invalid text).
fn parse(python: &Path, text: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .arg(repo().join("tests/celery/openmetrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{text}",
        text_of(&out.stderr)
    );
    text_of(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of the sample `name` whose labels include `labels` (None if absent).
fn value(samples: &[Value], name: &str, labels: Value) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &s["labels"][k] == v)
        })
        .map(|s| s["value"].as_f64().unwrap())
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_metrics_count_known_work_and_parse_as_openmetrics() {
    let (lane, root, plugins) = setup!("amqp_metrics");
    let python = openmetrics_python("amqp_metrics");
    fib_plugin(&plugins);
    let mut d = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &[
            "--broker",
            BROKER,
            "-Q",
            &lane.queue,
            "-n",
            &lane.node,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    d.wait_log("consuming Celery tasks");
    let addr = metrics_addr(&mut d);

    assert_eq!(
        lane.run(&["batch", "fibonacci", "[10]", "20"]),
        json!({"ok": 20, "failed": []})
    );
    assert_eq!(
        lane.run(&["call", "fibonacci", "[-1]"])["exc_type"],
        "ValueError"
    );
    assert_eq!(lane.run(&["garbage"]), json!({"ok": 7}));
    // Through the control socket: one success, one unknown name.
    let ok = d.cli(&["task", "run", "py.noop"]).output().unwrap();
    assert!(ok.status.success(), "{}", text_of(&ok.stderr));
    let unknown = d.cli(&["task", "run", "no.such.task"]).output().unwrap();
    assert!(!unknown.status.success());
    let reload = d.cli(&["reload"]).output().unwrap();
    assert!(reload.status.success(), "{}", text_of(&reload.stderr));

    // The garbage is rejected as it arrives; wait for the last rejection to be counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let (status, content_type, body) = scrape(&addr);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        let samples = parse(&python, &body);
        let rejected = value(
            &samples,
            "worker_broker_deliveries_total",
            json!({"outcome": "rejected"}),
        );
        if rejected == Some(7.0) || Instant::now() > deadline {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let fib = |outcome: &str| {
        value(
            &samples,
            "worker_tasks_total",
            json!({"plugin": "python-fibonacci", "task": "fibonacci", "outcome": outcome}),
        )
    };
    assert_eq!(fib("success"), Some(20.0));
    assert_eq!(fib("raised"), Some(1.0));
    assert_eq!(
        value(
            &samples,
            "worker_tasks_total",
            json!({"plugin": "python-fibonacci", "task": "py.noop", "outcome": "success"})
        ),
        Some(1.0)
    );
    // A name nobody serves is counted without it: clients cannot grow the label set.
    assert_eq!(
        value(
            &samples,
            "worker_tasks_total",
            json!({"plugin": "", "task": "", "outcome": "not_registered"})
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_task_duration_seconds_count",
            json!({"plugin": "python-fibonacci", "task": "fibonacci"})
        ),
        Some(21.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_broker_deliveries_total",
            json!({"outcome": "acked"})
        ),
        Some(21.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_broker_deliveries_total",
            json!({"outcome": "rejected"})
        ),
        Some(7.0)
    );
    assert_eq!(
        value(&samples, "worker_result_publish_seconds_count", json!({})),
        Some(21.0)
    );
    assert_eq!(
        value(&samples, "worker_broker_connected", json!({})),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "worker_broker_reconnects_total", json!({})),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_instances",
            json!({"plugin": "python-fibonacci", "state": "ready"})
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_tasks_in_flight",
            json!({"plugin": "python-fibonacci"})
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_tasks_queued",
            json!({"plugin": "python-fibonacci"})
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_instance_restarts_total",
            json!({"plugin": "python-fibonacci"})
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "worker_plugin_installs_total",
            json!({"result": "failed"})
        ),
        Some(0.0)
    );
    assert!(
        value(
            &samples,
            "worker_instance_uptime_seconds",
            json!({"plugin": "python-fibonacci", "instance": "0"})
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        value(
            &samples,
            "worker_build_info",
            json!({"version": env!("CARGO_PKG_VERSION")})
        ),
        Some(1.0)
    );
    // Low cardinality: no task ids or pids anywhere.
    for s in &samples {
        for key in s["labels"].as_object().unwrap().keys() {
            assert!(!["task_id", "id", "pid"].contains(&key.as_str()), "{s}");
        }
    }
}

/// Submits `n` tasks over one control connection, at most `window` at a time; returns how many
/// succeeded.
fn submit_all(socket: &Path, task: &str, n: usize, window: usize) -> usize {
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    let (mut sent, mut done, mut ok) = (0, 0, 0);
    while done < n {
        while sent < n && sent - done < window {
            writeln!(conn, r#"{{"jsonrpc":"2.0","id":{sent},"method":"task.submit","params":{{"name":"{task}","args":[{sent}]}}}}"#).unwrap();
            sent += 1;
        }
        let msg: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if msg.get("id").is_some() {
            done += 1;
            ok += usize::from(msg.get("result").is_some());
        }
    }
    ok
}

#[test]
fn scraping_while_tasks_flow_answers_every_time_and_loses_no_task() {
    let python = openmetrics_python("metrics_under_load");
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    rust_plugin(&plugins, "");
    let mut d = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&mut d);
    let n = 5_000;
    let rounds = 3;
    // Rounds without and with a scraper, alternating, for the ratio printed at the end (a
    // figure, not an assertion: speed is measured by benchmarks, never asserted by tests).
    let (mut quiet, mut scraped, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let began = Instant::now();
        assert_eq!(submit_all(&d.socket, "rust.echo", n, 200), n);
        quiet.push(began.elapsed().as_secs_f64());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut bodies = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _, body) = scrape(&addr);
                    assert_eq!(status, "HTTP/1.1 200 OK");
                    bodies.push(body);
                    // 20 scrapes a second: far more often than any Prometheus (15 s default).
                    std::thread::sleep(Duration::from_millis(50));
                }
                bodies
            })
        };
        let began = Instant::now();
        let ok = submit_all(&d.socket, "rust.echo", n, 200);
        scraped.push(began.elapsed().as_secs_f64());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        bodies.extend(scraper.join().unwrap());
        assert_eq!(ok, n, "every task answered while being scraped");
    }
    assert!(bodies.len() >= 2, "scraped {} times", bodies.len());
    // The success counter never goes back, and ends at every task of every round.
    let mut last = 0.0;
    for body in bodies
        .iter()
        .step_by((bodies.len() / 20).max(1))
        .chain(bodies.last())
    {
        let samples = parse(&python, body);
        let done = value(
            &samples,
            "worker_tasks_total",
            json!({"task": "rust.echo", "outcome": "success"}),
        )
        .unwrap_or(0.0);
        assert!(done >= last, "counter went from {last} to {done}");
        last = done;
    }
    let (_, _, body) = scrape(&addr);
    let samples = parse(&python, &body);
    assert_eq!(
        value(
            &samples,
            "worker_tasks_total",
            json!({"task": "rust.echo", "outcome": "success"})
        ),
        Some((2 * rounds * n) as f64)
    );
    let ratios: Vec<String> = quiet
        .iter()
        .zip(&scraped)
        .map(|(q, s)| format!("{:.2}x", q / s))
        .collect();
    eprintln!(
        "{} scrapes; task throughput while scraped vs not, per round of {n}: {}",
        bodies.len(),
        ratios.join(", ")
    );
}

/// A daemon serving the Rust example plugin with `/metrics` on a free port, and that address.
fn metrics_daemon(root: &Path) -> (Daemon, String) {
    let plugins = root.join("plugins");
    rust_plugin(&plugins, "");
    let mut d = Daemon::start_with(
        &plugins,
        &root.join("w.sock"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&mut d);
    (d, addr)
}

/// A connection to `addr` whose reads give up after `timeout`.
fn connect(addr: &str, timeout: Duration) -> BufReader<TcpStream> {
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(timeout)).unwrap();
    BufReader::new(conn)
}

/// Sends `GET /metrics` without closing the connection.
fn ask(conn: &mut BufReader<TcpStream>) {
    conn.get_mut()
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
        .unwrap();
}

/// One HTTP response read off a connection.
struct Answer {
    status: String,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The next response on `conn`; None when the server has closed the connection. Panics if
/// nothing comes within the connection's read timeout.
fn next_answer(conn: &mut BufReader<TcpStream>) -> Option<Answer> {
    let mut status = String::new();
    if conn.read_line(&mut status).expect("an answer in time") == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).expect("the headers in time");
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut answer = Answer {
        status: status.trim_end().to_string(),
        headers,
        body: String::new(),
    };
    let length: usize = answer
        .header("content-length")
        .expect("a content-length")
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    conn.read_exact(&mut body).expect("the body in time");
    answer.body = text_of(&body);
    Some(answer)
}

/// True if the server closes `conn` (end of stream, or a reset) before its read timeout.
fn closed_by_server(conn: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    match conn.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn assert_busy(answer: &Answer) {
    assert_eq!(answer.status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(answer.body.contains("busy"), "{}", answer.body);
}

#[test]
fn idle_keep_alive_connections_get_a_new_scrape_a_503_at_once_and_are_closed_soon() {
    let root = tempfile::tempdir().unwrap();
    let (_d, addr) = metrics_daemon(root.path());
    // Every connection slot taken by a client that scraped once and keeps the connection.
    let mut idle: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut conn = connect(&addr, HEADER_TIMEOUT * 3);
            ask(&mut conn);
            let answer = next_answer(&mut conn).expect("an answer");
            assert_eq!(answer.status, "HTTP/1.1 200 OK");
            assert_eq!(answer.header("connection"), None, "kept alive");
            conn
        })
        .collect();
    let idle_since = Instant::now();

    // A new scrape is not left waiting behind them: it is refused at once.
    let mut conn = connect(&addr, Duration::from_secs(2));
    ask(&mut conn);
    assert_busy(&next_answer(&mut conn).expect("an answer"));
    assert!(closed_by_server(&mut conn));

    // The idle ones are closed after the header timeout, which hyper also runs between the
    // requests of a keep-alive connection (up to 3 timeouts here: a slow machine is fine).
    for conn in &mut idle {
        assert!(closed_by_server(conn), "an idle connection stays open");
    }
    assert!(idle_since.elapsed() >= HEADER_TIMEOUT / 2);
    let (status, _, _) = scrape(&addr);
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[test]
fn silent_connections_filling_every_slot_get_a_new_connection_a_503_at_once() {
    let root = tempfile::tempdir().unwrap();
    let (_d, addr) = metrics_daemon(root.path());
    // Connections that never send a byte (the slots are taken in the order they connect).
    let mut silent: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| connect(&addr, HEADER_TIMEOUT * 3))
        .collect();
    let began = Instant::now();
    let mut conn = connect(&addr, Duration::from_secs(2));
    ask(&mut conn);
    assert_busy(&next_answer(&mut conn).expect("an answer"));
    eprintln!("503 after {:?}", began.elapsed());
    // And they lose their slots at the header timeout.
    for conn in &mut silent {
        assert!(closed_by_server(conn), "a silent connection stays open");
    }
    let (status, _, _) = scrape(&addr);
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[test]
fn a_pipelining_connection_is_answered_up_to_the_request_cap_then_closed() {
    let root = tempfile::tempdir().unwrap();
    let (_d, addr) = metrics_daemon(root.path());
    let mut conn = connect(&addr, Duration::from_secs(10));
    let sent = MAX_REQUESTS as usize + 50;
    let requests = "GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n".repeat(sent);
    conn.get_mut().write_all(requests.as_bytes()).unwrap();
    let began = Instant::now();
    let mut answers = Vec::new();
    while let Some(answer) = next_answer(&mut conn) {
        assert_eq!(answer.status, "HTTP/1.1 200 OK");
        answers.push(answer);
        assert!(
            answers.len() <= MAX_REQUESTS as usize,
            "answered past the cap"
        );
    }
    assert_eq!(answers.len(), MAX_REQUESTS as usize, "of {sent} sent");
    let last = answers.last().unwrap();
    assert_eq!(last.header("connection"), Some("close"));
    assert!(answers[..answers.len() - 1]
        .iter()
        .all(|a| a.header("connection").is_none()));
    eprintln!(
        "{} pipelined answers in {:?} (renders are spaced, answers paced)",
        answers.len(),
        began.elapsed()
    );
}
