"""nuvom-queue: a Nuvom project's SQLite queue and result backend, served to the worker (protocol
1.5, Python SDK). Offers each job Nuvom's client enqueued (`add.delay(1, 2)`) as a `task.offer`,
stores its outcome where Nuvom's `get_result` / `get_error` read it, then acks it; and, as a
result backend, stores the results of tasks from the worker's other sources there too. The
Nuvom side is `nuvom_bridge.py`; see README.md for the settings and the guarantees."""
import threading

from worker_plugin import Offer, Plugin

from nuvom_bridge import Bridge, log_to_stderr

plugin = Plugin("nuvom-queue", "1.0.0")
_bridge = None
_bridge_lock = threading.Lock()


def bridge():
    """The project's Bridge, made on first use: `[settings]` arrive with `initialize`, and
    nuvom is imported only once the working directory is the project's."""
    global _bridge
    with _bridge_lock:
        if _bridge is None:
            log_to_stderr()
            _bridge = Bridge.from_settings(plugin.settings, name=plugin.name)
        return _bridge


@plugin.offers
def offers(window):
    nuvom = bridge()  # a ConfigError here ends the plugin with the reason in its log
    for job in nuvom.jobs():
        if job is None:
            yield None
            continue
        yield Offer(
            nuvom.task_name(job), args=list(job.args), kwargs=dict(job.kwargs),
            task_id=job.offered_as, hard_time_limit=nuvom.time_limit(job),
            on_outcome=lambda outcome, job=job: nuvom.settle(job, outcome),
            on_release=lambda reason, job=job: nuvom.release(job, reason))


@plugin.stores
def store(record):
    bridge().store(record)


if __name__ == "__main__":
    plugin.run()
