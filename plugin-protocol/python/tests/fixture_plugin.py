"""A plugin built on the SDK, driven by test_plugin.py over its real stdin/stdout."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from worker_plugin import Plugin, TaskError  # noqa: E402

plugin = Plugin("fixture", "0.1.0")


@plugin.task("t.add", description="Adds")
def add(ctx, a, b):
    return a + b


events_seen = []


@plugin.on_event
def on_event(event):
    if event.get("boom"):
        raise RuntimeError("a handler bug")
    events_seen.append(event)


@plugin.task("t.events")
def events(ctx):
    """The events this plugin was sent so far."""
    return events_seen


@plugin.task("t.report")
def report(ctx, n):
    print("this goes to stderr")
    for i in range(1, n + 1):
        ctx.progress(i, n, "step %d" % i)
        ctx.stream(i)
    return ctx.settings.get("greeting")


@plugin.task("t.kwargs")
def kwargs(ctx, **kw):
    return {"kwargs": kw, "attempt": ctx.attempt, "id": ctx.task_id}


@plugin.task("t.fail")
def fail(ctx):
    raise ValueError("too far")


@plugin.task("t.typed")
def typed(ctx):
    raise TaskError("try later", type_name="Busy", retryable=True)


@plugin.task("t.wait")
def wait(ctx, seconds):
    ctx.wait(seconds)
    return "waited"


@plugin.task("t.spin")
def spin(ctx):
    # Polls the flag without ever sleeping on it: a cancel must reach a busy task too.
    while True:
        ctx.check_cancelled()


@plugin.task("t.unserializable")
def unserializable(ctx):
    return float("nan")  # not JSON


@plugin.task("t.context")
def context(ctx):
    return {"queue": ctx.queue, "request": dict(vars(ctx.request))}


@plugin.task("t.queue")
def queue_name(ctx):
    from worker_plugin import ParsedQueueName, current_site, current_task_queue_name
    return {"name": current_task_queue_name(), "site": current_site(),
            "parsed": str(ParsedQueueName.current())}


if __name__ == "__main__":
    plugin.run()
