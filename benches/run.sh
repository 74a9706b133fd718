#!/usr/bin/env bash
# Builds what the benchmarks run (release worker and example plugin), then runs the supervisor
# bench (raw pipe vs supervisor, SDKs, restarts, idle RSS) and the scale bench (50 plugins,
# queued tasks, the real daemon's idle RSS, id memories). The AMQP bench: benches/run-amqp.sh.
# Goals come from BENCH_ROUNDS interleaved rounds (default 5; they need >= 5): each printed as the
# median of per-round ratios with the spread (lowest-highest), met only when the spread clears it.
# Idle CPUs poll for the run (/dev/cpu_dma_latency held at 0, as root; benches/common/idle.rs),
# so ratios measure the code, not how fast the host wakes a halted CPU; BENCH_IDLE=halt keeps the
# machine's own idle.
# Smaller runs of the supervisor bench: BENCH_N, BENCH_N_PY, BENCH_N_LATENCY (see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo
cargo bench --bench supervisor
cargo bench --bench scale
