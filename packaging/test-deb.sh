#!/usr/bin/env bash
# The Debian package, end to end, on this machine (as root; run by .ci/run):
#   build the .deb, dpkg -i it, then as the `worker` user: --version, create/test/install a
#   scaffolded plugin into /var/lib/worker, `worker serve` with the packaged config in the
#   background, a task through the socket, stop; then dpkg -r (only the state directory and the
#   conffile stay) and dpkg -P (nothing stays).
# There is no systemd as PID 1 here, so the unit is not started: the postinst's enable and the
# unit itself are checked offline (tests/systemd.rs), and /run/worker, which systemd's
# RuntimeDirectory= would make, is made by this script.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-deb: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (dpkg -i)"

deb=$(packaging/build-deb.sh | tail -1)
[ -f "$deb" ] || fail "no package built"
version=$(dpkg-deb -f "$deb" Version)
echo "test-deb: $deb ($version)"

# Start from nothing: a package left by an earlier failed run is purged first.
dpkg -P worker >/dev/null 2>&1 || true
dpkg -i "$deb" >/dev/null
files=$(dpkg -L worker | while read -r f; do [ -f "$f" ] && echo "$f"; done)
conffiles=$(dpkg-query -W -f='${Conffiles}\n' worker | awk 'NF {print $1}')

getent passwd worker >/dev/null || fail "no worker user after install"
[ "$(stat -c %U:%a /var/lib/worker)" = "worker:750" ] || fail "/var/lib/worker: $(stat -c %U:%a /var/lib/worker)"
[ "$(stat -c %U /var/lib/worker/plugins)" = "worker" ] || fail "/var/lib/worker/plugins not owned by worker"
[ -x /usr/bin/worker ] && [ -f /lib/systemd/system/worker.service ] || fail "binary or unit missing"
zcat /usr/share/man/man1/worker.1.gz | grep -q '^\.TH' || fail "man page unreadable"
grep -q '_worker' /usr/share/bash-completion/completions/worker || fail "bash completion missing"
node -e "require('/usr/share/worker/sdk/node')" || fail "the Node SDK does not load"
python3 -c "import sys; sys.path.insert(0, '/usr/share/worker/sdk/python'); import worker_plugin" || fail "the Python SDK does not load"
ls /usr/share/worker/sdk/python/worker_plugin-*-py3-none-any.whl >/dev/null || fail "no Python SDK wheel"

# As the service user, with a clean environment like systemd's (no WORKER_* from this shell).
as_worker() { (cd /var/lib/worker && runuser -u worker -- env -i PATH=/usr/bin:/bin HOME=/var/lib/worker LANG=C.UTF-8 "$@"); }

as_worker worker --version | grep -qx "worker ${version%-*}" || fail "worker --version: $(as_worker worker --version)"
as_worker worker plugins create deb-check --lang python >/dev/null
as_worker worker plugins test deb-check >/dev/null || fail "plugins test of the scaffold"
as_worker worker plugins install deb-check >/dev/null || fail "plugins install of the scaffold"
[ -d /var/lib/worker/installed/deb-check ] || fail "not installed under /var/lib/worker"

install -d -o worker -g worker -m 0700 /run/worker
log=$(mktemp)
(cd /var/lib/worker && exec runuser -u worker -- env -i PATH=/usr/bin:/bin HOME=/var/lib/worker \
    worker serve) 2>"$log" &
serve=$!
stop_serve() { kill -TERM "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true; }
trap 'stop_serve; cat "$log" >&2' ERR
for _ in $(seq 300); do
    as_worker worker plugins list 2>/dev/null | grep -q 'deb-check.*ready' && break
    kill -0 "$serve" 2>/dev/null || fail "serve exited: $(cat "$log")"
    sleep 0.1
done
[ -S /run/worker/worker.sock ] || fail "no socket at /run/worker/worker.sock"
result=$(as_worker worker task run deb-check.hello '"deb"')
[ "$result" = '"hello, deb"' ] || fail "task result: $result"
# The packaged config serves metrics on 127.0.0.1:9464.
metrics=$(exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3)
echo "$metrics" | grep -q 'worker_tasks_total{.*task="deb-check.hello",outcome="success"} 1' \
    || fail "metrics on 127.0.0.1:9464 do not count the task: $metrics"
stop_serve
trap - ERR
grep -q 'serving' "$log" || fail "no serving line in the daemon's log"

dpkg -r worker >/dev/null
for f in $files; do
    if echo "$conffiles" | grep -qx "$f"; then
        [ -f "$f" ] || fail "conffile $f removed by dpkg -r"
    else
        [ ! -e "$f" ] || fail "$f left behind by dpkg -r"
    fi
done
[ -d /var/lib/worker/installed/deb-check ] || fail "dpkg -r removed the state directory"

dpkg -P worker >/dev/null
for f in $files /var/lib/worker /etc/worker /run/worker \
    /etc/systemd/system/multi-user.target.wants/worker.service /etc/systemd/system/worker.service; do
    [ ! -e "$f" ] || fail "$f left behind by dpkg -P"
done
rm -f "$log"
echo "test-deb: ok (installed, served a task as worker, removed, purged)"
