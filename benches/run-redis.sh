#!/usr/bin/env bash
# Redis benchmark: Celery worker vs `worker` draining the same preloaded tasks from a private
# redis-server (started and stopped by the bench, on a free port).
# Needs redis-server and the Celery venv with redis-py in target/celery-venv (the Redis broker
# tests prepare it).
# BENCH_N sets the number of tasks (default 20000), BENCH_ROUNDS the rounds (default 5),
# BENCH_ONLY=worker,prefork the contenders, BENCH_BIN_DIR another build of `worker`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo
cargo bench --bench redis
