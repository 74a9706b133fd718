//! Example plugin using the `plugin-protocol` Rust SDK: a no-op (for benchmarks), an echo, and
//! a counter that reports progress, streams items and honours cancellation.
//!
//! Build: `cargo build --release --example rust-echo` (the manifest runs the release binary).

use plugin_protocol::plugin::{Plugin, TaskError};
use serde_json::{json, Value};
use std::time::Duration;

fn main() {
    let result = Plugin::new("rust-echo", env!("CARGO_PKG_VERSION"))
        .task("rust.noop", "Returns null at once", |_, _| Ok(Value::Null))
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
        .run();
    if let Err(e) = result {
        eprintln!("rust-echo: {e}");
        std::process::exit(1);
    }
}
