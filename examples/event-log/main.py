"""A monitoring plugin (the Nuvom contract): it serves no task, subscribes to the worker's
events in plugin.toml, and writes each one as a JSON line to the file `[settings] path`
(relative paths are under the plugin's data directory, WORKER_PLUGIN_DATA)."""
import json
import os

from worker_plugin import Plugin

plugin = Plugin("event-log", "1.0.0")
_log = None
# One encoder for every event: `json.dumps` with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _open_log():
    path = str(plugin.settings.get("path") or "events.jsonl")
    if not os.path.isabs(path):
        path = os.path.join(os.environ.get("WORKER_PLUGIN_DATA") or ".", path)
    # Line-buffered: each event is on disk (for `tail -f`) as soon as it is written.
    return open(path, "a", buffering=1, encoding="utf-8")


@plugin.on_event
def write(event):
    global _log
    if _log is None:
        _log = _open_log()
    _log.write(_encode(event) + "\n")


if __name__ == "__main__":
    plugin.run()
