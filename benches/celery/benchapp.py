"""The Celery app the AMQP and Redis benchmarks run as the baseline worker: one no-op task.

BROKER_URL and RESULT_BACKEND choose the broker and the result backend (default: RabbitMQ, rpc://).
"""

import os

from celery import Celery

app = Celery("benchapp", broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"), backend=os.environ.get("RESULT_BACKEND", "rpc://"))
app.conf.worker_hijack_root_logger = False


@app.task(name="bench.noop")
def noop(*args, **kwargs):
    return None
