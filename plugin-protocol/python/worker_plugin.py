"""Python SDK for `worker` plugins (protocol v1). Standard library only.

    from worker_plugin import Plugin

    plugin = Plugin("my-plugin", "1.0.0")

    @plugin.task("my.add", description="Adds two numbers")
    def add(ctx, a, b):
        ctx.progress(1, 1)
        return a + b

    plugin.run()

Handlers receive a Context first, then the task's args and kwargs. The SDK reads requests on
the main thread and runs tasks on a thread pool as large as the worker's declared concurrency.
At start it moves the protocol to a private copy of stdout and points file descriptor 1 and
sys.stdout at stderr, so a stray print() (even from a C extension) lands in the log instead of
corrupting the protocol.
"""

import json
import os
import sys
import threading
import traceback
import types
from concurrent.futures import ThreadPoolExecutor

PROTOCOL_VERSION = "1.2"

PARSE_ERROR = -32700
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
TASK_FAILED = -32000
TASK_CANCELLED = -32001
SHUTTING_DOWN = -32002
UNKNOWN_TASK = -32003


class Cancelled(Exception):
    """Raise (or let Context.check_cancelled raise) to end a task that was asked to stop."""


class TaskError(Exception):
    """An error with an explicit type name and retry hint, for callers that want them."""

    def __init__(self, message, type_name=None, retryable=False):
        super().__init__(message)
        self.type_name = type_name
        self.retryable = retryable


class Context:
    """What a running task can see and do besides returning."""

    def __init__(self, plugin, task_id, attempt, cancelled, params=None):
        params = params or {}
        self._plugin = plugin
        self.task_id = task_id
        self.attempt = attempt
        self._cancelled = cancelled
        self.delivery_info = dict(params.get("delivery_info") or {})
        request = dict(params.get("request") or {})
        for key in ("retries", "eta", "expires", "parent_id", "root_id", "group", "hostname"):
            request.setdefault(key, 0 if key == "retries" else None)
        #: Where the task came from and Celery's request facts, like Celery's `self.request`:
        #: `.id`, `.retries`, `.eta`, `.expires`, `.parent_id`, `.root_id`, `.group`,
        #: `.hostname` (the worker's node name), `.delivery_info` (`queue`, `exchange`,
        #: `routing_key`; all None for a task from the control socket).
        self.request = types.SimpleNamespace(id=task_id, delivery_info=self.delivery_info, **request)

    @property
    def queue(self):
        """The queue the task was consumed from; None when it came from the control socket."""
        return self.delivery_info.get("queue")

    @property
    def settings(self):
        """The [settings] table of the plugin's manifest."""
        return self._plugin.settings

    @property
    def cancelled(self):
        """True once the worker asked this task to stop (cancel or soft time limit)."""
        return self._cancelled.is_set()

    def check_cancelled(self):
        if self._cancelled.is_set():
            raise Cancelled("task cancelled")

    def wait(self, seconds):
        """Sleeps up to `seconds`, waking early (and raising Cancelled) when cancelled."""
        if self._cancelled.wait(seconds):
            raise Cancelled("task cancelled")

    def progress(self, done, total=None, message=None):
        params = {"task_id": self.task_id, "done": int(done)}
        if total is not None:
            params["total"] = int(total)
        if message is not None:
            params["message"] = str(message)
        self._plugin._notify("task.progress", params)

    def stream(self, *items):
        """Sends partial results; the caller gets them in order, before the final result."""
        self._plugin._notify("task.stream", {"task_id": self.task_id, "items": list(items)})

    def log(self, message, level="info", **fields):
        fields["task_id"] = self.task_id
        self._plugin._notify("log", {"level": level, "message": str(message), "fields": fields})


class Plugin:
    def __init__(self, name, version):
        self.name = name
        self.version = version
        self.settings = {}
        self._tasks = {}
        self._descriptions = {}
        self._out = None
        self._out_lock = threading.Lock()
        self._running = {}
        self._running_lock = threading.Condition()
        self._shutting_down = False
        self._pool = None

    def task(self, name=None, description=None):
        """Decorator registering a handler under `name` (default: the function's name)."""

        def register(fn):
            task_name = name or fn.__name__
            self._tasks[task_name] = fn
            self._descriptions[task_name] = description or (fn.__doc__ or "").strip() or None
            return fn

        return register

    # -- output -------------------------------------------------------------------------

    def _send(self, message):
        message["jsonrpc"] = "2.0"
        # allow_nan=False: NaN and Infinity are not JSON; they fail the task instead of the line.
        data = (json.dumps(message, separators=(",", ":"), default=str, allow_nan=False)
                + "\n").encode("utf-8")
        with self._out_lock:
            self._out.write(data)
            self._out.flush()

    def _notify(self, method, params):
        self._send({"method": method, "params": params})

    def _reply(self, id_, result):
        self._send({"id": id_, "result": result})

    def _error(self, id_, code, message, data=None):
        err = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        self._send({"id": id_, "error": err})

    # -- requests -------------------------------------------------------------------------

    def _initialize(self, id_, params):
        self.settings = params.get("settings") or {}
        concurrency = max(1, int((params.get("limits") or {}).get("concurrency", 1)))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="task")
        tasks = []
        for name in self._tasks:
            info = {"name": name}
            if self._descriptions.get(name):
                info["description"] = self._descriptions[name]
            tasks.append(info)
        self._reply(id_, {
            "protocol_version": PROTOCOL_VERSION,
            "plugin": {"name": self.name, "version": self.version},
            "tasks": tasks,
            # Requests are read on the main thread while tasks run on the pool, so pings are
            # answered while busy.
            "capabilities": ["cancel", "progress", "stream", "ping_while_busy"],
        })

    def _run_task(self, id_, params):
        task_id = params.get("task_id")
        name = params.get("task")
        if self._pool is None:
            return self._error(id_, -32600, "task.run before initialize")
        if self._shutting_down:
            return self._error(id_, SHUTTING_DOWN, "plugin is shutting down")
        fn = self._tasks.get(name)
        if fn is None:
            return self._error(id_, UNKNOWN_TASK, "unknown task %s" % name)
        cancelled = threading.Event()
        with self._running_lock:
            self._running[task_id] = cancelled
        ctx = Context(self, task_id, params.get("attempt", 1), cancelled, params)
        self._pool.submit(self._execute, id_, fn, ctx, params.get("args") or [], params.get("kwargs") or {})

    def _execute(self, id_, fn, ctx, args, kwargs):
        try:
            result = fn(ctx, *args, **kwargs)
            try:
                self._reply(id_, result)
            except (TypeError, ValueError) as exc:
                self._error(id_, TASK_FAILED, "result is not JSON-serializable", {
                    "type": "TypeError", "message": "result is not JSON-serializable: %s" % exc,
                    "module": "builtins", "retryable": False})
        except Cancelled as exc:
            self._error(id_, TASK_CANCELLED, "task cancelled", {
                "type": "Cancelled", "message": str(exc) or "task cancelled", "retryable": False})
        except BaseException as exc:  # a task failure must never end the plugin
            self._error(id_, TASK_FAILED, "%s: %s" % (type(exc).__name__, exc), {
                "type": getattr(exc, "type_name", None) or type(exc).__name__,
                "message": str(exc),
                "module": type(exc).__module__,
                "traceback": traceback.format_exc(),
                "retryable": bool(getattr(exc, "retryable", False)),
            })
        finally:
            with self._running_lock:
                self._running.pop(ctx.task_id, None)
                self._running_lock.notify_all()

    def _shutdown(self, id_):
        self._shutting_down = True

        def wait_then_reply():
            with self._running_lock:
                while self._running:
                    self._running_lock.wait()
            self._reply(id_, None)

        threading.Thread(target=wait_then_reply, daemon=True).start()

    def _cancel(self, params):
        with self._running_lock:
            event = self._running.get(params.get("task_id"))
        if event is not None:
            event.set()

    def _dispatch(self, msg):
        method = msg.get("method")
        id_ = msg.get("id")
        params = msg.get("params") or {}
        if method is None:
            return  # a response: the worker sends none we wait for
        if id_ is None:
            if method == "task.cancel":
                self._cancel(params)
            elif method == "exit":
                self._out.flush()
                os._exit(0)
            return
        if method == "initialize":
            self._initialize(id_, params)
        elif method == "task.run":
            self._run_task(id_, params)
        elif method == "ping":
            self._reply(id_, {})
        elif method == "shutdown":
            self._shutdown(id_)
        else:
            self._error(id_, METHOD_NOT_FOUND, "unknown method %s" % method)

    def run(self):
        """Serves the protocol until the worker says `exit` or closes stdin."""
        proto_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._out = os.fdopen(proto_fd, "wb", buffering=0)
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                self._error(None, PARSE_ERROR, "cannot parse request: %s" % exc)
                continue
            self._dispatch(msg)
        os._exit(0)
