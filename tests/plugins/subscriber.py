"""An event subscriber for the tests: writes events as JSON lines to SUBSCRIBER_LOG, and
misbehaves on demand. SUBSCRIBER_STALL=1: at its first event it stops reading for good (the
handler never returns). SUBSCRIBER_CRASH_ON=<task>: it exits 3 when told that <task> started."""
import json
import os
import threading

from worker_plugin import Plugin

plugin = Plugin("subscriber", "1.0.0")
log = open(os.environ["SUBSCRIBER_LOG"], "a", buffering=1, encoding="utf-8")
crash_on = os.environ.get("SUBSCRIBER_CRASH_ON")


@plugin.on_event
def on_event(event):
    log.write(json.dumps(event) + "\n")
    if os.environ.get("SUBSCRIBER_STALL") == "1":
        threading.Event().wait()
    if event["event"] == "task.started" and event.get("task") == crash_on:
        os._exit(3)


if __name__ == "__main__":
    plugin.run()
