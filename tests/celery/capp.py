"""The Celery app the tests' Python clients and `celery -A capp ...` use: a plain client
(broker from BROKER_URL; results through rpc://, or RESULT_BACKEND), nothing worker-specific.
QUEUE_TYPE=quorum declares its queues quorum (`task_default_queue_type`,
`task_create_missing_queue_type`); QUEUE_MAX_PRIORITY=N gives them x-max-priority N;
EXCHANGE_TYPE=topic their exchanges (`task_default_exchange_type`); BROKER_TRANSPORT_OPTIONS (JSON) the
broker's transport options (e.g. kombu's Redis `global_keyprefix`)."""

import json
import os

from celery import Celery

app = Celery(broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"), backend=os.environ.get("RESULT_BACKEND", "rpc://"))
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("BROKER_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["BROKER_TRANSPORT_OPTIONS"])
if os.environ.get("QUEUE_TYPE"):
    app.conf.task_default_queue_type = os.environ["QUEUE_TYPE"]
    # Celery 5.6+: the type of a queue named by `send_task(queue=...)` (5.5 has no such key).
    app.conf.task_create_missing_queue_type = os.environ["QUEUE_TYPE"]
if os.environ.get("QUEUE_MAX_PRIORITY"):
    # Queues declared with x-max-priority, as Celery's `task_queue_max_priority` does.
    app.conf.task_queue_max_priority = int(os.environ["QUEUE_MAX_PRIORITY"])
if os.environ.get("EXCHANGE_TYPE"):
    # Celery 5.5's native delayed delivery needs topic exchanges on quorum queues.
    app.conf.task_default_exchange_type = os.environ["EXCHANGE_TYPE"]
    app.conf.task_create_missing_queue_exchange_type = os.environ["EXCHANGE_TYPE"]
