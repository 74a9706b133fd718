"""A plugin built on the SDK, driven by test_plugin.py over its real stdin/stdout."""
import datetime
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

if os.environ.get("FIXTURE_HIDE_JSONPICKLE"):
    sys.modules["jsonpickle"] = None  # `import jsonpickle` now fails, as where it is absent

from worker_plugin import Plugin, Retry, TaskError  # noqa: E402

plugin = Plugin("fixture", "0.1.0",
                capture_output=os.environ.get("FIXTURE_CAPTURE_OUTPUT", "1") == "1")


@plugin.task("t.add", description="Adds")
def add(ctx, a, b):
    return a + b


@plugin.task("t.where", inline=True)
def where_inline(ctx, fail=False):
    """Runs on the reader thread: says which thread, prints, or raises."""
    print("inline says hi")
    if fail:
        raise ValueError("inline failure")
    return threading.current_thread().name


@plugin.task("t.where_pooled")
def where_pooled(ctx):
    return threading.current_thread().name


events_seen = []


def on_event(event):
    if event.get("boom"):
        raise RuntimeError("a handler bug")
    events_seen.append(event)


def on_events(batch):
    """With FIXTURE_EVENT_BATCHES=1: keeps the task ids of each batch."""
    if any(event.get("boom") for event in batch):
        raise RuntimeError("a handler bug")
    events_seen.append([event["task_id"] for event in batch])


if os.environ.get("FIXTURE_EVENT_BATCHES") == "1":
    plugin.on_events(on_events)
else:
    plugin.on_event(on_event)


@plugin.task("t.events")
def events(ctx):
    """The events this plugin was sent so far."""
    return events_seen


@plugin.task("t.report")
def report(ctx, n):
    print("reporting")
    for i in range(1, n + 1):
        ctx.progress(i, n, "step %d" % i)
        ctx.stream(i)
    return ctx.settings.get("greeting")


@plugin.task("t.print")
def print_lines(ctx):
    """A line on stdout, one on stderr through logging, and one without its newline."""
    print("one")
    logging.getLogger("fixture.quiet").warning("three")  # no handler: logging's last resort
    sys.stderr.write("two")
    return "printed"


@plugin.task("t.write")
def write(ctx, writes, fail=False):
    """Writes each [stream, text] of `writes` as it is, then returns or raises."""
    for stream, text in writes:
        getattr(sys, stream).write(text)
    if fail:
        raise ValueError("failed after writing")
    return "written"


together = threading.Barrier(2, timeout=10)


@plugin.task("t.chatter")
def chatter(ctx, tag, n):
    """Prints `n` lines tagged `tag` once another chatter task runs too."""
    together.wait()
    for i in range(n):
        print("%s %d" % (tag, i))
        time.sleep(0.001)
    return tag


@plugin.task("t.thread_print")
def thread_print(ctx):
    """Prints from a thread of its own, which is not the task's."""
    thread = threading.Thread(target=print, args=("from a plugin thread",))
    thread.start()
    thread.join()
    return "ok"


@plugin.task("t.kwargs")
def kwargs(ctx, **kw):
    return {"kwargs": kw, "attempt": ctx.attempt, "id": ctx.task_id}


@plugin.task("t.fail")
def fail(ctx):
    raise ValueError("too far")


@plugin.task("t.typed")
def typed(ctx):
    raise TaskError("try later", type_name="Busy", retryable=True)


@plugin.task("t.retry")
def retry(ctx, **options):
    """Asks to be run again with `options` as they came (JSON), after printing half a line."""
    sys.stdout.write("retrying")
    raise ctx.retry(**options)


@plugin.task("t.retry_exc")
def retry_exc(ctx):
    ctx.retry(exc=ValueError("x"), countdown=5, max_retries=2)


@plugin.task("t.retry_raised")
def retry_raised(ctx):
    """Retries on an exception it caught: its own traceback goes with it."""
    try:
        raise ConnectionError("upstream refused")
    except ConnectionError as exc:
        ctx.retry(exc=exc)


@plugin.task("t.retry_eta")
def retry_eta(ctx, aware):
    when = datetime.datetime(2030, 1, 2, 3, 4, 5, 600000)
    if aware:  # 05:04:05.6 two hours east of UTC: 03:04:05.6 UTC
        when = when.replace(hour=5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    ctx.retry(eta=when)


@plugin.task("t.retry_changed")
def retry_changed(ctx):
    """Raises a Retry whose countdown it spoiled after it was checked."""
    retry = Retry(countdown=1)
    retry.countdown = float("nan")
    raise retry


@plugin.task("t.wait")
def wait(ctx, seconds):
    ctx.wait(seconds)
    return "waited"


@plugin.task("t.fill")
def fill(ctx, n):
    """A result of `n` x's: the test sizes it so its reply fills stdout's pipe exactly."""
    return "x" * n


@plugin.task("t.await_cancel")
def await_cancel(ctx):
    """Waits for its cancel, then says so on the real stderr (fd 2), not through stdout."""
    try:
        ctx.wait(60)
    finally:
        os.write(2, b"await_cancel saw its cancel\n")


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
    return {"queue": ctx.queue, "serializer": ctx.serializer, "request": dict(vars(ctx.request))}


def _describe(value):
    return [type(value).__module__ + "." + type(value).__qualname__, repr(value)]


@plugin.task("t.decoded")
def decoded(ctx, *args, **kwargs):
    """Each arg's and kwarg's type and repr, as the handler got them (and ctx.kwargs's)."""
    return {"serializer": ctx.serializer, "args": [_describe(a) for a in args],
            "kwargs": {k: _describe(v) for k, v in kwargs.items()},
            "ctx_kwargs": {k: _describe(v) for k, v in ctx.kwargs.items()}}


@plugin.task("t.queue")
def queue_name(ctx):
    from worker_plugin import ParsedQueueName, current_site, current_task_queue_name
    return {"name": current_task_queue_name(), "site": current_site(),
            "parsed": str(ParsedQueueName.current())}


if __name__ == "__main__":
    plugin.run()
