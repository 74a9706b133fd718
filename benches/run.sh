#!/usr/bin/env bash
# Builds what the benchmarks run (release worker and example plugin), then runs the supervisor
# bench (raw pipe vs supervisor, SDKs, restarts, idle RSS) and the scale bench (50 plugins,
# queued tasks, the real daemon's idle RSS, id memories). The AMQP bench: benches/run-amqp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo
cargo bench --bench supervisor
cargo bench --bench scale
