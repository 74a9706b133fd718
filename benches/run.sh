#!/usr/bin/env bash
# Builds what the benchmark runs (release worker and example plugin), then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --example rust-echo
cargo bench --bench supervisor
