"""(Named so as not to shadow the `girder_client` package.) Girder Worker's own client (the
`girder-worker` package from the registry): one task sent as `Task.apply_async` sends it,
through the `girder_io` serializer (jsonpickle under application/json), with the headers
Girder's server adds (`jobInfoSpec`, `girder_api_url`, `girder_client_token`). No Girder server
is needed: the job spec is given (JOB_URL, default a closed port), so no job is created.

    girder_send.py QUEUE NAME    sends NAME((2, 3), 4, k=[1, 2], file=GirderFileId("65f0c0ffee"));
                                 prints {"task_id": ...} at once, then {"ok": result} or the
                                 exception, as client.py does
"""

import json
import os
import sys

from girder_worker.app import app
from girder_worker.task import Task
from girder_worker.utils.transforms.girder_io import GirderFileId
from kombu.serialization import registry

# Counts the bodies Girder Worker's `girder_io` serializer encodes, to show it was the one used.
ENCODED = []
_girder_io = registry._encoders["girder_io"]
registry._encoders["girder_io"] = _girder_io._replace(
    encoder=lambda data: (ENCODED.append(1), _girder_io.encoder(data))[1])

QUEUE, NAME = sys.argv[1], sys.argv[2]
JOB_URL = os.environ.get("JOB_URL", "http://127.0.0.1:9/api/v1/job/1")
API_URL = JOB_URL.split("/job/")[0]
app.conf.broker_url = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
app.conf.result_backend = "rpc://"
app.conf.broker_connection_retry_on_startup = True


@app.task(base=Task, name=NAME, bind=True)
def remote(self, *args, **kwargs):
    raise RuntimeError("runs on the worker under test, never here")


try:
    r = remote.apply_async(
        args=((2, 3), 4),
        kwargs={"k": [1, 2], "file": GirderFileId("65f0c0ffee")},
        queue=QUEUE,
        headers={
            "jobInfoSpec": {"method": "PUT", "url": JOB_URL,
                            "headers": {"Girder-Token": "token-1"}, "logPrint": True,
                            "reference": "ref"},
            "girder_api_url": API_URL,
            "girder_client_token": "token-1",
        },
    )
    print(json.dumps({"task_id": r.id}), flush=True)
    out = {"ok": r.get(timeout=60), "girder_io_bodies": len(ENCODED)}
except Exception as exc:  # the point is to report what the client raised
    out = {"exc_type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out), flush=True)
