#!/usr/bin/env bash
# Queue backend benchmark: tasks offered by a queue backend (`task.offer`) against the same
# tasks submitted on the control socket, with the same number in flight (throughput and the
# worker's CPU per task), then a backend that floods offers past its window (the worker's
# memory). Needs nothing but the release build (made here); about two minutes.
# BENCH_N sets the tasks per run (default 100000), BENCH_ROUNDS the rounds (default 5),
# BENCH_WINDOW the tasks in flight (default 64), BENCH_FLOOD_N the flooded offers (default
# 200000), BENCH_FLOOD_AHEAD the floods (default "0,128": unanswered offers allowed, 0 for no
# limit), BENCH_ONLY=throughput or flood one part.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo
cargo bench --bench backends
