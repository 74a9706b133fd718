"""The Nuvom side of the nuvom-queue plugin: jobs taken from Nuvom's SQLite queue with Nuvom's
own classes, their outcomes written to Nuvom's result backend the way Nuvom's own worker writes
them (`nuvom/execution/job_runner.py`), and only then acked. It knows nothing of the worker's
protocol; `main.py` wires it to the SDK.

A job goes through four steps here:

1. `jobs()` claims it with `SQLiteJobQueue.dequeue()`: the row stays in `queue_jobs`, marked
   CLAIMED with a time; Nuvom makes a claim older than its visibility timeout visible again.
2. While the worker runs it, a thread renews the claim (`LeasedQueue.renew`) every third of the
   visibility timeout, so a long task is not claimed twice; a plugin that dies stops renewing,
   and the job comes back after one visibility timeout.
3. `settle()` writes the outcome with `nuvom.result_store.set_result` / `set_error`, then acks
   with `mark_done()` (or, for a retry, `enqueue()`s it again, as Nuvom does).
4. `release()`: an offer given up at a shutdown is READY again at once (`enqueue()`); one the
   worker refused for good (malformed) is recorded as failed and acked, since it never runs.

Nothing here is atomic across the two SQLite files (`queue.db`, `result.db`); every step is
safe to repeat instead (the result backend upserts by job id, the worker answers an id it has
answered within ten minutes from memory), which is what a crash between two steps leads to.
"""

import heapq
import logging
import os
import sys
import threading
import time

log = logging.getLogger("nuvom-queue")

#: Failure kinds the worker gives a task stopped by its time limit (PROTOCOL.md, failure kinds).
TIME_LIMIT_KINDS = ("soft_time_limit", "hard_time_limit")

#: Jobs held back for a retry delay (`next_retry_at` in the future) at most; past it the plugin
#: claims no more until one is due.
MAX_DEFERRED = 1000


class ConfigError(Exception):
    """The plugin's `[settings]` or the Nuvom project's configuration cannot be served."""


class RemoteTraceback(Exception):
    """A traceback from the process that ran the task, kept as the cause of the exception the
    result backend stores (as `concurrent.futures` and `multiprocessing` do), so Nuvom's
    `traceback` column shows where the task failed, not where this plugin stored it."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return self.text


RemoteTraceback.__module__ = "worker"


def remote_exception(error):
    """An exception standing for a failure the worker reported (`kind`, `type`, `module`,
    `message`, `traceback`): its class has the remote type's name and module, its message is the
    remote message, its cause the remote traceback. Nuvom's `set_error` stores exactly those:
    `error_type`, `error_msg` (what `get_error` returns) and the formatted traceback."""
    name = str(error.get("type") or "TaskError").rsplit(".", 1)[-1]
    if not name.isidentifier():
        name = "TaskError"
    cls = type(name, (Exception,), {"__module__": str(error.get("module") or "builtins")})
    exc = cls(str(error.get("message") or error.get("kind") or "the task failed"))
    if error.get("traceback"):
        exc.__cause__ = RemoteTraceback("\n" + str(error["traceback"]).rstrip("\n"))
    return exc


def _import_queue_class():
    from nuvom.queue_backends.sqlite_queue import SQLiteJobQueue

    class LeasedQueue(SQLiteJobQueue):
        """Nuvom's SQLite queue: its table, its claim (`dequeue`), its ack (`mark_done`) and its
        re-enqueue (`enqueue`, an upsert that makes the row READY), plus the one thing Nuvom's
        own worker lacks: a claim renewed for as long as the job runs."""

        def renew(self, job_ids):
            """Moves the claim time of each still-claimed job in `job_ids` to now."""
            if not job_ids:
                return
            now = time.time()
            conn = self._get_conn()
            conn.executemany(
                "UPDATE queue_jobs SET claimed_at = ? WHERE id = ? AND status = 'CLAIMED';",
                [(now, job_id) for job_id in job_ids],
            )
            conn.commit()

    return LeasedQueue


class Bridge:
    """One Nuvom project's queue and result backend, seen from the worker."""

    def __init__(self, project_dir, task_map=None, visibility_timeout=30.0, poll_interval=0.5,
                 name="nuvom-queue"):
        if not project_dir:
            raise ConfigError(
                "[settings] project_dir is not set: name the Nuvom project's directory (where "
                "its client runs, with its .env and .nuvom/)")
        project_dir = os.path.abspath(str(project_dir))
        if not os.path.isdir(project_dir):
            raise ConfigError("[settings] project_dir %r is not a directory" % project_dir)
        task_map = task_map or {}
        if not isinstance(task_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in task_map.items()):
            raise ConfigError("[settings] task_map must map Nuvom task names to worker task names")
        try:
            visibility_timeout = float(visibility_timeout)
        except (TypeError, ValueError):
            visibility_timeout = -1.0
        if not visibility_timeout >= 1:
            raise ConfigError("[settings] visibility_timeout must be a number of seconds >= 1")
        try:
            poll_interval = float(poll_interval)
        except (TypeError, ValueError):
            poll_interval = -1.0
        if not 0.01 <= poll_interval <= 60:
            raise ConfigError("[settings] poll_interval must be seconds, 0.01 to 60")

        # Nuvom reads `.env` and resolves `.nuvom/queue.db` and `.nuvom/result.db` against the
        # working directory when it is imported (nuvom/config.py): be where its client is.
        os.chdir(project_dir)
        from nuvom.config import get_settings
        from nuvom import result_store

        _plain_nuvom_log()

        self.settings = get_settings()
        if self.settings.queue_backend.strip().lower() != "sqlite":
            raise ConfigError(
                "the Nuvom project uses queue backend %r; nuvom-queue serves Nuvom's SQLite "
                "queue (NUVOM_QUEUE_BACKEND=sqlite)" % self.settings.queue_backend)
        if self.settings.result_backend.strip().lower() == "memory":
            raise ConfigError(
                "the Nuvom project uses the memory result backend, which no other process can "
                "read; use sqlite (the default) or file")
        self.queue = _import_queue_class()(
            str(self.settings.sqlite_queue_path or ".nuvom/queue.db"),
            visibility_timeout=int(visibility_timeout))
        self.results = result_store
        result_store.get_backend()  # made now: a result backend Nuvom cannot make fails the start
        self.task_map = dict(task_map)
        self.func_names = {worker: nuvom for nuvom, worker in self.task_map.items()}
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.submitter = "queue backend %s" % name
        self._lock = threading.Lock()
        self._held = {}  # Nuvom job id -> offers of it not settled yet (renewed while > 0)
        self._offered = set()  # task ids offered and not settled: their results are settle()'s
        self._deferred = []  # heap of (next_retry_at, seq, job) claimed before their retry time
        self._seq = 0
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="nuvom-lease", daemon=True)
        self._renewer.start()

    @classmethod
    def from_settings(cls, settings, name="nuvom-queue"):
        settings = settings or {}
        return cls(settings.get("project_dir"), settings.get("task_map"),
                   settings.get("visibility_timeout", 30), settings.get("poll_interval", 0.5),
                   name=name)

    # -- what the worker is offered ------------------------------------------------------

    def task_name(self, job):
        return self.task_map.get(job.func_name, job.func_name)

    def task_id(self, job):
        """The job id; a retry's id says which (`<id>.retry1`): the worker answers an id it
        answered in the last ten minutes from memory, and a retry must run again."""
        attempt = job.max_retries - job.retries_left
        return job.id if attempt <= 0 else "%s.retry%d" % (job.id, attempt)

    def time_limit(self, job):
        """The job's timeout, else the project's `job_timeout_secs`, as Nuvom's JobRunner
        takes it: the task's hard time limit."""
        limit = job.timeout_secs or self.settings.job_timeout_secs
        return float(limit) if limit and limit > 0 else None

    def jobs(self):
        """Yields the next job to offer, or None after `poll_interval` (sooner if a retry falls
        due) when none is ready. Claims a job only when the caller asks for one, so claims
        follow the worker's window. (Nuvom's SQLite queue cannot wait for a job: it is polled.)"""
        try:
            while not self._stop.is_set():
                job = self._due() or self._claim()
                if job is None:
                    self._stop.wait(self._idle_wait())
                else:
                    # The id it is offered under, fixed now: a retry changes `task_id(job)`.
                    job.offered_as = self.task_id(job)
                    with self._lock:
                        self._offered.add(job.offered_as)
                yield job
        finally:  # closed at a shutdown: what waits for its retry time is READY again now
            self._put_back_deferred()

    def _put_back_deferred(self):
        with self._lock:
            waiting, self._deferred = self._deferred, []
        for _, _, job in waiting:
            try:
                self.queue.enqueue(job)
            except Exception:  # its claim lapses instead, after the visibility timeout
                log.exception("cannot put job %s back", job.id)
            self._hold(job.id, -1)

    def _idle_wait(self):
        with self._lock:
            if self._deferred:
                return max(0.0, min(self.poll_interval, self._deferred[0][0] - time.time()))
        return self.poll_interval

    def _due(self):
        with self._lock:
            if self._deferred and self._deferred[0][0] <= time.time():
                return heapq.heappop(self._deferred)[2]
        return None

    def _claim(self):
        while True:
            with self._lock:
                if len(self._deferred) >= MAX_DEFERRED:
                    return None
            try:
                job = self.queue.dequeue()
            except Exception:  # an unreadable row or a locked database: try again later
                log.exception("cannot claim a job from %s", self.queue.db_path)
                return None
            if job is None:
                return None
            self._hold(job.id, 1)
            if job.next_retry_at and job.next_retry_at > time.time():
                # Nuvom's own dispatcher puts such a job back and sleeps; holding its claim
                # until it is due lets the jobs behind it run meanwhile.
                with self._lock:
                    self._seq += 1
                    heapq.heappush(self._deferred, (job.next_retry_at, self._seq, job))
                continue
            return job

    # -- the worker's answer ------------------------------------------------------------

    def settle(self, job, outcome):
        """Records the task's final state as Nuvom's worker would, then acks the job (or puts
        it back for a retry). If this raises (the database is locked, the disk full), the claim
        is no longer renewed: the job comes back after the visibility timeout, is offered
        again, and the worker answers it from memory, so settling is retried."""
        try:
            if outcome.get("state") == "SUCCESS":
                self._succeed(job, outcome.get("result"))
            else:
                error = outcome.get("error") or {}
                if error.get("kind") in TIME_LIMIT_KINDS:
                    self._timed_out(job, error)
                else:
                    self._fail(job, error)
        finally:
            self._settled(job)

    def release(self, job, reason):
        """The offer was given up. At a shutdown (`reason` "shutting down") the job is READY
        again at once (Nuvom's `enqueue` upserts the row; it keeps its place, the oldest first).
        Otherwise the worker refused it for good (a malformed offer: it never runs), so it is
        recorded as failed, with the worker's reason, and acked, as PROTOCOL.md asks."""
        try:
            if reason == "shutting down":
                self.queue.enqueue(job)
            else:
                refused = {"kind": "refused", "type": "OfferRefused", "module": "worker",
                           "message": "the worker refused the offer: %s" % reason}
                if job.store_result:
                    self.results.set_error(job_id=job.id, func_name=job.func_name,
                                           error=remote_exception(refused), **self._meta(job))
                self.queue.mark_done(job.id)
        finally:
            self._settled(job)

    def _succeed(self, job, result):
        if job.store_result:
            self.results.set_result(
                job_id=job.id, func_name=job.func_name, result=result, **self._meta(job))
        self.queue.mark_done(job.id)

    def _timed_out(self, job, error):
        policy = job.timeout_policy or self.settings.timeout_policy
        if policy == "retry" and job.retries_left > 0:
            self._retry(job)  # Nuvom stores nothing for a timeout it retries
        elif policy == "ignore":
            self._succeed(job, None)  # Nuvom stores None as the result
        else:
            # Nuvom's message; the worker's (which limit, how long) goes in the traceback.
            where = "%s\n%s" % (error.get("message") or "", error.get("traceback") or "")
            self._fail(job, dict(error, type="TimeoutError", module="builtins",
                                 message="Job execution timed out.", traceback=where))

    def _fail(self, job, error):
        if job.store_result:
            self.results.set_error(
                job_id=job.id, func_name=job.func_name, error=remote_exception(error),
                **self._meta(job))
        # A cancel (`worker task cancel`) is an operator's word: final, never retried.
        if job.retries_left > 0 and error.get("kind") != "cancelled":
            self._retry(job)
        else:
            # Nuvom 0.11's worker never marks a failed job done, so its row is claimed and run
            # again after each visibility timeout; a failure is final here.
            self.queue.mark_done(job.id)

    def _retry(self, job):
        job.retries_left -= 1
        delay = job.retry_delay_secs or self.settings.retry_delay_secs
        job.next_retry_at = time.time() + delay
        self.queue.enqueue(job)

    def _meta(self, job):
        return dict(args=job.args, kwargs=job.kwargs, retries_left=job.retries_left,
                    attempts=job.max_retries - job.retries_left, created_at=job.created_at,
                    completed_at=time.time())

    def _settled(self, job):
        with self._lock:
            self._offered.discard(getattr(job, "offered_as", None))
        self._hold(job.id, -1)

    # -- the result backend (results of tasks from every source) --------------------------

    def store(self, record):
        """Stores a `result.store` record in the project's result backend, by task id (an
        upsert), so Nuvom's `get_result(task_id)` and `nuvom inspect job` see tasks that came
        from anywhere. Tasks this plugin offered are left to `settle()`, which stores them the
        Nuvom way (by job id, with the retry count) before it acks."""
        with self._lock:
            own = record.get("task_id") in self._offered
        if own or record.get("submitter") == self.submitter:
            return
        task = str(record.get("task") or "")
        meta = dict(args=tuple(record.get("args") or ()), kwargs=record.get("kwargs") or {},
                    attempts=record.get("attempts"), created_at=record.get("started"),
                    completed_at=record.get("finished"))
        func_name = self.func_names.get(task, task)
        if record.get("state") == "SUCCESS":
            self.results.set_result(job_id=record["task_id"], func_name=func_name,
                                    result=record.get("result"), **meta)
        else:
            self.results.set_error(job_id=record["task_id"], func_name=func_name,
                                   error=remote_exception(record.get("error") or {}), **meta)

    # -- claims ---------------------------------------------------------------------------

    def _hold(self, job_id, change):
        with self._lock:
            count = self._held.get(job_id, 0) + change
            if count > 0:
                self._held[job_id] = count
            else:
                self._held.pop(job_id, None)

    def _renew_loop(self):
        every = self.visibility_timeout / 3.0
        while not self._stop.wait(every):
            with self._lock:
                held = list(self._held)
            try:
                self.queue.renew(held)
            except Exception:
                log.exception("cannot renew the claims of %d job(s)", len(held))

    def close(self):
        self._stop.set()


def _stderr_handler(prefix):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix + ": %(levelname)s %(message)s"))
    return handler


def log_to_stderr():
    """The plugin's own log lines on stderr, which the worker keeps as the plugin's log."""
    if not log.handlers:
        log.addHandler(_stderr_handler("nuvom-queue"))
        log.setLevel(logging.INFO)


def _plain_nuvom_log():
    """Nuvom's own log (nuvom/log.py: a Rich console on stdout, wrapped at 80 columns, a line
    per job claimed) as plain stderr lines, warnings and errors only: the worker's log gets a
    line per problem, not three per job."""
    from nuvom.log import get_logger

    nuvom_log = get_logger()
    for handler in list(nuvom_log.handlers):
        nuvom_log.removeHandler(handler)
    nuvom_log.addHandler(_stderr_handler("nuvom"))
    nuvom_log.setLevel(logging.WARNING)
