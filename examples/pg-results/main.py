"""A result backend (protocol 1.5, `provides = ["result_backend"]`): every final state the worker
sends with `result.store` becomes one row of a PostgreSQL table, upserted by `task_id`.

The worker counts a task as done (answers its client, acks its message) only after this
returns; raising makes it try again with backoff, so a store that cannot be made (the database
down, the table gone) holds the task back instead of losing its result. A record may come twice
(a worker that died between the store and its ack): the upsert keeps one row.

Settings (`[settings]` in plugin.toml): `dsn` (a libpq connection string; empty: libpq's
defaults and PG* variables) and `table` (default `worker_results`, may be schema-qualified),
created when missing when the process first connects.
"""
import sys
import threading

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from worker_plugin import Plugin

plugin = Plugin("pg-results", "1.0.0")


def first_line(exc):
    """A PostgreSQL error's message without the LINE/caret lines that follow it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    task_id text PRIMARY KEY,
    task text NOT NULL,
    state text NOT NULL,
    result jsonb,
    error jsonb,
    args jsonb,
    kwargs jsonb,
    submitter text,
    attempts integer,
    started timestamptz,
    finished timestamptz,
    stored_at timestamptz NOT NULL DEFAULT now()
)
"""

UPSERT = """
INSERT INTO {table}
    (task_id, task, state, result, error, args, kwargs, submitter, attempts, started, finished)
VALUES (%(task_id)s, %(task)s, %(state)s, %(result)s, %(error)s, %(args)s, %(kwargs)s,
    %(submitter)s, %(attempts)s, to_timestamp(%(started)s::float8),
    to_timestamp(%(finished)s::float8))
ON CONFLICT (task_id) DO UPDATE SET
    task = EXCLUDED.task, state = EXCLUDED.state, result = EXCLUDED.result,
    error = EXCLUDED.error, args = EXCLUDED.args, kwargs = EXCLUDED.kwargs,
    submitter = EXCLUDED.submitter, attempts = EXCLUDED.attempts, started = EXCLUDED.started,
    finished = EXCLUDED.finished, stored_at = now()
"""


class Results:
    """One autocommit connection, shared under a lock (each store is one statement), opened
    again after it is lost."""

    def __init__(self, settings):
        self.dsn = str(settings.get("dsn") or "")
        self.table_name = str(settings.get("table") or "worker_results")
        table = sql.Identifier(*self.table_name.split("."))
        self.schema = sql.SQL(SCHEMA).format(table=table)
        self.upsert = sql.SQL(UPSERT).format(table=table)
        self._conn = None
        self._created = False
        self._lock = threading.Lock()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        if not self._created:
            # Once per process: a table renamed or dropped later is an outage to report (the
            # worker retries), not something to paper over with an empty table.
            self._conn.execute(self.schema)
            self._created = True
        return self._conn

    def store(self, record):
        success = record.get("state") == "SUCCESS"
        params = {
            "task_id": record["task_id"],
            "task": record.get("task"),
            "state": record.get("state"),
            "result": Jsonb(record.get("result")) if success else None,
            "error": None if success else Jsonb(record.get("error")),
            "args": Jsonb(record.get("args", [])),
            "kwargs": Jsonb(record.get("kwargs", {})),
            "submitter": record.get("submitter"),
            "attempts": record.get("attempts"),
            "started": record.get("started"),
            "finished": record.get("finished"),
        }
        with self._lock:
            try:
                self._connection().execute(self.upsert, params)
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn.close()
                sys.stderr.write("pg-results: cannot store %s in %s: %s\n" % (
                    record["task_id"], self.table_name, first_line(exc)))
                sys.stderr.flush()
                raise


_results = None


@plugin.stores
def store(record):
    global _results
    if _results is None:
        _results = Results(plugin.settings)
    _results.store(record)


if __name__ == "__main__":
    plugin.run()
