//! A plugin that streams faster than its caller reads cannot grow the worker: the caller's
//! bounded stream fills, the instance stops reading the plugin's stdout, and the plugin blocks
//! on its pipe. Nor does it grow the plugin: the Rust SDK holds a task back once its outgoing
//! queue is full. Measured on a real `worker serve` with the Rust example plugin streaming
//! 2 GiB to a control-socket client that stops reading for a while, twice.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The processes `pid` started (its threads' children), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn two_gib_streamed_to_a_slow_reader_arrive_in_order_and_the_worker_stays_small() {
    const TOTAL: u64 = 2 << 30;
    const ITEM: u64 = 64 * 1024;
    const PAUSE_AT: [u64; 2] = [64 << 20, 1 << 30];
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    rust_plugin(&plugins, "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let pid = d.child.id();

    // Sample the daemon's RSS, and its plugin's, for the whole run.
    let (peak, plugin_peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, plugin_peak, done) = (peak.clone(), plugin_peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                for child in children(pid) {
                    plugin_peak.fetch_max(rss_kib(child), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let submit = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"task.submit\",\"params\":{{\"name\":\"rust.flood\",\"args\":[{TOTAL},{ITEM}]}}}}\n"
    );
    conn.write_all(submit.as_bytes()).unwrap();
    let mut lines = BufReader::with_capacity(1 << 20, conn).lines();
    let (mut next_seq, mut read, mut pauses) = (0u64, 0u64, PAUSE_AT.iter().peekable());
    let result = loop {
        let line = lines.next().expect("a line").expect("readable");
        read += line.len() as u64;
        // The slow reader: stop reading for a while, twice. The plugin keeps producing at
        // full speed meanwhile; only backpressure keeps that out of the worker's memory.
        if pauses.next_if(|at| read >= **at).is_some() {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let msg: Value = serde_json::from_str(&line).unwrap();
        match msg["method"].as_str() {
            Some("task.stream") => {
                for item in msg["params"]["items"].as_array().unwrap() {
                    assert_eq!(item["seq"].as_u64(), Some(next_seq), "in order");
                    next_seq += 1;
                }
            }
            Some(_) => {}
            None => break msg,
        }
    };
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let count = TOTAL.div_ceil(ITEM);
    assert_eq!(result["result"]["result"].as_u64(), Some(count), "{result}");
    assert_eq!(next_seq, count, "every item arrived");
    assert!(read >= TOTAL, "{read} bytes read");
    let peak_mib = peak.load(Ordering::Relaxed) / 1024;
    let plugin_mib = plugin_peak.load(Ordering::Relaxed) / 1024;
    eprintln!("streamed {read} bytes in {count} items; peak RSS: worker {peak_mib} MiB, plugin {plugin_mib} MiB");
    assert!(peak_mib < 64, "worker RSS peaked at {peak_mib} MiB");
    assert!(plugin_mib > 0, "the plugin was sampled");
    assert!(plugin_mib < 64, "plugin RSS peaked at {plugin_mib} MiB");
}
