//! Memory a peer can grow is bounded: a plugin's endless stderr line, a plugin that floods the
//! worker with requests while reading nothing, a plugin that writes stray lines by the million,
//! and a control client that pipelines requests without reading answers. Each is measured on a
//! real `worker serve` (its RSS sampled throughout) or through the supervisor, and other work
//! carries on.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const RSS_LIMIT_MIB: u64 = 128;

/// Samples the RSS of `pid` until dropped; `peak_mib` is the largest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let (peak, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .ok()
                        .and_then(|s| {
                            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                            line.split_whitespace().nth(1)?.parse::<u64>().ok()
                        })
                        .unwrap_or(0);
                    peak.fetch_max(kib, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssWatch {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak_mib(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak.load(Ordering::Relaxed) / 1024
    }
}

fn daemon(root: &std::path::Path) -> Daemon {
    let plugins = root.join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    Daemon::start(&plugins, &root.join("w.sock"))
}

fn run_ok(d: &Daemon, args: &[&str]) -> String {
    let out = output(&mut d.cli(&[&["task", "run"], args].concat()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn an_endless_stderr_line_is_skipped_not_buffered() {
    let root = tempfile::tempdir().unwrap();
    let d = daemon(root.path());
    let watch = RssWatch::start(d.child.id());
    // Half a gigabyte without a newline.
    let said = run_ok(&d, &["f.stderr_flood", &(500 << 20).to_string()]);
    assert!(said.contains("flooded"), "{said}");
    let peak = watch.peak_mib();
    eprintln!("500 MiB stderr line: worker peak RSS {peak} MiB");
    assert!(peak < RSS_LIMIT_MIB, "worker RSS peaked at {peak} MiB");
    assert!(run_ok(&d, &["f.ok", "1"]).contains('1'));
}

#[tokio::test]
async fn a_plugin_that_stops_reading_its_stdin_is_ended_not_buffered_for() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "max_attempts = 1",
        "",
    )]);
    h.ready().await;
    let f = h.fails("f.request_flood", vec![json!(200_000)]).await;
    assert!(
        f.message.contains("stopped reading its stdin"),
        "{}",
        f.message
    );
    h.wait_all_ready("faulty").await;
    assert_eq!(h.ok("f.ok", vec![json!(2)]).await, json!([2]));
    h.stop().await;
}

#[test]
fn stray_lines_are_counted_all_and_logged_a_few() {
    let root = tempfile::tempdir().unwrap();
    let mut d = daemon(root.path());
    run_ok(&d, &["f.garbage_flood", "20000"]);
    let doc = d.list_json();
    assert_eq!(
        doc["installed"][0]["live"]["instances"][0]["stray_stdout_lines"],
        20000
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit();
    let log = d.drain_log();
    let logged = log
        .iter()
        .filter(|l| l.contains("non-protocol line to stdout"))
        .count();
    assert!(logged <= 10, "{logged} lines logged in full");
    let summary = log
        .iter()
        .find(|l| l.contains("more non-protocol stdout lines"))
        .expect("a summary of the rest");
    assert!(
        summary.contains(&format!("{} more", 20000 - logged)),
        "{summary}"
    );
}

#[test]
fn a_client_that_pipelines_without_reading_grows_nothing() {
    let root = tempfile::tempdir().unwrap();
    let d = daemon(root.path());
    let watch = RssWatch::start(d.child.id());
    let socket = d.socket.clone();
    // 200,000 requests written, none of the answers read.
    let writer = std::thread::spawn(move || {
        let mut conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let request = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"plugins.status\"}\n";
        let mut written = 0;
        for _ in 0..200_000 {
            if conn.write_all(request).is_err() {
                break;
            }
            written += 1;
        }
        (written, conn)
    });
    // Meanwhile other clients are served.
    for i in 0..5 {
        let said = run_ok(&d, &["f.ok", &i.to_string()]);
        assert!(said.contains(&i.to_string()), "{said}");
    }
    let (written, conn) = writer.join().unwrap();
    let peak = watch.peak_mib();
    eprintln!("pipelining client: {written} requests written unread; worker peak RSS {peak} MiB");
    assert!(
        written < 200_000,
        "the worker stopped reading the greedy client"
    );
    assert!(peak < RSS_LIMIT_MIB, "worker RSS peaked at {peak} MiB");
    drop(conn);
    let status: Value = d.list_json();
    assert!(status["daemon"].is_object(), "still serving: {status}");
}

#[test]
fn idle_connections_cannot_hold_every_slot() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let state = root.path().join("w.state");
    let socket = root.path().join("w.sock");
    let (ok, said) = install_all(&plugins, &state, &socket);
    assert!(ok, "{said}");
    let d = Daemon::serve(&plugins, &state, &socket, &["--control-idle-timeout", "1"]);
    // More idle connections than the daemon serves at once (256), holding everything.
    let idle: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap())
        .collect();
    // Each closes after a second of idleness, so a real client gets its turn.
    let said = run_ok(&d, &["f.ok", "7"]);
    assert!(said.contains('7'), "{said}");
    drop(idle);
}
