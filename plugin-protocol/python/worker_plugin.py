"""Python SDK for `worker` plugins (protocol 1.5). Standard library only (`jsonpickle` optional).

    from worker_plugin import Plugin

    plugin = Plugin("my-plugin", "1.0.0")

    @plugin.task("my.add", description="Adds two numbers")
    def add(ctx, a, b):
        ctx.progress(1, 1)
        return a + b

    plugin.run()

Handlers receive a Context first, then the task's args and kwargs. The SDK reads requests on
the main thread and runs tasks on a thread pool as large as the worker's declared concurrency.
At start it moves the protocol to a private copy of stdout and points file descriptor 1 at
stderr, so a stray write to fd 1 (a C extension, a subprocess) lands in the log instead of
corrupting the protocol.

A handler asks to be run again later with `ctx.retry(exc=..., countdown=..., eta=...,
max_retries=...)`, as a Celery task calls `self.retry(...)`: it raises `Retry`, which the SDK
answers with error -32004 (see `Retry`).

What a task's handler prints belongs to that task: while a handler runs, text its thread writes
through `sys.stdout` or `sys.stderr` (print(), `print(file=sys.stderr)`, `sys.stderr.write`, a
logging handler that looks up `sys.stderr` when it writes) becomes `log` notifications on the
protocol pipe, one per line: `{"level": "info", "message": <the line, without its newline>,
"fields": {"task_id": <the task>, "stream": "stdout"}}` (stream `stderr` for what went to
sys.stderr; level `info` for both, as plain stderr lines are logged). Several tasks run at once on the pool, so this is how the worker
tells their output apart (a Girder job's log gets its task's lines, as Girder Worker's
`logPrint` tees a task's output). A partial line waits for its newline; what is left when the
handler returns or raises is sent then, before the task's answer, so the lines of a task always
come before its answer. A line longer than 64 KiB characters goes out in 64 KiB pieces, and a
message the worker's `max_line_bytes` could not take is cut, saying so. Text from any other
thread (the reader, threads the plugin starts) and writes to fd 1 or fd 2 go to stderr as plain
lines; so does text written to `sys.stdout.buffer`, and through a stream a logging handler took
before `run()` (`logging.basicConfig()` at import keeps the old `sys.stderr`). Before `run()`
stdout is still the protocol pipe: print() at import is a stray line there (the worker logs it)
unless still buffered at `run()`, which sends it to stderr. `Plugin(..., capture_output=False)`
sends what tasks print to stderr too, unattributed, as before.

A task whose Celery message was encoded by jsonpickle (Girder Worker's `girder_io`;
`ctx.serializer == "jsonpickle"`) arrives with jsonpickle's tags (`py/object`, `py/reduce`,
`py/id`, ...) still in its args and kwargs, tuples already turned into lists by the worker
(where the body holds `py/id` references, inner tuples keep their tag for jsonpickle). When the plugin's own environment can import `jsonpickle`, the SDK decodes them (imported on
the first such task) on the task's thread before the handler is called, so the handler and
`ctx.kwargs` get the objects a Girder Worker task would get, but lists for tuples; args that do
not decode fail the task as `JsonpickleDecodeError`. Without jsonpickle the handler gets the
JSON as it came. Decoding calls what the message names, as in Girder Worker: take such tasks
only from a broker you trust. JSON tasks and `ctx.request.headers` are never decoded.

A plugin may also be a queue backend and a result backend (protocol 1.5, PROTOCOL.md §4a), with
or without tasks: `@plugin.offers` registers a generator of `Offer` objects (the tasks of the
plugin's own queue, sent to the worker as `task.offer` requests, at most the worker's window
unanswered), and `@plugin.stores` a function that stores each `result.store` record. See
`Offer`, `Plugin.offers` and `Plugin.stores`.
"""

import collections
import datetime
import itertools
import json
import math
import numbers
import os
import re
import select
import stat
import sys
import threading
import time
import traceback
import types
import queue
import uuid

PROTOCOL_VERSION = "1.5"

PARSE_ERROR = -32700
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
TASK_FAILED = -32000
TASK_CANCELLED = -32001
SHUTTING_DOWN = -32002
UNKNOWN_TASK = -32003
TASK_RETRY = -32004
WINDOW_FULL = -32005


_current = threading.local()
"""Per thread: `ctx`, the Context of the task whose handler runs on it (absent or None when none
does). It decides where text written through sys.stdout and sys.stderr goes."""

_OUTPUT_STREAMS = (("stdout", "info"), ("stderr", "info"))
"""The `fields.stream` and `level` of a task's output lines, by index (0 stdout, 1 stderr)."""
_OUTPUT_PIECE = 64 * 1024
"""The most characters one output line or partial line is sent as: longer goes out in pieces."""
_DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# Bytes queued behind a write under way before a task thread that writes more waits for it
# (the worker stops reading while a task's caller is slow; tasks are held back, not buffered
# without end). The reading thread never waits: it must keep reading the worker's requests.
_PENDING_LIMIT = 1024 * 1024

# One encoder for every line: NaN and Infinity are not JSON, so allow_nan=False fails the task
# instead of the line.
_dumps = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode
# One decoder for every line read, given text: json.loads would check the type and sniff the
# encoding of every line first (the protocol is UTF-8; a bad byte is a ValueError like any).
_decoder = json.JSONDecoder()
_scan_once = _decoder.scan_once


def _loads(text):
    """The value a line holds, as `_decoder.decode(text)` gives it, but for a line that is one
    value and nothing else (every line the worker writes) straight from json's C scanner,
    without decode's Python frames and its two whitespace matches. Anything else (whitespace
    around the value, a second value, no value) goes to decode, which says what is wrong."""
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    if end != len(text):
        return _decoder.decode(text)
    return value


def current_context():
    """The Context of the task running on this thread, or None outside a task."""
    return getattr(_current, "ctx", None)


class Cancelled(Exception):
    """Raise (or let Context.check_cancelled raise) to end a task that was asked to stop."""


class JsonpickleDecodeError(Exception):
    """The failure of a jsonpickle task whose args or kwargs jsonpickle could not decode."""


class TaskError(Exception):
    """An error with an explicit type name and retry hint, for callers that want them."""

    def __init__(self, message, type_name=None, retryable=False):
        super().__init__(message)
        self.type_name = type_name
        self.retryable = retryable


class Retry(Exception):
    """Ends a task asking the worker to run it again later, like Celery's
    `celery.exceptions.Retry`; `ctx.retry(...)` raises it. The SDK answers the task with error
    -32004 (PROTOCOL.md §4): `exc` (an exception instance, or None) is reported as a task
    error's data (type, message, module, traceback, retryable); `countdown` (seconds, a finite
    number >= 0) or `eta` (a datetime, naive meaning UTC, or an ISO 8601 string) says when,
    `countdown` winning when both are given, neither meaning 180 s; `max_retries` (an int >= 0,
    default 3) is how many retries the task may have in all. Values are checked here: a bad one
    raises TypeError or ValueError instead, which fails the task as any exception does."""

    def __init__(self, exc=None, countdown=None, eta=None, max_retries=None):
        _retry_fields(exc, countdown, eta, max_retries)
        super().__init__(_retry_message(exc))
        self.exc = exc
        self.countdown = countdown
        self.eta = eta
        self.max_retries = max_retries

    def _answer(self):
        """The message and `data` of the task's -32004 answer. Checked again: the handler may
        have changed the attributes since."""
        data = _retry_fields(self.exc, self.countdown, self.eta, self.max_retries)
        if self.exc is not None:
            # A fresh exception has no traceback of its own: where ctx.retry was called is one.
            data["exc"] = _error_data(self.exc, self.exc.__traceback__ or self.__traceback__)
        return _retry_message(self.exc), data


_ISO_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?"
                       r"(?:[Zz]|([+-])(\d{2}):?(\d{2}))?", re.ASCII)
"""An ISO 8601 time: date, time, fraction, offset sign, hours, minutes (no offset: UTC)."""


def _retry_fields(exc, countdown, eta, max_retries):
    """The `countdown`, `eta` and `max_retries` of a -32004 answer's data, only those given,
    after checking them and `exc`: TypeError or ValueError names the argument that is wrong."""
    if exc is not None and not isinstance(exc, BaseException):
        raise TypeError("ctx.retry: exc must be an exception instance or None, not %r" % (exc,))
    fields = {}
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, numbers.Real):
            raise TypeError("ctx.retry: countdown must be a number of seconds, not %r"
                            % (countdown,))
        try:
            seconds = float(countdown)
        except OverflowError:
            seconds = math.inf
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("ctx.retry: countdown must be a finite number of seconds >= 0, "
                             "not %r" % (countdown,))
        fields["countdown"] = seconds
    if eta is not None:
        fields["eta"] = _iso_time(eta)
    if max_retries is not None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, numbers.Integral):
            raise TypeError("ctx.retry: max_retries must be an int, not %r" % (max_retries,))
        if max_retries < 0:
            raise ValueError("ctx.retry: max_retries must be >= 0, not %r" % (max_retries,))
        fields["max_retries"] = int(max_retries)
    return fields


def _iso_time(eta):
    """`eta` as the RFC 3339 string the worker reads: a datetime in UTC (a naive one is taken
    as UTC already); a string checked, its offset kept (none meaning UTC), written out in full
    (`T`, and `+hh:mm` for `Z`, `+hhmm` or none)."""
    if isinstance(eta, datetime.datetime):
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=datetime.timezone.utc)
        return eta.astimezone(datetime.timezone.utc).isoformat()
    if not isinstance(eta, str):
        raise TypeError("ctx.retry: eta must be a datetime or an ISO 8601 string, not %r" % (eta,))
    match = _ISO_TIME.fullmatch(eta)
    try:
        if match is None:
            raise ValueError
        date, clock, fraction, sign, hours, minutes = match.groups()
        datetime.datetime.strptime(date + " " + clock, "%Y-%m-%d %H:%M:%S")  # 2030-02-30: no
        if sign and (int(hours) > 23 or int(minutes) > 59):
            raise ValueError
    except ValueError:
        raise ValueError("ctx.retry: eta must be an ISO 8601 time such as "
                         "2030-01-02T03:04:05+00:00, not %r" % (eta,)) from None
    return "%sT%s%s%s%s:%s" % (date, clock, fraction or "", sign or "+", hours or "00",
                               minutes or "00")


def _retry_message(exc):
    return "retry" if exc is None else "retry: " + _error_message(exc)


def _error_message(exc):
    """The message of a task error answer for `exc`."""
    return "%s: %s" % (type(exc).__name__, exc)


def _error_data(exc, tb):
    """The `data` of a task error answer (PROTOCOL.md §4) for `exc`, raised with traceback
    `tb`: of a -32000 failure, and the `exc` of a -32004 retry."""
    return {
        "type": getattr(exc, "type_name", None) or type(exc).__name__,
        "message": str(exc),
        "module": type(exc).__module__,
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        "retryable": bool(getattr(exc, "retryable", False)),
    }


class Context:
    """What a running task can see and do besides returning."""

    # The handler's partial output lines, made on its first write without a newline; a class
    # default, so a task that prints nothing costs nothing for it. See Plugin._capture.
    _partial = None

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
        None for a task from the control socket), `.headers` (the message's application
        headers, e.g. Girder's `jobInfoSpec`; `{}` when there are none). Each header is also
        an attribute (`.jobInfoSpec`, `.girder_client_token`) unless its name is not a Python
        identifier or is already taken (`.id`, `.retries`, `.headers`, ...): those are only
        in `.headers`. Headers stay JSON: nothing in them is decoded."""
        if self._request is None:
            request = dict(self._request_params or {})
            headers = request.get("headers")
            if not isinstance(headers, dict):
                headers = {}
            request["headers"] = headers
            request["id"] = self.task_id
            request["delivery_info"] = self.delivery_info
            for key in ("retries", "eta", "expires", "parent_id", "root_id", "group", "hostname"):
                request.setdefault(key, 0 if key == "retries" else None)
            for key, value in headers.items():
                # Never over a fact or one of the namespace's own attributes (`__class__`).
                if key.isidentifier() and key not in request and not hasattr(
                        types.SimpleNamespace, key):
                    request[key] = value
            self._request = types.SimpleNamespace(**request)
        return self._request

    @property
    def serializer(self):
        """How the task's Celery message body was encoded: `"json"`, or `"jsonpickle"` (Girder
        Worker's `girder_io`; see the module doc for what the SDK decodes)."""
        return self.delivery_info.get("serializer") or "json"

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

    def retry(self, exc=None, countdown=None, eta=None, max_retries=None):
        """Ends the task asking the worker to run it again later, as Celery's `self.retry(...)`
        does: raises Retry (see it for the arguments), so `raise ctx.retry(...)` works too. A
        Celery task below its `max_retries` is published again (same id, `retries` + 1); past
        it, or from the control socket, the task fails with `exc`."""
        raise Retry(exc, countdown, eta, max_retries)


class _TaskOutput:
    """What sys.stdout or sys.stderr is while the plugin runs. On the thread of a running task,
    text written here becomes that task's `log` notifications (see Plugin._capture); on any
    other thread it goes to `real`, the stderr the plugin started with. Anything else a text
    stream has (`buffer`, `reconfigure`, ...) is `real`'s: bytes written to `.buffer` go
    straight to stderr."""

    def __init__(self, plugin, which, real):
        self._plugin = plugin
        self._which = which  # the index into _OUTPUT_STREAMS
        self._real = real

    def write(self, text):
        ctx = getattr(_current, "ctx", None)
        if ctx is None:
            return self._real.write(text)
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        self._plugin._capture(ctx, self._which, text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        # A task's partial line waits for its newline or the handler's end, flush or not.
        if getattr(_current, "ctx", None) is None:
            self._real.flush()

    def fileno(self):
        return self._real.fileno()

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    @property
    def closed(self):
        return False

    @property
    def encoding(self):
        return getattr(self._real, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._real, "errors", "strict")

    @property
    def name(self):
        return "<%s>" % _OUTPUT_STREAMS[self._which][0]

    def __getattr__(self, attr):
        real = self.__dict__.get("_real")  # absent on a half-made copy: no recursion
        if real is None:
            raise AttributeError(attr)
        return getattr(real, attr)


def _real_stderr():
    """The stderr the plugin started with, whichever thread asks: the SDK's own messages about
    the plugin (not a task) go there."""
    err = sys.stderr
    return err._real if isinstance(err, _TaskOutput) else err


def _log(text):
    """A line of the SDK's own in the plugin's log (the stderr it started with)."""
    err = _real_stderr()
    err.write(text if text.endswith("\n") else text + "\n")
    err.flush()


# -- queue and result backends (protocol 1.5, PROTOCOL.md §4a) ----------------------------------

_REOFFER_DELAY = 1.0
"""Seconds an offer the worker did not take (-32002, -32005) waits before it is offered again."""

_PULL = object()
"""_Offers._wait_for_turn's answer when the generator may be asked for its next item."""


class Offer:
    """One task from a queue backend's own queue, as the `@plugin.offers` generator yields it;
    the SDK sends it as a `task.offer` request. `task_id` (the backend's id, at most 255 bytes,
    unique across the worker's sources) defaults to a fresh uuid4 string; `soft_time_limit`
    and `hard_time_limit` are seconds, sent only when given. The callbacks:

    - `on_outcome(outcome)`, required: the task reached its final state. `outcome` is the
      `task.offer` result as a dict: `task_id`, `state` ("SUCCESS" with `result`, "FAILURE"
      with `error`). Record it and ack the task in the backend now, and only now. Called on
      the SDK's thread pool; an exception is logged with its traceback and the task stays
      unacked (the worker remembers the answer, so its re-offer is answered at once).
    - `on_progress(done, total, message)`, `on_stream(items)`: the running task's progress
      and stream items (asked for only when the callback is given), called on the thread that
      reads stdin, in order: keep them quick. `total` and `message` may be None.
    - `on_release(reason)`: the offer is given up and must not be acked: the worker refused
      it for good (`reason` is its message: a malformed offer), or the plugin is shutting
      down while the offer waited to be offered again. Called on the SDK's thread pool.
    """

    def __init__(self, task, args=(), kwargs=None, task_id=None, soft_time_limit=None,
                 hard_time_limit=None, on_outcome=None, on_progress=None, on_stream=None,
                 on_release=None):
        if not callable(on_outcome):
            raise TypeError("Offer(%r): on_outcome is required: the callback that records the "
                            "task's outcome and acks it in the queue" % (task,))
        self.task = task
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.task_id = str(uuid.uuid4()) if task_id is None else task_id
        self.soft_time_limit = soft_time_limit
        self.hard_time_limit = hard_time_limit
        self.on_outcome = on_outcome
        self.on_progress = on_progress
        self.on_stream = on_stream
        self.on_release = on_release

    def __repr__(self):
        return "Offer(%r, task_id=%r)" % (self.task, self.task_id)

    def _params(self):
        """The `task.offer` params: members left out where the defaults say the same."""
        params = {"task_id": self.task_id, "task": self.task, "args": self.args,
                  "kwargs": self.kwargs}
        limits = {name: float(value) for name, value in (
            ("soft", self.soft_time_limit), ("hard", self.hard_time_limit)) if value is not None}
        if limits:
            params["time_limit"] = limits
        if self.on_progress is not None:
            params["progress"] = True
        if self.on_stream is not None:
            params["stream"] = True
        return params


def _call_back(offer, name, *args):
    """Calls `offer`'s callback `name` (if given) with `args`; an exception is logged, since the
    SDK's threads must outlive a plugin's bug."""
    fn = getattr(offer, name)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        _log("%s of the offer of task %s failed:\n%s" % (name, offer.task_id,
                                                         traceback.format_exc()))


class _Offers:
    """The queue-backend side of a plugin: asks the `@plugin.offers` generator for offers on a
    thread of its own while fewer than `window` are unanswered, routes the worker's answers and
    `offer.*` notifications to each offer's callbacks, and offers again, a second later, what
    the worker did not take (-32002, -32005).

    Only the offering thread sends offers; the thread that reads stdin only settles answers and
    never waits for a place. A waiting re-offer holds no window place, but while `window` of
    them wait the generator is not asked for more, so a worker that takes nothing (a plugin
    down) never makes the SDK drain the backend's queue into memory."""

    def __init__(self, plugin, make_offers, window):
        self._plugin = plugin
        self._make_offers = make_offers
        self.window = window
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._outstanding = {}  # request id -> Offer: sent, not answered yet
        self._by_task_id = {}  # task_id -> Offer, the same offers, for offer.progress/stream
        self._waiting = collections.deque()  # (monotonic time due, Offer), due in this order
        self._exhausted = False  # the generator has ended
        self._stopping = False  # shutdown: nothing more is pulled or offered
        self._thread = None

    def start(self):
        """Starts offering (on `initialized`); once at most, never after a shutdown."""
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._serve, name="offers", daemon=True)
                self._thread.start()

    def stop(self):
        """Shutdown: pulls and offers nothing more, waits for the offering thread to close the
        generator and for every outstanding offer to be answered, then releases the offers
        waiting to be offered again. Callbacks go to the pool, which the caller waits for."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            while self._outstanding:
                self._lock.wait()
            while self._waiting:
                self._release(self._waiting.popleft()[1], "shutting down")

    # -- the offering thread

    def _serve(self):
        try:
            self._offer_from(iter(self._make_offers(self.window)))
        except BaseException:
            # A dead generator offers nothing again: crashing lets the worker restart the
            # plugin (with backoff), which calls it afresh; unacked offers come back then.
            _log("the @plugin.offers generator failed; the plugin exits so that the worker "
                 "restarts it:\n" + traceback.format_exc())
            os._exit(1)

    def _offer_from(self, items):
        try:
            offer = self._next_offer(items)
            while offer is not None:
                self._send(offer)
                offer = self._next_offer(items)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _next_offer(self, items):
        """The next offer to send, once the window has a place for it: a due re-offer first,
        else the generator's next Offer. None when stopping, or once the generator has ended
        and no offer is left to answer or offer again."""
        while True:
            turn = self._wait_for_turn()
            if turn is not _PULL:
                return turn
            try:
                item = next(items)
            except StopIteration:
                with self._lock:
                    self._exhausted = True
                continue
            if item is not None:
                if not isinstance(item, Offer):
                    raise TypeError("@plugin.offers yielded %r: yield Offer(...) objects, or "
                                    "None when nothing is ready" % (item,))
                return item

    def _wait_for_turn(self):
        """Waits for a window place, then says what fills it: a due re-offer, _PULL, or None
        (stopping, or nothing left at all)."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                room = len(self._outstanding) < self.window
                if room and self._waiting and self._waiting[0][0] <= now:
                    return self._waiting.popleft()[1]
                if room and not self._exhausted and len(self._waiting) < self.window:
                    return _PULL
                if self._exhausted and not (self._waiting or self._outstanding):
                    return None
                # An answer notifies; a re-offer falls due on its own.
                self._lock.wait(self._waiting[0][0] - now if room and self._waiting else None)
            return None

    def _send(self, offer):
        try:
            params = _dumps(offer._params())
        except (TypeError, ValueError) as exc:  # NaN, a circular structure
            _log("cannot offer task %s: %s; released" % (offer.task_id, exc))
            return self._release(offer, "cannot offer: %s" % exc)
        with self._lock:
            if self._stopping:  # pulled (or fell due) just as the shutdown came
                return self._release(offer, "shutting down")
            id_ = next(self._ids)
            # Registered before it is written: the answer may come back at once.
            self._outstanding[id_] = offer
            self._by_task_id[offer.task_id] = offer
        self._plugin._write(('{"jsonrpc":"2.0","id":%d,"method":"task.offer","params":%s}\n' % (
            id_, params)).encode("utf-8"))

    # -- on the thread that reads stdin

    def answered(self, msg):
        """The worker's answer to one of our offers."""
        id_ = msg.get("id")
        with self._lock:
            offer = self._outstanding.get(id_)
        if offer is None:
            return _log("an answer to no outstanding offer (id %r) was ignored" % (id_,))
        error = msg.get("error")
        if not isinstance(error, dict):
            return self._settle(id_, outcome=msg.get("result"))
        message = str(error.get("message") or "offer refused (%s)" % error.get("code"))
        if error.get("code") in (SHUTTING_DOWN, WINDOW_FULL):
            return self._settle(id_, not_taken=message)
        _log("the worker refused the offer of task %s for good (%s: %s): released" % (
            offer.task_id, error.get("code"), message))
        self._settle(id_, released=message)

    def _settle(self, id_, outcome=None, not_taken=None, released=None):
        """Frees answered offer `id_`'s window place and hands it on: its `outcome` to
        on_outcome, or (`not_taken`) to wait and be offered again, or to on_release (`released`,
        and `not_taken` while stopping). Callbacks are submitted before the place is freed, so
        a shutdown that sees no offer outstanding finds them on the pool."""
        with self._lock:
            offer = self._outstanding.pop(id_)
            if self._by_task_id.get(offer.task_id) is offer:
                del self._by_task_id[offer.task_id]
            if not_taken is not None and not self._stopping:
                self._waiting.append((time.monotonic() + _REOFFER_DELAY, offer))
            elif not_taken is not None or released is not None:
                self._release(offer, not_taken if not_taken is not None else released)
            else:
                self._plugin._submit(_call_back, offer, "on_outcome", outcome)
            self._lock.notify_all()

    def _release(self, offer, reason):
        self._plugin._submit(_call_back, offer, "on_release", reason)

    def notified(self, method, params):
        """`offer.progress` or `offer.stream`: to the matching outstanding offer's callback."""
        with self._lock:
            offer = self._by_task_id.get(params.get("task_id"))
        if offer is None:
            return  # answered meanwhile, or not ours: notifications are best effort
        if method == "offer.progress":
            _call_back(offer, "on_progress", params.get("done"), params.get("total"),
                       params.get("message"))
        else:
            _call_back(offer, "on_stream", params.get("items") or [])


class Plugin:
    def __init__(self, name, version, capture_output=True):
        """`capture_output=False` leaves what tasks print on stderr, unattributed, instead of
        sending it as their `log` notifications (see the module doc)."""
        self.name = name
        self.version = version
        self.capture_output = capture_output
        self._max_line_bytes = _DEFAULT_MAX_LINE_BYTES
        self.settings = {}
        self._tasks = {}
        self._descriptions = {}
        self._out = None
        self._out_lock = threading.Lock()
        self._out_room = threading.Condition(self._out_lock)
        self._pending = []
        self._pending_bytes = 0
        self._writing = False
        self._reader = None  # the thread that reads stdin, once run() starts
        self._held = None  # while it handles one read's lines: what it wrote meanwhile
        self._room = None  # a poll for room on stdout, once run() made it non-blocking (a pipe)
        self._final = False  # exiting: the reader thread may wait for stdout (see _write)
        self._running = {}
        self._running_lock = threading.Condition()
        self._shutting_down = False
        self._pool = None
        self._jobs = 0  # callbacks and stores on the pool, queued or running (under _running_lock)
        self._event_handler = None
        self._events = None  # the read's events for an `on_events` handler; None for `on_event`
        self._inline = set()  # task names run on the reader thread (@plugin.task(inline=True))
        self._offers_fn = None
        self._offers = None  # the _Offers, once the worker made this plugin a queue backend
        self._store_fn = None

    def task(self, name=None, description=None, inline=False):
        """Decorator registering a handler under `name` (default: the function's name).

        `inline=True` says the task is quick (microseconds, never blocking): it runs on the
        thread that reads stdin, with no hand-off to a task thread (and so no GIL hand-off),
        which is how a plugin of many tiny tasks keeps up with the worker. While it runs,
        nothing else is read, so a `task.cancel` or `ping` waits for it: keep slow, blocking or
        cancellable work off `inline`."""

        def register(fn):
            task_name = name or fn.__name__
            self._tasks[task_name] = fn
            if inline:
                self._inline.add(task_name)
            else:
                self._inline.discard(task_name)
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
        self._events = None
        return fn

    def on_events(self, fn):
        """Decorator registering a handler of the worker's `event` notifications in batches,
        instead of `on_event`: it gets a list of the events one read of stdin brought (one or
        more, in order), once that read's other lines are handled. For a handler whose cost is
        per call rather than per event: one write and one flush for a batch. Same thread, same
        rules as `on_event`: keep it quick; an exception is logged, not fatal."""
        self._event_handler = fn
        self._events = []
        return fn

    def offers(self, fn):
        """Decorator registering the plugin's queue (protocol 1.5): `fn(window)` is called once,
        on a thread of its own, after the worker's `initialized`, when the worker made this
        plugin a queue backend (`provides = ["queue_backend"]` in plugin.toml). It yields
        Offer objects, or None when nothing is ready, so the SDK can notice a shutdown. The
        SDK asks for the next item only while fewer than `window` offers are unanswered, and
        at shutdown stops asking and closes the generator. Should the generator raise, the
        plugin exits for the worker to restart it."""
        self._offers_fn = fn
        return fn

    def stores(self, fn):
        """Decorator registering the plugin's result store (protocol 1.5): `fn(record)` gets
        each `result.store` request's params as a dict (`task_id`, `task`, `state`, `result`
        or `error`, `args`, `kwargs`, `submitter`, `attempts`, `started`, `finished`) on the
        thread pool, as tasks run, and returns once the record is stored (an upsert by
        `task_id`: a record may come twice). Raising makes the worker store it again later."""
        self._store_fn = fn
        return fn

    def _on_event(self, params):
        if self._event_handler is None:
            return
        if self._events is not None:
            self._events.append(params)  # handed over with the rest of this read's
            return
        self._call_event_handler(params, params.get("event"))

    def _deliver_events(self):
        """Hands the events one read brought to an `on_events` handler."""
        if self._events:
            batch, self._events = self._events, []
            more = " and %d more" % (len(batch) - 1) if len(batch) > 1 else ""
            self._call_event_handler(batch, "%s%s" % (batch[0].get("event"), more))

    def _call_event_handler(self, arg, what):
        try:
            self._event_handler(arg)
        except Exception:  # one bad event must not end the subscriber
            sys.stderr.write("event handler failed on %s:\n%s" % (what, traceback.format_exc()))
            sys.stderr.flush()

    # -- output -------------------------------------------------------------------------

    def _send(self, message):
        message["jsonrpc"] = "2.0"
        self._write((_dumps(message) + "\n").encode("utf-8"))

    def _write(self, data):
        # Whoever finds no write under way writes its own data, then everything queued
        # meanwhile: replies that end together leave in one write, and no thread waits for
        # another's flush. The reader thread may be holding its own back (see run), and it
        # never waits for stdout: on a pipe it writes what the pipe takes now and hands the
        # rest to a flushing thread, so it reads on (a task.cancel, say) while the worker is
        # not reading this plugin's stdout.
        # A task thread that finds _PENDING_LIMIT queued waits for the writer to take it.
        reading = threading.get_ident() == self._reader
        held = self._held
        if held is not None and reading:
            held.append(data)
            return
        with self._out_room:
            while self._writing and self._pending_bytes >= _PENDING_LIMIT and not reading:
                self._out_room.wait()
            if self._writing:
                self._pending.append(data)
                self._pending_bytes += len(data)
                return
            self._writing = True
        if reading and self._room is not None and not self._final:
            try:
                written = self._out.write(data) or 0  # None: the pipe is full
            except BaseException:
                with self._out_room:
                    self._writing = False
                    self._out_room.notify_all()
                raise
            with self._out_room:
                if written == len(data) and not self._pending:
                    self._writing = False
                    return
                rest = data[written:] + b"".join(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
            threading.Thread(target=self._drain, args=(rest, True), name="stdout-flush",
                             daemon=True).start()
            return
        self._drain(data)

    def _drain(self, data, flushing=False):
        """Writes `data` and then whatever was queued meanwhile, waiting for stdout as long as
        it takes; the one write under way until nothing is queued. `flushing`: on the thread
        the reader handed its rest to, where a stdout gone ends the thread quietly (the worker
        ended this process, or will)."""
        while True:
            try:
                rest = memoryview(data)
                while rest:
                    written = self._out.write(rest)
                    if written is None:  # a pipe in non-blocking mode, full: wait for room
                        self._room.poll()
                        continue
                    rest = rest[written:]  # an unbuffered write may take part (a signal, say)
            except BaseException:
                with self._out_room:
                    self._writing = False
                    self._out_room.notify_all()
                if flushing:
                    return
                raise
            with self._out_room:
                if self._pending_bytes >= _PENDING_LIMIT:
                    self._out_room.notify_all()
                if not self._pending:
                    self._writing = False
                    if self._final:
                        self._out_room.notify_all()
                    return
                data = b"".join(self._pending)
                self._pending.clear()
                self._pending_bytes = 0

    def _flush_for_exit(self, timeout=5.0):
        """Before the process ends: what the reader held, then every write under way or
        queued, waiting at most `timeout` for a worker that stopped reading."""
        self._final = True
        self._release_held()
        deadline = time.monotonic() + timeout
        with self._out_room:
            while self._writing and time.monotonic() < deadline:
                self._out_room.wait(0.05)

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

    # -- a task's output ------------------------------------------------------------------

    def _capture(self, ctx, which, text):
        """Text a task's thread wrote to stream `which`: each completed line goes out now, the
        rest waits in `ctx._partial` (one list of parts and its length per stream), bounded by
        sending any full piece at once. Only that thread touches its task's parts."""
        partial = ctx._partial
        if "\n" in text:
            lines = text.split("\n")
            text = lines.pop()
            if partial is not None and partial[which]:
                lines[0] = "".join(partial[which][0]) + lines[0]
                partial[which] = None
            for line in lines:
                self._send_output(ctx.task_id, which, line)
        if not text:
            return
        if partial is None:
            partial = ctx._partial = [None, None]
        held = partial[which]
        if held is None:
            held = partial[which] = [[], 0]
        held[0].append(text)
        held[1] += len(text)
        if held[1] >= _OUTPUT_PIECE:
            rest = "".join(held[0])
            cut = len(rest) - len(rest) % _OUTPUT_PIECE
            self._send_output(ctx.task_id, which, rest[:cut])
            rest = rest[cut:]
            partial[which] = [[rest], len(rest)] if rest else None

    def _end_output(self, ctx):
        """Sends what the task's handler left without a newline, stdout's first."""
        partial, ctx._partial = ctx._partial, None
        for which, held in enumerate(partial):
            if held is not None:
                self._send_output(ctx.task_id, which, "".join(held[0]))

    def _send_output(self, task_id, which, text):
        """`text` (no newline in it) as `log` notifications of at most _OUTPUT_PIECE
        characters each; one that would still pass `max_line_bytes` is cut, with a marker."""
        stream, level = _OUTPUT_STREAMS[which]

        def line(message):
            # ensure_ascii: the line is ASCII, so its length is its size in bytes.
            return _dumps({"jsonrpc": "2.0", "method": "log", "params": {
                "level": level, "message": message,
                "fields": {"task_id": task_id, "stream": stream}}})

        for start in range(0, max(len(text), 1), _OUTPUT_PIECE):
            message = text[start:start + _OUTPUT_PIECE]
            data = line(message)
            keep = len(message)
            while len(data) > self._max_line_bytes and keep:
                # Escapes make a character up to 12 bytes: shrink in proportion, then re-check.
                keep = max(0, min(keep - 1, keep * self._max_line_bytes // len(data) - 64))
                data = line("%s... [output line cut: %d of %d characters]" % (
                    message[:keep], keep, len(message)))
            if len(data) > self._max_line_bytes:  # not even the marker fits: the log has it
                err = _real_stderr()
                err.write("task %s %s: %s\n" % (task_id, stream, message))
                err.flush()
                continue
            self._write((data + "\n").encode("ascii"))

    # -- requests -------------------------------------------------------------------------

    def _initialize(self, id_, params):
        self.settings = params.get("settings") or {}
        limits = params.get("limits") or {}
        concurrency = max(1, int(limits.get("concurrency", 1)))
        self._max_line_bytes = int(limits.get("max_line_bytes") or _DEFAULT_MAX_LINE_BYTES)
        # A fixed pool on a SimpleQueue: a busy task thread takes the next task without
        # sleeping, so a stream of short tasks costs no thread hand-off each.
        self._pool = queue.SimpleQueue()
        for i in range(concurrency):
            threading.Thread(target=self._serve_tasks, name="task-%d" % i, daemon=True).start()
        self._offers = self._queue_backend(params.get("queue_backend"))
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

    def _queue_backend(self, init):
        """The queue-backend side, when the plugin has `@plugin.offers` and the worker's
        initialize made it a queue backend (`queue_backend.window`); else None."""
        if self._offers_fn is None:
            return None
        if not isinstance(init, dict):
            _log("@plugin.offers is registered but the worker did not make this plugin a queue "
                 "backend (no queue_backend in initialize): add `provides = [\"queue_backend\"]` "
                 "to plugin.toml; nothing is offered")
            return None
        return _Offers(self, self._offers_fn, max(1, int(init.get("window") or 16)))

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
        if ctx.delivery_info.get("serializer") == "jsonpickle":
            # Decoded on the task's thread: the reader stays free for pings and cancels.
            self._pool.put((self._execute, (
                id_, _decoding_jsonpickle(fn, params.get("args") or []), ctx, (), {})))
        elif name in self._inline:
            self._execute(id_, fn, ctx, params.get("args") or [], ctx.kwargs)
        else:
            self._pool.put((self._execute, (id_, fn, ctx, params.get("args") or [], ctx.kwargs)))

    def _serve_tasks(self):
        take = self._pool.get
        while True:
            job, args = take()
            job(*args)

    def _submit(self, fn, *args):
        """Runs `fn(*args)` on the pool, counted so that a shutdown waits for it."""
        with self._running_lock:
            self._jobs += 1
        self._pool.put((self._run_job, (fn, args)))

    def _run_job(self, fn, args):
        try:
            fn(*args)
        except BaseException:  # the pool's thread must outlive it
            _log("%s failed:\n%s" % (getattr(fn, "__name__", fn), traceback.format_exc()))
        finally:
            with self._running_lock:
                self._jobs -= 1
                self._running_lock.notify_all()

    def _store(self, id_, record):
        """A `result.store` request, on the pool: `{}` once stored, -32000 if the store raised."""
        try:
            self._store_fn(record)
        except BaseException as exc:  # a failed store must never end the plugin
            return self._fail(id_, exc)
        self._reply(id_, {})

    def _execute(self, id_, fn, ctx, args, kwargs):
        _current.ctx = ctx
        try:
            try:
                result = fn(ctx, *args, **kwargs)
            finally:
                # The handler is done: what it printed goes out before its answer, and what is
                # written from here on is the SDK's, not the task's.
                _current.ctx = None
                if ctx._partial is not None:
                    self._end_output(ctx)
            try:
                self._reply(id_, result)
            except (TypeError, ValueError) as exc:
                self._error(id_, TASK_FAILED, "result is not JSON-serializable", {
                    "type": "TypeError", "message": "result is not JSON-serializable: %s" % exc,
                    "module": "builtins", "retryable": False})
        except Retry as retry:
            try:
                self._error(id_, TASK_RETRY, *retry._answer())
            except Exception as exc:  # changed since it was checked, or its exc will not encode
                self._fail(id_, exc)
        except Cancelled as exc:
            self._error(id_, TASK_CANCELLED, "task cancelled", {
                "type": "Cancelled", "message": str(exc) or "task cancelled", "retryable": False})
        except BaseException as exc:  # a task failure must never end the plugin
            self._fail(id_, exc)
        finally:
            self._running.pop(ctx.task_id, None)
            # Only a shutdown waits for the running set to empty (it sets the flag first).
            if self._shutting_down:
                with self._running_lock:
                    self._running_lock.notify_all()

    def _fail(self, id_, exc):
        """Answers task `id_` as failed (-32000) with `exc`, the exception being handled."""
        self._error(id_, TASK_FAILED, _error_message(exc), _error_data(exc, exc.__traceback__))

    def _shutdown(self, id_):
        self._shutting_down = True
        # Answers held back by the reader go out first: the shutdown answer says they all did.
        self._release_held()

        def wait_then_reply():
            # Offers first: their answers submit callbacks, which the pool then runs.
            if self._offers is not None:
                self._offers.stop()
            with self._running_lock:
                while self._running or self._jobs:
                    self._running_lock.wait(0.1)
            self._reply(id_, None)

        threading.Thread(target=wait_then_reply, daemon=True).start()

    def _cancel(self, params):
        ctx = self._running.get(params.get("task_id"))
        if ctx is not None:
            ctx._cancel()

    def _handle_line(self, line):
        if line[:1] != b"{" and not line.strip():
            return
        try:
            msg = _loads(line.decode("utf-8"))
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return self._error(None, PARSE_ERROR, "cannot parse request: %s" % exc)
        self._dispatch(msg)

    def _release_held(self):
        """Writes what the reader thread held back (see run), and holds nothing more."""
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held))

    def _dispatch(self, msg):
        method = msg.get("method")
        id_ = msg.get("id")
        params = msg.get("params") or {}
        if method is None:
            # A response: only a queue backend asks the worker anything (task.offer).
            if self._offers is not None:
                self._offers.answered(msg)
            return
        if id_ is None:
            return self._notified(method, params)
        if method == "task.run":
            self._run_task(id_, params)
        elif method == "initialize":
            self._initialize(id_, params)
        elif method == "ping":
            self._reply(id_, {})
        elif method == "shutdown":
            self._shutdown(id_)
        elif method == "result.store" and self._store_fn is not None:
            if self._pool is None:
                return self._error(id_, -32600, "result.store before initialize")
            # Accepted while shutting down too: the worker stores an offered task's result
            # before it answers the offer, and a shutdown waits for those answers.
            self._submit(self._store, id_, params)
        else:
            self._error(id_, METHOD_NOT_FOUND, "unknown method %s" % method)

    def _notified(self, method, params):
        if method == "task.cancel":
            self._cancel(params)
        elif method == "event":
            self._on_event(params)
        elif method in ("offer.progress", "offer.stream"):
            if self._offers is not None:
                self._offers.notified(method, params)
        elif method == "initialized":
            if self._offers is not None:
                self._offers.start()
        elif method == "exit":
            self._deliver_events()
            self._flush_for_exit()
            os._exit(0)

    def run(self):
        """Serves the protocol until the worker says `exit` or closes stdin."""
        proto_fd = os.dup(1)
        os.dup2(2, 1)
        old_stdout, real = sys.stdout, sys.stderr
        try:  # what was printed before and still sits in its buffer now goes to stderr
            old_stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass
        if self.capture_output:
            sys.stdout = _TaskOutput(self, 0, real)
            sys.stderr = _TaskOutput(self, 1, real)
        else:
            sys.stdout = real
        self._out = os.fdopen(proto_fd, "wb", buffering=0)
        mode = os.fstat(proto_fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            # Ours alone (the worker's pipe, not a terminal shared with a shell): writes that
            # find it full return at once, and a writer that may wait polls for room.
            os.set_blocking(proto_fd, False)
            self._room = select.poll()
            self._room.register(proto_fd, select.POLLOUT)
        self._reader = threading.get_ident()
        for lines in _lines_read(sys.stdin.fileno()):
            # What this thread writes while it handles what one read brought (replies of inline
            # tasks, pings) leaves in one write once it is done: one syscall, not one per reply.
            self._held = []
            for line in lines:
                self._handle_line(line)
            self._deliver_events()
            self._release_held()
        self._flush_for_exit()
        os._exit(0)


def _lines_read(fd):
    """The complete lines each read of `fd` brings, one list per read (without their newlines;
    a line cut by a read's end is finished by the next), until the end of the input."""
    partial = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if partial:
                yield [b"".join(partial)]
            return
        if b"\n" not in chunk:
            partial.append(chunk)
            continue
        lines = chunk.split(b"\n")
        if partial:
            partial.append(lines[0])
            lines[0] = b"".join(partial)
        last = lines.pop()
        partial = [last] if last else []
        yield lines


# -- jsonpickle tasks (Girder Worker's `girder_io` serializer) ---------------------------------

_jsonpickle_unpickler = None
"""jsonpickle's Unpickler class once looked for; False when jsonpickle cannot be imported."""
_jsonpickle_lock = threading.Lock()


def _jsonpickle():
    """jsonpickle's Unpickler class, or None when the plugin's environment lacks jsonpickle.
    Looked for once, on the first jsonpickle task: a plugin that gets none never imports it."""
    global _jsonpickle_unpickler
    if _jsonpickle_unpickler is None:
        with _jsonpickle_lock:
            if _jsonpickle_unpickler is None:
                try:
                    from jsonpickle.unpickler import Unpickler
                except Exception as exc:  # absent or broken: the JSON goes through as it came
                    Unpickler = False
                    # About the plugin, not the task that happens to ask first: the plugin's log.
                    err = _real_stderr()
                    err.write(
                        "jsonpickle cannot be imported (%s: %s): jsonpickle tasks get their args "
                        "and kwargs as JSON, tags intact\n" % (type(exc).__name__, exc))
                    err.flush()
                _jsonpickle_unpickler = Unpickler
    return _jsonpickle_unpickler or None


def _decoding_jsonpickle(fn, args):
    """A call of `fn` that first decodes the task's `args` and `ctx.kwargs` with jsonpickle
    (when it can be imported) and puts the decoded kwargs in `ctx.kwargs`."""

    def decode_then_call(ctx):
        kwargs = ctx.kwargs
        unpickler = _jsonpickle()
        if unpickler is None:
            return fn(ctx, *args, **kwargs)
        try:
            # Celery's body is the tuple (args, kwargs, embed), args a tuple too, and jsonpickle
            # numbers the objects `py/id` points at in encoding order, counting lists but not
            # tuples: restoring that shape (not a list of two) keeps every reference right.
            decoded_args, kwargs = unpickler(keys=True).restore(
                {"py/tuple": [{"py/tuple": args}, kwargs]}, reset=True)
            if not isinstance(kwargs, dict):
                raise TypeError("kwargs decoded to %s, not a dict" % type(kwargs).__name__)
        except Exception as exc:
            raise JsonpickleDecodeError("jsonpickle could not decode the task's args and kwargs: "
                                        "%s: %s" % (type(exc).__name__, exc)) from exc
        ctx.kwargs = kwargs
        return fn(ctx, *decoded_args, **kwargs)

    return decode_then_call


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
