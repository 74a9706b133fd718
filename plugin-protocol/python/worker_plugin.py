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

import datetime
import json
import os
import stat
import sys
import threading
import time
import traceback
import types
import queue

PROTOCOL_VERSION = "1.3"

PARSE_ERROR = -32700
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
TASK_FAILED = -32000
TASK_CANCELLED = -32001
SHUTTING_DOWN = -32002
UNKNOWN_TASK = -32003


_current = threading.local()

# One encoder for every line: NaN and Infinity are not JSON, so allow_nan=False fails the task
# instead of the line.
_dumps = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def current_context():
    """The Context of the task running on this thread, or None outside a task."""
    return getattr(_current, "ctx", None)


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

    def __init__(self, plugin, task_id, attempt, cancelled=None, params=None):
        # Built per task on the hot path: nothing here is copied or made before it is used.
        params = params or {}
        self._plugin = plugin
        self.task_id = task_id
        self.task = params.get("task")
        self.kwargs = params.get("kwargs") or {}
        self.attempt = attempt
        # Set by task.cancel; the Event a waiting task sleeps on is made only by wait().
        self._cancel_requested = False
        self._cancelled = cancelled
        self.delivery_info = params.get("delivery_info") or {}
        self._request_params = params.get("request")
        self._request = None

    @property
    def request(self):
        """Where the task came from and Celery's request facts, like Celery's `self.request`:
        `.id`, `.retries`, `.eta`, `.expires`, `.parent_id`, `.root_id`, `.group`, `.hostname`
        (the worker's node name), `.delivery_info` (`queue`, `exchange`, `routing_key`; all
        None for a task from the control socket)."""
        if self._request is None:
            request = dict(self._request_params or {})
            for key in ("retries", "eta", "expires", "parent_id", "root_id", "group", "hostname"):
                request.setdefault(key, 0 if key == "retries" else None)
            self._request = types.SimpleNamespace(
                id=self.task_id, delivery_info=self.delivery_info, **request)
        return self._request

    def _cancel(self):
        with self._plugin._running_lock:
            self._cancel_requested = True
            if self._cancelled is not None:
                self._cancelled.set()

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
        return self._cancel_requested or (self._cancelled is not None and self._cancelled.is_set())

    def check_cancelled(self):
        if self.cancelled:
            raise Cancelled("task cancelled")

    def wait(self, seconds):
        """Sleeps up to `seconds`, waking early (and raising Cancelled) when cancelled."""
        with self._plugin._running_lock:
            if self._cancelled is None:
                self._cancelled = threading.Event()
                if self._cancel_requested:
                    self._cancelled.set()
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
        self._pending = []
        self._writing = False
        self._running = {}
        self._running_lock = threading.Condition()
        self._shutting_down = False
        self._pool = None
        self._event_handler = None

    def task(self, name=None, description=None):
        """Decorator registering a handler under `name` (default: the function's name)."""

        def register(fn):
            task_name = name or fn.__name__
            self._tasks[task_name] = fn
            self._descriptions[task_name] = description or (fn.__doc__ or "").strip() or None
            return fn

        return register

    def on_event(self, fn):
        """Decorator registering the handler of the worker's `event` notifications, sent to a
        plugin whose plugin.toml subscribes (`events = ["task.*", ...]`). It gets each event as
        a dict (`event`, `time`, `dropped` and the kind's fields), in order, on the thread that
        reads requests: keep it quick, since while it runs the worker drops events for this
        plugin (counted in the next event's `dropped`). An exception is logged, not fatal."""
        self._event_handler = fn
        return fn

    def _on_event(self, params):
        if self._event_handler is None:
            return
        try:
            self._event_handler(params)
        except Exception:  # one bad event must not end the subscriber
            sys.stderr.write("event handler failed on %s:\n%s" % (
                params.get("event"), traceback.format_exc()))
            sys.stderr.flush()

    # -- output -------------------------------------------------------------------------

    def _send(self, message):
        message["jsonrpc"] = "2.0"
        self._write((_dumps(message) + "\n").encode("utf-8"))

    def _write(self, data):
        # Whoever finds no write under way writes everything queued meanwhile: replies that
        # end together leave in one write, and no thread waits for another's flush.
        with self._out_lock:
            self._pending.append(data)
            if self._writing:
                return
            self._writing = True
        while True:
            with self._out_lock:
                if not self._pending:
                    self._writing = False
                    return
                batch = memoryview(b"".join(self._pending))
                self._pending.clear()
            try:
                while batch:  # an unbuffered write may take part of it (a signal, say)
                    batch = batch[self._out.write(batch):]
            except BaseException:
                with self._out_lock:
                    self._writing = False
                raise

    def _notify(self, method, params):
        self._send({"method": method, "params": params})

    def _reply(self, id_, result):
        # The hot path: one encode of the result into a fixed frame.
        self._write(('{"jsonrpc":"2.0","id":%s,"result":%s}\n' % (
            id_ if type(id_) is int else _dumps(id_),
            "null" if result is None else _dumps(result))).encode("utf-8"))

    def _error(self, id_, code, message, data=None):
        err = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        self._send({"id": id_, "error": err})

    # -- requests -------------------------------------------------------------------------

    def _initialize(self, id_, params):
        self.settings = params.get("settings") or {}
        concurrency = max(1, int((params.get("limits") or {}).get("concurrency", 1)))
        # A fixed pool on a SimpleQueue: a busy task thread takes the next task without
        # sleeping, so a stream of short tasks costs no thread hand-off each.
        self._pool = queue.SimpleQueue()
        for i in range(concurrency):
            threading.Thread(target=self._serve_tasks, name="task-%d" % i, daemon=True).start()
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
        ctx = Context(self, task_id, params.get("attempt", 1), None, params)
        self._running[task_id] = ctx
        self._pool.put((id_, fn, ctx, params.get("args") or [], ctx.kwargs))

    def _serve_tasks(self):
        take = self._pool.get
        while True:
            self._execute(*take())

    def _execute(self, id_, fn, ctx, args, kwargs):
        _current.ctx = ctx
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
            _current.ctx = None
            self._running.pop(ctx.task_id, None)
            # Only a shutdown waits for the running set to empty (it sets the flag first).
            if self._shutting_down:
                with self._running_lock:
                    self._running_lock.notify_all()

    def _shutdown(self, id_):
        self._shutting_down = True

        def wait_then_reply():
            with self._running_lock:
                while self._running:
                    self._running_lock.wait(0.1)
            self._reply(id_, None)

        threading.Thread(target=wait_then_reply, daemon=True).start()

    def _cancel(self, params):
        ctx = self._running.get(params.get("task_id"))
        if ctx is not None:
            ctx._cancel()

    def _dispatch(self, msg):
        method = msg.get("method")
        id_ = msg.get("id")
        params = msg.get("params") or {}
        if method is None:
            return  # a response: the worker sends none we wait for
        if id_ is None:
            if method == "task.cancel":
                self._cancel(params)
            elif method == "event":
                self._on_event(params)
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


# -- file-action tasks (the Ngenea Hub contract) ------------------------------------------------

FILE_STATES = ("processed", "skipped", "aborted", "failures", "inprogress")
"""What happened to a file: `processed`; `skipped` (already in the desired state); `aborted`
(not processed, and later tasks must not process it); `failures`; `inprogress`."""


def _path_object(path):
    if isinstance(path, dict):
        if not isinstance(path.get("path"), str):
            raise ValueError("a path object needs a string `path`: %r" % (path,))
        return dict(path)
    if isinstance(path, str):
        return {"path": path}
    raise TypeError("a path is a string or an object with a `path` key, not %r" % (path,))


class FileActionStatus:
    """The result payload of a file-action task, as Ngenea Hub expects it:

        {"jobid": ..., "paths": [processed + skipped path objects],
         "status": {"task": ..., "input_paths": [...], "input_total": n,
                    "summary": {"failures": n, "processed": n, "skipped": n},
                    "details": {"failures": [...], "processed": [...], "skipped": [...]},
                    "started": "<ISO 8601 with timezone>"}}

    `aborted` and `inprogress` appear in summary and details once a file is added with them.
    """

    def __init__(self, task, input_paths, jobid=None, queue=None):
        self.task = task
        self.input_paths = [_path_object(p) for p in (input_paths or [])]
        self.jobid = jobid
        self.queue = queue
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self._details = {state: [] for state in ("failures", "processed", "skipped")}

    @classmethod
    def from_context(cls, ctx=None, task=None):
        """Built from the running task: its `jobid` and `paths` kwargs and its queue."""
        ctx = ctx or current_context()
        if ctx is None:
            raise RuntimeError("no task is running on this thread; pass ctx")
        return cls(task or ctx.task, ctx.kwargs.get("paths") or [], ctx.kwargs.get("jobid"),
                   ctx.queue)

    def add(self, state, path, message=None):
        """Records what happened to one file; `message` (a string or a list of strings) says why."""
        if state not in FILE_STATES:
            raise ValueError("unknown file state %r; use one of %s" % (state, ", ".join(FILE_STATES)))
        entry = _path_object(path)
        if message is not None:
            entry["message"] = [message] if isinstance(message, str) else list(message)
        self._details.setdefault(state, []).append(entry)
        return entry

    def dump(self):
        """The payload to return from the task."""
        details = {state: list(entries) for state, entries in self._details.items()}
        return {
            "jobid": self.jobid,
            "paths": [{"path": e["path"]} for e in details["processed"] + details["skipped"]],
            "status": {
                "task": self.task,
                "input_paths": self.input_paths,
                "input_total": len(self.input_paths),
                "summary": {state: len(entries) for state, entries in details.items()},
                "details": details,
                "started": self.started,
            },
        }


class StreamTaskResults(FileActionStatus):
    """A FileActionStatus that also sends the files it is given to the caller as they come,
    in batches of `batch_size` files or every `interval` seconds, whichever comes first; each
    batch is one `task.stream` item `{"jobid", "task", "files": [{"path", "state", ...}]}`.
    `dump()` sends what is left before returning the payload."""

    def __init__(self, task, input_paths, jobid=None, queue=None, task_id=None, ctx=None,
                 batch_size=500, interval=1.0):
        super().__init__(task, input_paths, jobid, queue)
        self.task_id = task_id
        self._ctx = ctx or current_context()
        if self._ctx is None:
            raise RuntimeError("StreamTaskResults streams through a running task; pass ctx")
        self.batch_size = batch_size
        self.interval = interval
        self._batch = []
        self._last_flush = time.monotonic()

    @classmethod
    def from_context(cls, ctx=None, task=None, **options):
        ctx = ctx or current_context()
        if ctx is None:
            raise RuntimeError("no task is running on this thread; pass ctx")
        return cls(task or ctx.task, ctx.kwargs.get("paths") or [], ctx.kwargs.get("jobid"),
                   ctx.queue, ctx.task_id, ctx, **options)

    def add(self, state, path, message=None):
        entry = super().add(state, path, message)
        self._batch.append(dict(entry, state=state))
        if (len(self._batch) >= self.batch_size
                or time.monotonic() - self._last_flush >= self.interval):
            self.flush()
        return entry

    def flush(self):
        """Sends the files added since the last batch, if any."""
        if self._batch:
            self._ctx.stream({"jobid": self.jobid, "task": self.task, "files": self._batch})
            self._batch = []
        self._last_flush = time.monotonic()

    def dump(self):
        self.flush()
        return super().dump()


def expand_paths(paths, page_size=1000):
    """Yields pages (lists of at most `page_size` path objects) of the files under `paths`:
    folders are expanded recursively and lazily, so a tree of millions of files holds one page
    (and one directory listing at a time) in memory. Symlinks are listed, never followed; a
    folder reached twice (bind mounts) is listed once. Extra keys of a given path object are
    kept on the files found under it."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    page = []
    seen = set()
    for given in paths:
        given = _path_object(given)
        extra = {k: v for k, v in given.items() if k != "path"}
        stack = [given["path"]]
        while stack:
            path = stack.pop()
            try:
                st = os.lstat(path)
            except OSError:
                page.append(dict(extra, path=path))
            else:
                if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    try:
                        with os.scandir(path) as entries:
                            children = sorted(e.path for e in entries)
                    except OSError:
                        children = []
                    stack.extend(reversed(children))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    page.append(dict(extra, path=path))
            if len(page) >= page_size:
                yield page
                page = []
    if page:
        yield page


# -- queue names (Ngenea 2.4: `site.queue#function`) ---------------------------------------------

class ParsedQueueName:
    """A queue name `site.queue#function`, e.g. `london.highpriority#custom`: `.site`,
    `.queue`, `.function` (None where absent); `str()` gives the name back."""

    def __init__(self, site, queue, function=None):
        self.site = site
        self.queue = queue
        self.function = function

    @classmethod
    def parse(cls, name):
        base, _, function = name.partition("#")
        site, dot, queue = base.partition(".")
        if not dot:
            site, queue = None, base
        return cls(site or None, queue, function or None)

    @classmethod
    def current(cls):
        """The queue of the task running on this thread (None outside a task or off a queue)."""
        name = current_task_queue_name()
        return cls.parse(name) if name else None

    def __str__(self):
        return format_queue_name(self.site, self.queue, self.function)

    def __repr__(self):
        return "ParsedQueueName(%r, %r, %r)" % (self.site, self.queue, self.function)

    def __eq__(self, other):
        return isinstance(other, ParsedQueueName) and (
            (self.site, self.queue, self.function) == (other.site, other.queue, other.function))


def format_queue_name(site, queue, function=None):
    """`site.queue#function` (`queue#function` without a site; no `#` without a function)."""
    name = "%s.%s" % (site, queue) if site else queue
    return "%s#%s" % (name, function) if function else name


def current_task_queue_name():
    """The queue the running task was consumed from (None outside a task or off a queue)."""
    ctx = current_context()
    return ctx.queue if ctx is not None else None


def current_site():
    """The site of the running task's queue (None if it has none)."""
    parsed = ParsedQueueName.current()
    return parsed.site if parsed else None
