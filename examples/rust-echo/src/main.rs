//! Example plugin using the `plugin-protocol` Rust SDK: a no-op (for benchmarks), an echo, a
//! counter that reports progress, streams items and honours cancellation, and a flood of
//! streamed items (for the backpressure test).
//!
//! Build: `cargo build --release --example rust-echo` (the manifest runs the release binary).

use plugin_protocol::plugin::{Plugin, TaskError};
use serde_json::{json, Value};
use std::time::Duration;

fn main() {
    let result = Plugin::new("rust-echo", env!("CARGO_PKG_VERSION"))
        // Quick: run on the thread that reads requests (the benches' per-task cost).
        .quick_task("rust.noop", "Returns null at once", |_, _| Ok(Value::Null))
        .task("rust.echo", "Returns its args and kwargs", |_, p| {
            Ok(json!({ "args": p.args, "kwargs": p.kwargs }))
        })
        .task(
            "rust.count",
            "Counts to args[0], one step per args[1] ms (default 10), streaming each number",
            |ctx, p| {
                let to = p.args.first().and_then(Value::as_u64).ok_or_else(|| {
                    TaskError::new("ValueError", "args[0] must be a non-negative integer")
                })?;
                let step =
                    Duration::from_millis(p.args.get(1).and_then(Value::as_u64).unwrap_or(10));
                for i in 1..=to {
                    if ctx.is_cancelled() {
                        return Err(TaskError::cancelled());
                    }
                    std::thread::sleep(step);
                    ctx.stream(vec![json!(i)]);
                    ctx.progress(i, Some(to), None);
                }
                Ok(json!(to))
            },
        )
        .task(
            "rust.flood",
            "Streams args[0] bytes as items of args[1] bytes (default 65536), numbered from 0; returns the item count",
            |ctx, p| {
                let total = p.args.first().and_then(Value::as_u64).unwrap_or(0);
                let size = p.args.get(1).and_then(Value::as_u64).unwrap_or(65536).max(64);
                let pad = "x".repeat(size as usize - 32);
                let count = total.div_ceil(size);
                for seq in 0..count {
                    if ctx.is_cancelled() {
                        return Err(TaskError::cancelled());
                    }
                    ctx.stream(vec![json!({ "seq": seq, "pad": pad })]);
                }
                Ok(json!(count))
            },
        )
        .run();
    if let Err(e) = result {
        eprintln!("rust-echo: {e}");
        std::process::exit(1);
    }
}
