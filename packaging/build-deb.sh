#!/usr/bin/env bash
# Builds target/debian/worker_<version>_<arch>.deb: the release binary, then the assets it
# generates from its own argument definitions (man pages, shell completions), then cargo-deb.
# Needs `cargo-deb` (cargo install cargo-deb). Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || {
    echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 2
}
cargo build --release --locked --features packaged --bin worker
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
target/release/worker man-pages "$assets/man"
gzip -9n "$assets"/man/*.1
target/release/worker completions bash >"$assets/completions/worker"
target/release/worker completions zsh >"$assets/completions/_worker"
target/release/worker completions fish >"$assets/completions/worker.fish"
# The Python SDK as a wheel, so scaffolds install it with no network (needs the network once,
# here, for the build backend).
[ -x target/wheel-venv/bin/pip ] || /usr/bin/python3 -m venv target/wheel-venv
target/wheel-venv/bin/pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$assets/sdk" plugin-protocol/python
cargo deb --no-build --output target/debian/ -p worker | tail -1
