"""A queue and result backend built on the SDK (no tasks), driven by test_backends.py.

Its queue is jobs `job-1`, `job-2`, ... (endless, or `settings.jobs` of them), each offering
`t.add` with args [n, n]; odd jobs also ask for progress and stream items and carry a hard time
limit. What its callbacks see is reported as `log` notifications on the protocol pipe
(`fields.seen` names the callback), so a test sees it in order with the SDK's own messages.
`settings.fail_acks` makes on_outcome raise; a result whose task_id starts with `fail` is not
stored; one whose kwargs say `meet` waits for another such store. `FIXTURE_NO_STORE=1` leaves
`@plugin.stores` out.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from worker_plugin import Offer, Plugin  # noqa: E402

plugin = Plugin("backend", "0.1.0")


def seen(kind, **fields):
    """Reports what a callback saw, in order with the SDK's messages (a test-only shortcut)."""
    fields["seen"] = kind
    plugin._notify("log", {"level": "info", "message": kind, "fields": fields})


def ack(task_id, outcome):
    if plugin.settings.get("fail_acks"):
        raise RuntimeError("ack of %s failed" % task_id)
    seen("outcome", task_id=task_id, outcome=outcome)


def job(n):
    task_id = "job-%d" % n
    odd = n % 2 == 1
    return Offer(
        "t.add", args=[n, n], task_id=task_id, hard_time_limit=60 if odd else None,
        on_outcome=lambda outcome: ack(task_id, outcome),
        on_progress=(lambda done, total, message: seen(
            "progress", task_id=task_id, update=[done, total, message])) if odd else None,
        on_stream=(lambda items: seen("stream", task_id=task_id, items=items)) if odd else None,
        on_release=lambda reason: seen("release", task_id=task_id, reason=reason))


@plugin.offers
def offers(window):
    seen("started", window=window)
    limit = plugin.settings.get("jobs")
    n = 0
    try:
        while limit is None or n < limit:
            n += 1
            seen("pulled", n=n)
            yield job(n)
    finally:
        seen("closed", pulled=n)


meeting = threading.Barrier(2, timeout=10)


def store(record):
    if record["task_id"].startswith("fail"):
        raise ConnectionError("database down")
    if record.get("kwargs", {}).get("meet"):
        meeting.wait()
    seen("stored", record=record)


if os.environ.get("FIXTURE_NO_STORE") != "1":
    plugin.stores(store)


if __name__ == "__main__":
    plugin.run()
