#!/usr/bin/env bash
# AMQP benchmark: Celery worker vs `worker` vs a raw lapin loop on the same RabbitMQ.
# Needs RabbitMQ on 127.0.0.1:5672 and the Celery venv in target/celery-venv (the broker tests
# prepare both: `cargo test --test amqp`).
# BENCH_N sets the number of tasks (default 60000), BENCH_ROUNDS the interleaved rounds (default 5;
# goals are judged on the spread of per-round ratios and need >= 5), BENCH_ONLY=rust,raw the
# contenders.
# Idle CPUs poll for the run (/dev/cpu_dma_latency held at 0, as root; benches/common/idle.rs),
# so ratios measure the code, not how fast the host wakes a halted CPU; BENCH_IDLE=halt keeps the
# machine's own idle.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo --example amqp-ceiling
cargo bench --bench amqp
