"""A result backend (the Python SDK's @plugin.stores) for the tests: each record as a JSON line
in `[settings] path`; while the file `[settings] down` exists, every store fails."""
import json
import os
import sys

sys.path.insert(0, os.environ.get("WORKER_SDK", ""))
from worker_plugin import Plugin  # noqa: E402

plugin = Plugin("sink", "1.0.0")


@plugin.stores
def store(record):
    if os.path.exists(plugin.settings["down"]):
        raise ConnectionError("the store is down (%s exists)" % plugin.settings["down"])
    with open(plugin.settings["path"], "a") as f:
        f.write(json.dumps(record) + "\n")


plugin.run()
