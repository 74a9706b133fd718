"""A monitoring plugin (the Nuvom contract): it serves no task, subscribes to the worker's
events in plugin.toml, and writes each one as a JSON line to the file `[settings] path`
(relative paths are under the plugin's data directory, WORKER_PLUGIN_DATA)."""
import json
import os

from worker_plugin import Plugin

plugin = Plugin("event-log", "1.0.0")
_log = None
# One encoder for every event (`json.dumps` with options builds a new one per call); keys stay
# in the order the worker sent them, `event` first.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _open_log():
    path = str(plugin.settings.get("path") or "events.jsonl")
    if not os.path.isabs(path):
        path = os.path.join(os.environ.get("WORKER_PLUGIN_DATA") or ".", path)
    return open(path, "a", encoding="utf-8")


@plugin.on_events
def write(events):
    """The events one read brought, in one write: in the file (for `tail -f`) as soon as they
    arrive, with one syscall for the lot rather than one per event."""
    global _log
    if _log is None:
        _log = _open_log()
    _log.write("".join([_encode(event) + "\n" for event in events]))
    _log.flush()


if __name__ == "__main__":
    plugin.run()
