"""Example plugin: Fibonacci numbers with progress, streaming and cancellation."""

from worker_plugin import Plugin

plugin = Plugin("python-fibonacci", "1.0.0")


@plugin.task("fibonacci", description="The n-th Fibonacci number, with progress")
def fibonacci(ctx, n, stream=False):
    if not isinstance(n, int) or n < 0:
        raise ValueError("n must be a non-negative integer, got %r" % (n,))
    a, b = 0, 1
    step = max(1, n // 10)
    for i in range(n):
        a, b = b, a + b
        if stream:
            ctx.stream(a)
        if (i + 1) % step == 0:
            ctx.check_cancelled()
            ctx.progress(i + 1, n)
    return a


@plugin.task("py.noop", description="Returns null at once", inline=True)
def noop(ctx, *args, **kwargs):
    return None


if __name__ == "__main__":
    plugin.run()
