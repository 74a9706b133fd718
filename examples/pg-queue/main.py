"""A queue backend (protocol 1.5, `provides = ["queue_backend"]`): offers the worker the rows of
a PostgreSQL table, one transaction per task.

The lease is a row lock. Each offer is a row taken with `SELECT ... FOR UPDATE SKIP LOCKED` on a
connection of its own, whose transaction stays open while the task runs. When the worker answers
(the task's final state), the outcome is inserted and the row deleted in that same transaction,
then committed: the record and the ack are one. When the SDK gives an offer up (shutdown), the
transaction is rolled back and the row is free again. When this process or its worker dies, the
connection drops, PostgreSQL releases the lock, and another consumer takes the row: every task
runs at least once and gets exactly one outcome row.

Settings (`[settings]` in plugin.toml): `dsn` (a libpq connection string; empty: libpq's
defaults and PG* variables), `table` (the queue, default `worker_queue`, may be
schema-qualified), `outcomes_table` (default `<table>_outcomes`), `poll_interval` (seconds to
wait for a NOTIFY before looking again, default 1). The tables, and a trigger that NOTIFYs
consumers of each insert, are created when missing.
"""
import sys
import threading
import time

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from worker_plugin import Offer, Plugin

plugin = Plugin("pg-queue", "1.0.0")


def log(message):
    sys.stderr.write("pg-queue: %s\n" % message)
    sys.stderr.flush()


def first_line(exc):
    """A PostgreSQL error's message without the LINE/caret lines that follow it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def identifier(name):
    """`schema.table` or `table` as a quoted SQL identifier."""
    return sql.Identifier(*name.split("."))


SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    task_id text NOT NULL UNIQUE DEFAULT gen_random_uuid()::text
        CHECK (octet_length(task_id) BETWEEN 1 AND 255),
    task text NOT NULL CHECK (task <> ''),
    args jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(args) = 'array'),
    kwargs jsonb NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(kwargs) = 'object'),
    soft_time_limit double precision CHECK (soft_time_limit > 0),
    hard_time_limit double precision CHECK (hard_time_limit > 0),
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {outcomes} (
    task_id text PRIMARY KEY,
    task text NOT NULL,
    state text NOT NULL,
    result jsonb,
    error jsonb,
    enqueued_at timestamptz,
    taken_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION worker_queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END $$;
"""

TRIGGER = """
CREATE TRIGGER {trigger} AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION worker_queue_notify({channel})
"""

# The CHECKs above keep malformed offers out of the table: every row is a valid `task.offer`.
TAKE = """
SELECT id, task_id, task, args, kwargs, soft_time_limit, hard_time_limit
FROM {table} ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1
"""

# The ack: the row goes and its outcome comes in one statement of the row's own transaction.
# `now()` is that transaction's start, i.e. when the row was taken.
ACK = """
WITH done AS (DELETE FROM {table} WHERE id = %(id)s RETURNING task_id, task, enqueued_at)
INSERT INTO {outcomes} (task_id, task, state, result, error, enqueued_at, taken_at)
SELECT task_id, task, %(state)s, %(result)s, %(error)s, enqueued_at, now() FROM done
ON CONFLICT (task_id) DO UPDATE SET
    task = EXCLUDED.task, state = EXCLUDED.state, result = EXCLUDED.result,
    error = EXCLUDED.error, enqueued_at = EXCLUDED.enqueued_at, taken_at = EXCLUDED.taken_at,
    finished_at = clock_timestamp()
"""


class Queue:
    """The table, and a pool of at most `window` connections: each offer holds one (its open
    transaction holds the row lock) until its outcome is recorded or it is released. The SDK
    frees an offer's window place when the worker answers, before `on_outcome` has run, so the
    pool, not the window, is what bounds the connections: the generator waits for one."""

    def __init__(self, settings, window):
        self.dsn = str(settings.get("dsn") or "")
        table = str(settings.get("table") or "worker_queue")
        outcomes = str(settings.get("outcomes_table") or table + "_outcomes")
        self.poll_interval = float(settings.get("poll_interval") or 1.0)
        self.table_name = table
        self.channel = table.rsplit(".", 1)[-1]
        self.trigger = self.channel + "_notify"
        names = {"table": identifier(table), "outcomes": identifier(outcomes)}
        self.schema = sql.SQL(SCHEMA).format(**names)
        self.create_trigger = sql.SQL(TRIGGER).format(
            trigger=sql.Identifier(self.trigger), channel=sql.Literal(self.channel), **names)
        self.take_sql = sql.SQL(TAKE).format(**names)
        self.ack_sql = sql.SQL(ACK).format(**names)
        self.listener = None  # autocommit, LISTENing on `channel`; None until set up
        self._limit = max(1, window)
        self._open = 0  # connections open for offers, idle ones included
        self._idle = []
        self._changed = threading.Condition()
        self._refused = {}  # task_id -> why the worker refused its offer for good

    # -- connections ----------------------------------------------------------------------

    def connection(self, timeout):
        """An idle connection, or a new one while fewer than the window are open; None if
        none comes free within `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._idle or self._open < self._limit, timeout)
            if self._idle:
                return self._idle.pop()
            if self._open >= self._limit:
                return None
            self._open += 1
        conn = None
        try:
            conn = psycopg.connect(self.dsn)
            # The lease lasts as long as the task runs: a server-wide idle-in-transaction
            # timeout would end it early and let another consumer run the task meanwhile.
            conn.execute("SET idle_in_transaction_session_timeout = 0")
            conn.commit()
            return conn
        except BaseException:
            if conn is not None:
                conn.close()
            self._closed()
            raise

    def give_back(self, conn):
        """Returns a connection whose transaction has ended to the pool; closes a broken one."""
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return self.discard(conn)
        with self._changed:
            self._idle.append(conn)
            self._changed.notify()

    def discard(self, conn):
        """Closes a connection (its transaction, and any row lock, goes with it)."""
        conn.close()
        self._closed()

    def close_idle(self):
        """Closes the idle connections and the listening one (opened again by `setup`)."""
        with self._changed:
            idle, self._idle = self._idle, []
        for conn in idle:
            self.discard(conn)
        if self.listener is not None:
            self.listener.close()

    def _closed(self):
        with self._changed:
            self._open -= 1
            self._changed.notify()

    def setup(self):
        """Creates the tables and the NOTIFY trigger when missing, and opens the listening
        connection. Several consumers may start at once: an advisory lock makes them take
        turns."""
        with psycopg.connect(self.dsn) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                         ["pg-queue " + self.table_name])
            conn.execute(self.schema)
            exists = conn.execute(
                "SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                [identifier(self.table_name).as_string(conn), self.trigger]).fetchone()
            if not exists:
                conn.execute(self.create_trigger)
        if self.listener is not None:
            self.listener.close()
        self.listener = psycopg.connect(self.dsn, autocommit=True)
        self.listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))

    def wait_for_rows(self):
        """Waits up to `poll_interval` for an insert's NOTIFY (one received meanwhile returns
        at once). Rows freed by a rollback or a dead consumer send none: the timeout finds
        them."""
        for _ in self.listener.notifies(timeout=self.poll_interval, stop_after=1):
            pass

    # -- offers ---------------------------------------------------------------------------

    def take(self, conn):
        """The next free row, locked in `conn`'s new transaction, as an Offer; None (and
        `conn` back in the pool) when every row is taken."""
        try:
            while True:
                row = conn.execute(self.take_sql).fetchone()
                if row is None:
                    conn.rollback()
                    break
                row_id, task_id, task, args, kwargs, soft, hard = row
                reason = self._refused.pop(task_id, None)
                if reason is None:
                    return Offer(
                        task, args=args, kwargs=kwargs, task_id=task_id,
                        soft_time_limit=soft, hard_time_limit=hard,
                        on_outcome=lambda outcome: self.ack(conn, row_id, task_id, outcome),
                        on_release=lambda reason: self.release(conn, task_id, reason))
                # Refused for good before: it would never run, so it is recorded as failed
                # and acked (PROTOCOL.md: a malformed offer), and the next row taken.
                log("task %s was refused for good (%s): recorded as failed" % (task_id, reason))
                self.record(conn, row_id, {"state": "FAILURE", "error": {
                    "kind": "malformed", "type": "OfferRefused", "module": "pg-queue",
                    "message": reason, "traceback": None}})
        except BaseException:
            self.discard(conn)
            raise
        self.give_back(conn)
        return None

    def record(self, conn, row_id, outcome):
        """Inserts the outcome and deletes the row in the transaction that locked it, and
        commits: the record and the ack are one."""
        success = outcome.get("state") == "SUCCESS"
        conn.execute(self.ack_sql, {
            "id": row_id,
            "state": outcome.get("state"),
            "result": Jsonb(outcome.get("result")) if success else None,
            "error": None if success else Jsonb(outcome.get("error")),
        })
        conn.commit()

    def ack(self, conn, row_id, task_id, outcome):
        """`on_outcome`: the task's final state, recorded with its ack."""
        try:
            self.record(conn, row_id, outcome)
        except psycopg.Error as exc:
            # The lock went with the transaction: the row is offered again, and the worker
            # answers a recent id from its memory without running it twice.
            log("outcome of %s not recorded (%s); it will be offered again" % (
                task_id, first_line(exc)))
            return self.discard(conn)
        self.give_back(conn)

    def release(self, conn, task_id, reason):
        """`on_release`: the offer is given up, never acked here: roll back, so the row is free
        for any consumer again. The worker refuses a malformed offer for good, though (the
        table's CHECKs make that rare): when this process takes such a row again, it records
        it as failed instead of offering it (see `take`). A shutdown takes nothing again."""
        log("offer %s released (%s)" % (task_id, reason))
        self._refused[task_id] = reason
        try:
            conn.rollback()
        except psycopg.Error:
            return self.discard(conn)
        self.give_back(conn)


@plugin.offers
def offers(window):
    """Rows as offers while there are any, else a wait for a NOTIFY; None between waits, so the
    SDK can stop us. A database that is down or refuses us is tried again with backoff."""
    queue = Queue(plugin.settings, window)
    failures = 0
    while True:
        try:
            if queue.listener is None or queue.listener.closed:
                queue.setup()
            conn = queue.connection(queue.poll_interval)
            offer = None if conn is None else queue.take(conn)
            if conn is not None and offer is None:
                queue.wait_for_rows()
        except psycopg.Error as exc:
            failures += 1
            if failures == 1:
                log("cannot take from %s: %s" % (queue.table_name, first_line(exc)))
            # The idle connections most likely went the same way: start afresh.
            queue.close_idle()
            # Backoff in steps of at most `poll_interval`, each followed by a None: a shutdown
            # need not wait for the whole backoff.
            retry_at = time.monotonic() + min(queue.poll_interval * 2 ** min(failures, 5), 30.0)
            while time.monotonic() < retry_at:
                time.sleep(min(queue.poll_interval, max(0.0, retry_at - time.monotonic())))
                yield None
            continue
        if failures:
            log("taking from %s again" % queue.table_name)
            failures = 0
        yield offer


if __name__ == "__main__":
    plugin.run()
