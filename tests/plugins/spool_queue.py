"""A queue backend over a spool directory (the Python SDK's @plugin.offers), for the tests.

Each `<id>.json` in `[settings] dir` is a task ({"task": ..., "args": [...]}). Taking one
renames it to `<id>.taken`; its outcome is written to `<id>.done` (atomically), then the
`.taken` file goes: that is the ack. At start, a `.taken` file left by a process that died is
put back (or dropped, when its `.done` exists). `SPOOL_CRASH_EVERY=n` makes the process exit
abruptly right after every n-th offer it sends, to test crash loops; `SPOOL_PROGRESS=1` asks for
progress and writes each `offer.progress` to `<id>.progress`.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.environ.get("WORKER_SDK", ""))
from worker_plugin import Offer, Plugin  # noqa: E402

plugin = Plugin("spool", "1.0.0")
CRASH_EVERY = int(os.environ.get("SPOOL_CRASH_EVERY", "0"))
PROGRESS = os.environ.get("SPOOL_PROGRESS") == "1"


def write_atomically(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.rename(tmp, path)


def recover(spool):
    for name in os.listdir(spool):
        if not name.endswith(".taken"):
            continue
        base = os.path.join(spool, name[: -len(".taken")])
        if os.path.exists(base + ".done"):
            os.unlink(base + ".taken")
        else:
            os.rename(base + ".taken", base + ".json")


def ack(base, outcome):
    write_atomically(base + ".done", json.dumps(outcome))
    try:
        os.unlink(base + ".taken")
    except FileNotFoundError:
        pass  # while it is replaced, the new process may have taken this task again


def release(base, reason):
    try:
        os.rename(base + ".taken", base + ".json")
    except FileNotFoundError:
        pass


def take(spool):
    for name in sorted(os.listdir(spool)):
        if not name.endswith(".json"):
            continue
        base = os.path.join(spool, name[: -len(".json")])
        try:
            os.rename(base + ".json", base + ".taken")
        except FileNotFoundError:
            continue
        with open(base + ".taken") as f:
            return base, json.load(f)
    return None, None


@plugin.offers
def offers(window):
    spool = plugin.settings["dir"]
    recover(spool)
    sent = 0
    while True:
        base, job = take(spool)
        if job is None:
            time.sleep(0.05)
            yield None
            continue
        task_id = os.path.basename(base)
        on_progress = None
        if PROGRESS:
            def on_progress(done, total, message, base=base):
                write_atomically(base + ".progress", json.dumps([done, total, message]))
        yield Offer(job["task"], args=job.get("args", []), task_id=task_id,
                    on_outcome=lambda outcome, base=base: ack(base, outcome),
                    on_release=lambda reason, base=base: release(base, reason),
                    on_progress=on_progress)
        sent += 1
        if CRASH_EVERY and sent % CRASH_EVERY == 0:
            # Wait until this offer is on its way, then die without acking anything.
            time.sleep(0.01)
            os._exit(3)


plugin.run()
