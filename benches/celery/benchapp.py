"""The Celery app the AMQP benchmark runs as the baseline worker: one no-op task."""

import os

from celery import Celery

app = Celery("benchapp", broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"), backend="rpc://")
app.conf.worker_hijack_root_logger = False


@app.task(name="bench.noop")
def noop(*args, **kwargs):
    return None
