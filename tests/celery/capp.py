"""The Celery app the tests' Python clients and `celery -A capp ...` use: a plain client
(broker from BROKER_URL; results through rpc://, or RESULT_BACKEND), nothing worker-specific."""

import os

from celery import Celery

app = Celery(broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"), backend=os.environ.get("RESULT_BACKEND", "rpc://"))
app.conf.broker_connection_retry_on_startup = True
