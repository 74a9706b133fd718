"""A Python SDK plugin whose task returns what the SDK says about where the task came from
(ctx.queue, ctx.request): protocol 1.2's task context, end to end."""
from worker_plugin import Plugin

plugin = Plugin("context", "1.0.0")


@plugin.task("ctx.where", description="Returns ctx.queue and ctx.request")
def where(ctx):
    request = dict(vars(ctx.request))
    return {"queue": ctx.queue, "request": request}


if __name__ == "__main__":
    plugin.run()
