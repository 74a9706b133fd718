//! A protocol-only plugin for the benches (no SDK), shared by `supervisor.rs` and `scale.rs`.

use serde_json::json;

/// The smallest plugin that speaks the protocol in Rust, with no SDK: a bench's own binary run
/// with `BENCH_MINIMAL_CHILD=1`, serving the one task `BENCH_TASK` (default `min.noop`) as plugin `BENCH_NAME`. Lines
/// in, `serde_json::Value` parsed, answers written and flushed once nothing more is waiting.
pub fn child() {
    use std::io::{BufRead, Write};
    let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let task = std::env::var("BENCH_TASK").unwrap_or_else(|_| "min.noop".into());
    let name = std::env::var("BENCH_NAME").unwrap_or_else(|_| "minimal-rust".into());
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let id = &msg["id"];
        let answer = match msg["method"].as_str() {
            Some("task.run") | Some("shutdown") => {
                json!({"jsonrpc": "2.0", "id": id, "result": null})
            }
            Some("ping") => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
            Some("initialize") => json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocol_version": "1.0", "plugin": {"name": name, "version": "1"},
                "tasks": [{"name": task}]}}),
            Some("exit") => return,
            _ => continue,
        };
        serde_json::to_writer(&mut out, &answer).unwrap();
        out.write_all(b"\n").unwrap();
        if input.buffer().is_empty() {
            out.flush().unwrap();
        }
    }
}
