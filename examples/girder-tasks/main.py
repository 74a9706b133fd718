"""Example plugin: Girder Worker tasks ported to the Python SDK (the book's "Porting Girder Worker tasks",
docs/src/porting/girder-worker.md).

A Girder server's task messages name the job to keep up to date (the `jobInfoSpec` header);
the worker does that, out of process: RUNNING when a task starts, what the task prints in the
job log every 0.5 s, its progress, then SUCCESS, ERROR with the traceback, or CANCELED. The
tasks here only compute, print and report progress, as a Girder Worker task would.

Run with an interpreter that has `jsonpickle` (and, for `GirderFileId` and the other transforms,
`girder-worker`) to get Girder's transform objects decoded; without them the same arguments
arrive as JSON, jsonpickle's tags intact.
"""

from worker_plugin import Cancelled, Plugin

plugin = Plugin("girder-tasks", "1.0.0")


def describe(value):
    """A JSON-friendly account of an argument: decoded objects by their type."""
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    kind = type(value)
    return {"type": "%s.%s" % (kind.__module__, kind.__qualname__), "state": describe(vars(value))}


@plugin.task("girder.add", description="Adds a pair and a number, printing as it goes")
def add(ctx, pair, n, **kwargs):
    print("adding %r and %r" % (pair, n))
    total = sum(pair) + n
    print("the sum is %d" % total)
    return {
        "sum": total,
        "args": describe([pair, n]),
        "kwargs": describe(kwargs),
        "serializer": ctx.serializer,
        "headers": sorted(ctx.request.headers),
        "job_url": (getattr(ctx.request, "jobInfoSpec", None) or {}).get("url"),
    }


@plugin.task("girder.fail", description="Raises ValueError after a line of output")
def fail(ctx, *args, **kwargs):
    print("about to fail")
    raise ValueError("the input is not an image")


@plugin.task("girder.progress", description="Reports progress in four steps")
def progress(ctx, *args, **kwargs):
    for step in range(1, 5):
        ctx.progress(step, 4, "step %d of 4" % step)
    return "done"


@plugin.task("girder.wait", description="Waits until cancelled (a revoke or a CANCELING job)")
def wait(ctx, *args, **kwargs):
    print("waiting to be cancelled")
    try:
        ctx.wait(60)
    except Cancelled:
        print("saw cancelled")
        raise
    return "never cancelled"


if __name__ == "__main__":
    plugin.run()
