"""Hostile broker peers for `tests/amqp_hostile.rs` and `tests/amqp_revoke_storm.rs`: raw
messages no Celery client would send, published with py-amqp (kombu's transport) straight to a
queue, and the real Celery client with short timeouts. Every command prints one JSON line last.

    hostile.py call QUEUE NAME ARGS_JSON [TIMEOUT]      one task through the Celery client; its
                                                        outcome and the seconds it took
    hostile.py deep KEY KIND DEPTH BODY [TASK ID]        one message to the default exchange with
                                                        routing key KEY whose header "deep" nests
                                                        DEPTH levels of KIND (array or table); a
                                                        Celery v2 task's headers with TASK and ID
    hostile.py countdowns QUEUE NAME ARGS_JSON SECONDS N N tasks with countdown=SECONDS, not waited
    hostile.py quorum_countdowns QUEUE NAME ARGS_JSON SECONDS N SOON
                                                        the same on QUEUE declared quorum, then an
                                                        immediate task and one SOON seconds ahead:
                                                        their outcomes and the seconds each took
    hostile.py declare_quorum QUEUE                     declare QUEUE as a quorum queue
    hostile.py park_unroutable N                        N messages into celery_delayed_27, due in
                                                        1 s, for a queue that does not exist
    hostile.py link QUEUE NAME ARGS_JSON EXCHANGE [TIMEOUT]
                                                        a task whose link callback goes to EXCHANGE
                                                        (routing key "x"); its outcome and the
                                                        options Celery put in the callback
    hostile.py raw FILE                                 publish the messages the JSON file lists
                                                        (see `raw`), with publisher confirms
    hostile.py long_ids QUEUE NAME N SIZE [REPLY_TO]    N protocol-1 tasks whose id is SIZE bytes
    hostile.py declare QUEUE | delete QUEUE             declare (plain, durable) or delete a queue
    hostile.py long_chain QUEUE NAME STEPS SINK         one task whose embedded chain has STEPS
                                                        steps, each bound for queue SINK
    hostile.py revoke_long NODE N SIZE                  N `app.control.revoke([id])` of SIZE-byte
                                                        ids, addressed to NODE only
    hostile.py publish_tasks QUEUE TASKS_FILE           a Celery v2 task per [id, name, args] in the
                                                        file, no reply_to (nobody waits), as fast as
                                                        py-amqp goes
    hostile.py revoke_ids NODE IDS_FILE BATCH SECONDS   `app.control.revoke(batch)` over the file's
                                                        ids in batches of BATCH, addressed to NODE
                                                        only, terminate alternating False/True,
                                                        spread evenly over SECONDS

Broadcasts are addressed to the test's node (`destination=[NODE]`) so that hostile control
messages never reach another test's worker on the same broker.
"""

import json
import os
import sys
import threading
import time
import uuid

import amqp

from kombu import Exchange, Queue

from capp import app


def outcome(fn):
    try:
        return {"ok": fn()}
    except Exception as exc:  # the point is to report what the client raised
        return {"exc_type": type(exc).__name__, "exc_module": type(exc).__module__, "message": str(exc)}


def connection():
    """A plain py-amqp connection to the broker the tests use (guest on 127.0.0.1:5672)."""
    conn = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest", virtual_host="/")
    conn.connect()
    return conn


def v2_headers(name, task_id):
    return {
        "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
        "origin": "hostile@test", "ignore_result": False,
    }


def v2_body(args):
    return json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


def nested(kind, depth):
    """DEPTH levels of lists or dicts, built without recursion."""
    value = [] if kind == "array" else {}
    for _ in range(depth - 1):
        value = [value] if kind == "array" else {"d": value}
    return value


def deep(key, kind, depth, body, task=None, task_id=None):
    headers = v2_headers(task, task_id) if task else {}
    headers["deep"] = nested(kind, depth)
    # py-amqp writes tables recursively in Python: room for the recursion, and a large C stack
    # in case any level goes through C.
    sys.setrecursionlimit(depth * 4 + 10_000)
    threading.stack_size(512 << 20)
    done = {}

    def publish():
        try:
            conn = connection()
            ch = conn.channel()
            ch.confirm_select()
            msg = amqp.Message(body, content_type="application/json", content_encoding="utf-8",
                               application_headers=headers)
            ch.basic_publish(msg, exchange="", routing_key=key)
            conn.close()
            done["ok"] = True
        except Exception as exc:
            done["error"] = "%s: %s" % (type(exc).__name__, exc)

    t = threading.Thread(target=publish)
    t.start()
    t.join()
    return done


def raw(path):
    """Each entry: {"exchange": "", "routing_key": KEY, "body": TEXT, "headers": {...},
    "properties": {...}, "repeat": N}; published N times (1 by default)."""
    specs = json.load(open(path))
    conn = connection()
    ch = conn.channel()
    ch.confirm_select()
    n = 0
    for spec in specs:
        for _ in range(spec.get("repeat", 1)):
            props = dict(spec.get("properties") or {})
            props.setdefault("content_type", "application/json")
            props.setdefault("content_encoding", "utf-8")
            msg = amqp.Message(spec["body"], application_headers=spec.get("headers"), **props)
            ch.basic_publish(msg, exchange=spec.get("exchange", ""), routing_key=spec["routing_key"])
            n += 1
    conn.close()
    return {"ok": n}


def long_ids(queue, name, n, size, reply_to=None):
    conn = connection()
    ch = conn.channel()
    ch.confirm_select()
    props = {"reply_to": reply_to} if reply_to else {}
    for i in range(n):
        task_id = ("%d-" % i) + "i" * size
        body = json.dumps({"task": name, "id": task_id[:size], "args": [], "kwargs": {}, "retries": 0})
        ch.basic_publish(amqp.Message(body, content_type="application/json", content_encoding="utf-8", **props),
                         exchange="", routing_key=queue)
    conn.close()
    return {"ok": n}


def declare(queue, delete=False):
    conn = connection()
    ch = conn.channel()
    if delete:
        ch.queue_delete(queue)
    else:
        ch.queue_declare(queue, durable=True, auto_delete=False)
    conn.close()
    return {"ok": True}


def fanout(exchange, queue, delete=False):
    """A fanout exchange bound to QUEUE (what it delivers has an empty routing key), or its
    deletion."""
    conn = connection()
    ch = conn.channel()
    if delete:
        ch.exchange_delete(exchange)
    else:
        ch.exchange_declare(exchange, "fanout", durable=False, auto_delete=False)
        ch.queue_bind(queue, exchange, routing_key="")
    conn.close()
    return {"ok": True}


def long_chain(queue, name, steps, sink):
    step = {"task": name, "args": [], "kwargs": {}, "options": {"queue": sink},
            "subtask_type": None, "immutable": False}
    body = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": [step] * steps, "chord": None}])
    conn = connection()
    ch = conn.channel()
    ch.confirm_select()
    task_id = str(uuid.uuid4())
    ch.basic_publish(amqp.Message(body, content_type="application/json", content_encoding="utf-8",
                                  application_headers=v2_headers(name, task_id)),
                     exchange="", routing_key=queue)
    conn.close()
    return {"ok": len(body), "id": task_id}


def revoke_long(node, n, size):
    for i in range(n):
        app.control.revoke([("%d-" % i) + "r" * size], destination=[node])
    return {"ok": n}


def publish_tasks(queue, path):
    tasks = json.load(open(path))
    conn = connection()
    ch = conn.channel()
    started = time.time()
    for task_id, name, args in tasks:
        msg = amqp.Message(v2_body(args), content_type="application/json", content_encoding="utf-8",
                           application_headers=v2_headers(name, task_id), delivery_mode=2)
        ch.basic_publish(msg, exchange="", routing_key=queue)
    conn.close()
    return {"ok": len(tasks), "seconds": time.time() - started}


def revoke_ids(node, path, batch, seconds):
    ids = json.load(open(path))
    started = time.time()
    batches = (len(ids) + batch - 1) // batch
    for n, i in enumerate(range(0, len(ids), batch)):
        # Paced, so that revokes keep arriving for as long as the tasks do.
        ahead = started + seconds * n / batches - time.time()
        if ahead > 0:
            time.sleep(ahead)
        app.control.revoke(ids[i:i + batch], destination=[node], terminate=n % 2 == 1)
    return {"ok": len(ids), "batches": batches, "seconds": time.time() - started}


def main():
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "call":
        timeout = float(rest[3]) if len(rest) > 3 else 15
        started = time.time()
        r = app.send_task(rest[1], args=json.loads(rest[2]), queue=rest[0])
        out = outcome(lambda: r.get(timeout=timeout))
        out["seconds"] = time.time() - started
    elif command == "deep":
        out = deep(rest[0], rest[1], int(rest[2]), rest[3], *rest[4:6])
    elif command == "quorum_countdowns":
        # On a quorum queue as the client declared it (kombu Queue with x-queue-type), n tasks
        # `seconds` ahead, then one `soon` seconds ahead, whose run time is printed.
        queue, name, args, seconds, n, soon = (rest[0], rest[1], json.loads(rest[2]),
                                                float(rest[3]), int(rest[4]), float(rest[5]))
        q = Queue(queue, Exchange(queue), routing_key=queue, queue_arguments={"x-queue-type": "quorum"})
        ids = [app.send_task(name, args=args, queue=q, countdown=seconds).id for _ in range(n)]
        started = time.time()
        now = app.send_task(name, args=args, queue=q)
        out = outcome(lambda: now.get(timeout=15))
        immediate = {"outcome": out, "seconds": time.time() - started}
        started = time.time()
        r = app.send_task(name, args=args, queue=q, countdown=soon)
        out = outcome(lambda: r.get(timeout=soon + 15))
        out["seconds"] = time.time() - started
        out["ids"] = ids
        out["immediate"] = immediate
    elif command == "park_unroutable":
        # N messages into the delay topology, due in 1 s, for a queue that does not exist.
        conn = connection()
        ch = conn.channel()
        ch.confirm_select()
        key = ".".join(format(1, "028b")) + ".no-such-queue-" + uuid.uuid4().hex
        for _ in range(int(rest[0])):
            ch.basic_publish(amqp.Message("{}", delivery_mode=2), exchange="celery_delayed_27", routing_key=key)
        conn.close()
        out = {"ok": int(rest[0])}
    elif command == "declare_quorum":
        conn = connection()
        conn.channel().queue_declare(rest[0], durable=True, auto_delete=False,
                                     arguments={"x-queue-type": "quorum"})
        conn.close()
        out = {"ok": True}
    elif command == "countdowns":
        queue, name, args, seconds, n = rest[0], rest[1], json.loads(rest[2]), float(rest[3]), int(rest[4])
        out = {"ids": [app.send_task(name, args=args, queue=queue, countdown=seconds).id for _ in range(n)]}
    elif command == "link":
        queue, name, args, exchange = rest[0], rest[1], json.loads(rest[2]), rest[3]
        timeout = float(rest[4]) if len(rest) > 4 else 15
        callback = app.signature(name, args=[], exchange=exchange, routing_key="x")
        r = app.signature(name, args=args, queue=queue).apply_async(link=callback)
        out = outcome(lambda: r.get(timeout=timeout))
        out["callback_options"] = callback.options
    elif command == "raw":
        out = raw(rest[0])
    elif command == "long_ids":
        out = long_ids(rest[0], rest[1], int(rest[2]), int(rest[3]), *rest[4:5])
    elif command in ("declare", "delete"):
        out = declare(rest[0], delete=command == "delete")
    elif command in ("fanout", "fanout_delete"):
        out = fanout(rest[0], rest[1], delete=command == "fanout_delete")
    elif command == "long_chain":
        out = long_chain(rest[0], rest[1], int(rest[2]), rest[3])
    elif command == "revoke_long":
        out = revoke_long(rest[0], int(rest[1]), int(rest[2]))
    elif command == "publish_tasks":
        out = publish_tasks(rest[0], rest[1])
    elif command == "revoke_ids":
        out = revoke_ids(rest[0], rest[1], int(rest[2]), float(rest[3]))
    else:
        sys.exit("unknown command %s" % command)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
