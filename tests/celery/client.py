"""Test client: an unmodified Celery client driving `worker` through RabbitMQ.

    client.py QUEUE call NAME ARGS_JSON [KWARGS_JSON]      one task; prints its outcome as JSON
    client.py QUEUE call_id NAME ARGS_JSON                 the same, with the task's "id" in the outcome
    client.py QUEUE send_wait NAME ARGS_JSON               send one task, print {"id": ...} at once, then
                                                           its outcome when it comes
    client.py QUEUE depth                                  {"messages": ready messages in QUEUE}
    client.py QUEUE declare                                declare QUEUE as this app would (QUEUE_TYPE)
    client.py QUEUE delete                                 delete QUEUE and its exchange
    client.py QUEUE state ID                               AsyncResult(ID).state and .info (a backend any
                                                           process can read, e.g. Redis)
    client.py QUEUE send_many NAME ARGS_JSON N             send N tasks, wait for none; prints {"ids": [...]}
    client.py QUEUE collect IDS_FILE                       the outcome of each id in the JSON file (a result
                                                           backend any process can read, e.g. Redis)
    client.py QUEUE canvas SCENARIO [PATH]                 a workflow through the worker (see `canvas`)
    client.py QUEUE messages NAME ARGS_JSON [KWARGS_JSON]  also every state message seen by on_message
    client.py QUEUE batch NAME ARGS_JSON N                 N tasks; "got I" per result, then a summary
    client.py QUEUE revoke NODE NAME ARGS_JSON [plain]     start a task, wait until NODE lists it active,
                                                           app.control.revoke(terminate=True, or False
                                                           with "plain"), print outcome
    client.py QUEUE garbage                                publish unreadable messages to QUEUE
    client.py QUEUE countdown NAME ARGS_JSON SECONDS        apply_async(countdown=...); also the seconds taken
    client.py QUEUE countdown_many NAME ARGS_JSON N SECONDS N tasks with that countdown; {"results": [...], "seconds": ...}
    client.py QUEUE expires NAME ARGS_JSON                 countdown 2 s but expires after 1 s
    client.py QUEUE revoked_first NAME ARGS_JSON           revoke an id, then send a task with that id
    client.py QUEUE flood NAME ARGS_JSON N REPLY_QUEUE     send N tasks whose results go to REPLY_QUEUE
                                                           (the caller reads it raw); prints their ids

Outcomes print as {"ok": result} or {"exc_type": ..., "exc_module": ..., "message": ...}.
"""

import json
import os
import sys
import time
import uuid

from celery import chain, chord, group
from kombu import Connection, Exchange, Producer, Queue

from capp import app

TIMEOUT = 60


def outcome(fn):
    try:
        return {"ok": fn()}
    except Exception as exc:  # the point is to report what the client raised
        return {"exc_type": type(exc).__name__, "exc_module": type(exc).__module__, "message": str(exc)}


def send(queue, name, args, kwargs=None):
    # PRIORITY: the message's priority (as `apply_async(priority=...)`).
    priority = int(os.environ["PRIORITY"]) if os.environ.get("PRIORITY") else None
    return app.send_task(name, args=args, kwargs=kwargs or {}, queue=queue, priority=priority)


def flood_one(queue, name, args, reply_to):
    """Sends one task of a flood, again with the same id until the broker takes it: with
    publisher confirms (BROKER_TRANSPORT_OPTIONS={"confirm_publish": true}) a message the
    broker refuses while a cluster node stops raises here, and was not queued."""
    task_id = str(uuid.uuid4())
    for attempt in range(40):
        try:
            app.send_task(name, args=args, queue=queue, reply_to=reply_to, task_id=task_id)
            return task_id
        except Exception as exc:  # kombu's MessageNacked, a lost connection...
            print("sending %s again (attempt %d): %r" % (task_id, attempt + 1, exc), file=sys.stderr, flush=True)
            time.sleep(0.25)
    sys.exit("the broker refused task %s 40 times" % task_id)


def canvas(queue, scenario, path):
    """chain: fibonacci(10) | rust.echo("x") | fibonacci.si(12), with the middle step's result;
    chain_fails: fibonacci(10) | f.raise | fibonacci.si(3), errback f.note(path);
    link: fibonacci(10) with link f.note(path); group: 20 rust.echo; chain_group: fibonacci(10)
    then a group of 20 rust.echo; chord (needs a Redis backend): fibonacci(0..9) then f.ok with
    their results; chord_fails: a header with f.raise; chain_chord: fibonacci(5) then a chord of
    three rust.echo with f.ok as its body."""
    s = lambda name, *args: app.signature(name, args=args, queue=queue)
    if scenario == "chain":
        r = chain(s("fibonacci", 10), s("rust.echo", "x"), s("fibonacci", 12).set(immutable=True)).apply_async()
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["middle"] = r.parent.get(timeout=TIMEOUT)
        return out
    if scenario == "chain_fails":
        c = chain(s("fibonacci", 10), s("f.raise"), s("fibonacci", 3).set(immutable=True))
        r = c.on_error(s("f.note", path)).apply_async()
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["failed_id"] = r.parent.id
        return out
    if scenario == "link":
        return outcome(lambda: s("fibonacci", 10).apply_async(link=s("f.note", path)).get(timeout=TIMEOUT))
    if scenario == "group":
        return outcome(lambda: group(s("rust.echo", i) for i in range(20)).apply_async().get(timeout=TIMEOUT))
    if scenario == "chord":
        r = chord((s("fibonacci", i) for i in range(10)), s("f.ok")).apply_async()
        return outcome(lambda: r.get(timeout=TIMEOUT))
    if scenario == "chord_fails":
        header = [s("fibonacci", 1), s("f.raise", "boom"), s("fibonacci", 2)]
        r = chord(header, s("f.ok")).apply_async()
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["body_id"] = r.id
        return out
    if scenario == "chain_chord":
        r = chain(s("fibonacci", 5), chord([s("rust.echo", i) for i in range(3)], s("f.ok"))).apply_async()
        return outcome(lambda: r.get(timeout=TIMEOUT))
    if scenario == "chain_group":
        r = chain(s("fibonacci", 10), group(s("rust.echo", i) for i in range(20))).apply_async()
        return outcome(lambda: r.get(timeout=TIMEOUT))
    sys.exit("unknown canvas scenario %s" % scenario)


def main():
    queue, command, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if command == "call":
        kwargs = json.loads(rest[2]) if len(rest) > 2 else {}
        r = send(queue, rest[0], json.loads(rest[1]), kwargs)
        print(json.dumps(outcome(lambda: r.get(timeout=TIMEOUT))), flush=True)
    elif command == "call_id":
        r = send(queue, rest[0], json.loads(rest[1]))
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["id"] = r.id
        print(json.dumps(out), flush=True)
    elif command == "send_wait":
        r = send(queue, rest[0], json.loads(rest[1]))
        print(json.dumps({"id": r.id}), flush=True)
        print(json.dumps(outcome(lambda: r.get(timeout=TIMEOUT))), flush=True)
    elif command == "declare":
        with app.connection_for_write() as conn:
            app.amqp.queues[queue].bind(conn.default_channel).declare()
        print(json.dumps({"declared": queue}), flush=True)
    elif command == "depth":
        with app.connection_for_write() as conn:
            _, messages, _ = conn.default_channel.queue_declare(queue, passive=True)
        print(json.dumps({"messages": messages}), flush=True)
    elif command == "delete":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
        print(json.dumps({"ok": True}), flush=True)
    elif command == "state":
        r = app.AsyncResult(rest[0])
        info = r.info
        if isinstance(info, BaseException):
            info = {"exc_type": type(info).__name__, "message": str(info)}
        print(json.dumps({"state": r.state, "info": info}), flush=True)
    elif command == "send_many":
        ids = [send(queue, rest[0], json.loads(rest[1])).id for _ in range(int(rest[2]))]
        print(json.dumps({"ids": ids}), flush=True)
    elif command == "collect":
        ids = json.load(open(rest[0]))
        failed = []
        for task_id in ids:
            out = outcome(lambda: app.AsyncResult(task_id).get(timeout=TIMEOUT))
            if "ok" not in out:
                failed.append(out)
        print(json.dumps({"ok": len(ids) - len(failed), "failed": failed}), flush=True)
    elif command == "canvas":
        print(json.dumps(canvas(queue, rest[0], rest[1] if len(rest) > 1 else None)), flush=True)
    elif command == "messages":
        kwargs = json.loads(rest[2]) if len(rest) > 2 else {}
        if app.conf.result_backend.startswith("redis://"):
            # Celery's Redis client reads a result that is already final from its key and then
            # skips the states before it (a race with a fast task): listen to the task's
            # channel from before it is sent instead, as the worker publishes every state there.
            import redis
            task_id = "messages-%d" % time.time_ns()
            listener = redis.Redis.from_url(app.conf.result_backend).pubsub()
            listener.subscribe("celery-task-meta-" + task_id)
            r = app.send_task(rest[0], args=json.loads(rest[1]), kwargs=kwargs, queue=queue, task_id=task_id)
            out = outcome(lambda: r.get(timeout=TIMEOUT))
            seen = []
            while True:
                m = listener.get_message(timeout=TIMEOUT)
                if m is None:
                    break
                if m["type"] != "message":
                    continue
                meta = json.loads(m["data"])
                seen.append([meta["status"], meta["result"]])
                if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    break
        else:
            r = send(queue, rest[0], json.loads(rest[1]), kwargs)
            seen = []
            out = outcome(lambda: r.get(timeout=TIMEOUT, on_message=lambda m: seen.append([m["status"], m["result"]])))
        out["messages"] = seen
        print(json.dumps(out), flush=True)
    elif command == "batch":
        name, args, n = rest[0], json.loads(rest[1]), int(rest[2])
        results = [send(queue, name, args) for _ in range(n)]
        print("sent %d" % n, flush=True)
        failed = []
        for i, r in enumerate(results):
            out = outcome(lambda: r.get(timeout=TIMEOUT))
            if "ok" not in out:
                failed.append(out)
            print("got %d" % i, flush=True)
        print(json.dumps({"ok": n - len(failed), "failed": failed}), flush=True)
    elif command == "revoke":
        node, name, args = rest[0], rest[1], json.loads(rest[2])
        r = send(queue, name, args)
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            active = app.control.inspect(destination=[node], timeout=1).active() or {}
            if any(t["id"] == r.id for t in active.get(node, [])):
                break
        else:
            print(json.dumps({"error": "task never became active"}), flush=True)
            return
        # A 4th argument "plain": Celery's plain revoke (no terminate).
        app.control.revoke(r.id, terminate=rest[3:] != ["plain"])
        started = time.time()
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["seconds"] = time.time() - started
        print(json.dumps(out), flush=True)
    elif command == "countdown":
        started = time.time()
        r = app.send_task(rest[0], args=json.loads(rest[1]), queue=queue, countdown=float(rest[2]))
        out = outcome(lambda: r.get(timeout=TIMEOUT))
        out["seconds"] = time.time() - started
        print(json.dumps(out), flush=True)
    elif command == "countdown_many":
        started = time.time()
        rs = [app.send_task(rest[0], args=json.loads(rest[1]), queue=queue, countdown=float(rest[3]))
              for _ in range(int(rest[2]))]
        results = [outcome(lambda: r.get(timeout=TIMEOUT)) for r in rs]
        print(json.dumps({"results": results, "ids": [r.id for r in rs],
                          "seconds": time.time() - started}), flush=True)
    elif command == "expires":
        r = app.send_task(rest[0], args=json.loads(rest[1]), queue=queue, countdown=2, expires=1)
        print(json.dumps(outcome(lambda: r.get(timeout=TIMEOUT))), flush=True)
    elif command == "revoked_first":
        task_id = "revoked-first-%d" % time.time_ns()
        app.control.revoke(task_id)
        r = app.send_task(rest[0], args=json.loads(rest[1]), queue=queue, task_id=task_id)
        print(json.dumps(outcome(lambda: r.get(timeout=TIMEOUT))), flush=True)
    elif command == "flood":
        name, args, n, reply_to = rest[0], json.loads(rest[1]), int(rest[2]), rest[3]
        ids = [flood_one(queue, name, args, reply_to) for _ in range(n)]
        print(json.dumps({"ids": ids}), flush=True)
    elif command == "garbage":
        with Connection(app.conf.broker_url) as conn:
            q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
            producer = Producer(conn.channel())
            def raw(body, headers=None, content_type="application/json"):
                producer.publish(body, exchange="", routing_key=queue, declare=[q], headers=headers or {},
                                 content_type=content_type, content_encoding="utf-8", serializer=None)
            raw(b"this is not json")
            raw(b'{"not": "a task"}')
            raw(b'[1, 2, 3]', headers={"task": "fibonacci", "id": "garbage-1"})
            raw(b'[[1], {}, {}]', headers={"task": 42, "id": "garbage-2"})
            raw(b'\x80\x04\x95', headers={"task": "fibonacci", "id": "garbage-3"}, content_type="application/x-python-serialize")
            raw(b'["' + b"x" * (8 * 1024 * 1024) + b'"', headers={"task": "fibonacci", "id": "garbage-4"})
            raw(b'[[10], {}, {}]', headers={"task": "fibonacci", "id": "garbage-5", "timelimit": [1e300, None]})
        print(json.dumps({"ok": 7}), flush=True)
    else:
        sys.exit("unknown command %s" % command)


if __name__ == "__main__":
    main()
