"""Fault-injection plugin for the integration tests: one small script, every failure mode.

It speaks the raw protocol (no SDK) so it can break it on purpose. Misbehaviour at start is
chosen by environment variables (set in the test's plugin.toml [env]); misbehaviour during a
task is chosen by the task name:

  FAULT_HANDSHAKE  ok (default) | exit (exit 3 before answering) | hang (never answer)
                   | version (answer protocol 2.0) | extra_task (serve an undeclared task)
  FAULT_SECOND_START  path: start normally if the path does not exist (creating it), else
                   exit 3 before answering `initialize` (passes an install-time handshake,
                   then fails in the daemon); FAULT_SECOND_START_MODE=hang: hang instead
  FAULT_PING       ok (default) | hang (never answer ping) | burn:<secs> (spend that much CPU
                   time, its own, before each answer)
  FAULT_TERM       ok (default) | ignore (ignore SIGTERM, shutdown and exit)
  FAULT_FORK       path: fork a grandchild that sleeps forever, write its pid to the path
  FAULT_GARBAGE    1: print non-protocol lines to stdout at start
  FAULT_EXIT_IF    path: exit 3 before answering `initialize` while the path exists
  FAULT_CAPS       comma-separated capabilities for the `initialize` reply (e.g. ping_while_busy)
  FAULT_NAME, FAULT_VERSION  the name and version the `initialize` reply gives (default: the
                   manifest's name from WORKER_PLUGIN_NAME, and 0.0.1)

Tasks: f.ok (returns args), f.pid (returns its pid), f.sleep [secs] (stops on cancel),
f.sleep_nocancel [secs], f.crash (SIGKILLs itself), f.crash_once [marker path] (SIGKILLs
itself unless the marker exists, creating it), f.exit [code] (exits), f.huge [bytes] (writes
one over-long line, then waits), f.garbage (a non-JSON stdout line, then returns "ok"), f.raise (ValueError),
f.progress (progress and stream, then returns "done"), f.string_id (answers with its request id
as a JSON string), f.bad_utf8 (answers a string holding invalid UTF-8), f.huge_then_answer (an
over-long line, then at once a valid answer that must not be accepted), f.block [secs] (blocks
the whole plugin: reads nothing, answers no ping, for that long), f.stderr_flood [bytes] (one
stderr line that long), f.garbage_flood [n] (n non-protocol stdout lines), f.request_flood [n]
(n requests to the worker while reading nothing), f.env (its environment, NoNewPrivs and
rlimits), f.spin (burns CPU until killed), f.escape / f.escape_clean (a setsid() grandchild
that outlives the plugin, returning its pid; _clean: with an empty environment), f.retry_until [n, max] / f.retry_bare [n, max] (ask for a retry in 1 s, with an exception or without, until the request's retries reach n; max_retries max, default 5), f.stderr_wait [lines] (as f.stderr, then a `log` record naming the task, then waits for its cancel), f.stderr [lines] (writes that many stderr
lines, then returns), f.where (returns its interpreter's prefix, its working directory and the
FAULT_TAG variable), f.note [..., path] (appends its args as a JSON line to the file `path`, a
canvas test's witness), f.note_sleep [secs, path] (appends {"pid", "task_id", "args"} as a JSON
line to `path`, then sleeps like f.sleep: one line per run of the task), f.wait_file [path]
(runs until the file `path` exists, the test's go-ahead, then returns "released").
"""

import json
import os
import signal
import sys
import threading
import time

OUT_LOCK = threading.Lock()
RUNNING = {}
RUNNING_LOCK = threading.Condition()
ENV = os.environ.get


def send(msg):
    msg["jsonrpc"] = "2.0"
    data = json.dumps(msg) + "\n"
    with OUT_LOCK:
        sys.stdout.write(data)
        sys.stdout.flush()


def raw(text):
    with OUT_LOCK:
        sys.stdout.write(text)
        sys.stdout.flush()


def reply(id_, result):
    send({"id": id_, "result": result})


def error(id_, code, typ, message):
    send({"id": id_, "error": {"code": code, "message": message,
                               "data": {"type": typ, "message": message, "module": "builtins"}}})


def run_task(id_, params):
    task_id, name, args = params["task_id"], params["task"], params.get("args") or []
    cancel = threading.Event()
    with RUNNING_LOCK:
        RUNNING[task_id] = cancel
    try:
        if name == "f.ok":
            reply(id_, args)
        elif name == "f.pid":
            reply(id_, os.getpid())
        elif name == "f.where":
            reply(id_, {"prefix": sys.prefix, "cwd": os.getcwd(), "tag": ENV("FAULT_TAG")})
        elif name == "f.sleep":
            if cancel.wait(args[0] if args else 3600):
                error(id_, -32001, "Cancelled", "cancelled")
            else:
                reply(id_, "slept")
        elif name == "f.sleep_nocancel":
            time.sleep(args[0] if args else 3600)
            reply(id_, "slept")
        elif name == "f.crash":
            sys.stderr.write("about to crash on purpose\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        elif name == "f.crash_once":
            if os.path.exists(args[0]):
                reply(id_, "survived")
            else:
                open(args[0], "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        elif name == "f.exit":
            os._exit(args[0] if args else 1)
        elif name == "f.huge":
            raw("x" * (args[0] if args else 2_000_000) + "\n")
            cancel.wait(3600)  # no answer: the worker must act on the violation alone
            reply(id_, "after huge")
        elif name == "f.string_id":
            send({"id": str(id_), "result": "stringly"})
        elif name == "f.bad_utf8":
            with OUT_LOCK:
                sys.stdout.buffer.write(b'{"jsonrpc":"2.0","id":%d,"result":"caf\xc3\x28"}\n' % id_)
                sys.stdout.flush()
        elif name == "f.huge_then_answer":
            raw("x" * (args[0] if args else 2_000_000) + "\n")
            reply(id_, "after huge")
        elif name == "f.stderr_flood":
            chunk = "x" * (1 << 20)
            left = args[0] if args else (1 << 20)
            while left > 0:
                sys.stderr.write(chunk[:left])
                left -= len(chunk)
            sys.stderr.write("\n")
            sys.stderr.flush()
            reply(id_, "flooded")
        elif name == "f.garbage_flood":
            for i in range(args[0] if args else 1):
                raw("stray line %d\n" % i)
            reply(id_, "flooded")
        elif name == "f.env":
            import resource
            status = open("/proc/self/status").read()
            nnp = [l.split()[1] for l in status.splitlines() if l.startswith("NoNewPrivs:")]
            caps = {l.split(":")[0]: l.split()[1] for l in status.splitlines() if l.startswith("Cap")}
            limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n.upper()))
                      for n in ("as", "nofile", "core", "cpu")}
            reply(id_, {"env": dict(os.environ), "no_new_privs": nnp[0] if nnp else None,
                        "limits": limits, "caps": caps, "uid": os.geteuid(),
                        "gid": os.getegid(), "groups": os.getgroups()})
        elif name == "f.write":
            # Its own installed code is read-only; its data directory is not, and persists.
            try:
                with open("written-into-my-code", "w") as f:
                    f.write("x")
                own = "written"
            except OSError as e:
                own = type(e).__name__
            data = os.environ.get("WORKER_PLUGIN_DATA")
            path = os.path.join(data, "note")
            before = open(path).read() if os.path.exists(path) else None
            with open(path, "w") as f:
                f.write(args[0])
            reply(id_, {"own_dir": own, "data": data, "before": before})
        elif name == "f.fs":
            # Each [op, path]: what the filesystem allows this process.
            results = []
            for op, path in args[0]:
                try:
                    if op == "read":
                        open(path).read(1)
                    elif op == "write":
                        with open(path, "w") as f:
                            f.write("x")
                    elif op == "list":
                        os.listdir(path)
                    results.append("ok")
                except OSError as e:
                    results.append(type(e).__name__)
            reply(id_, {"results": results, "tmp": os.environ.get("TMPDIR"),
                        "data": os.environ.get("WORKER_PLUGIN_DATA")})
        elif name in ("f.escape", "f.escape_clean"):
            # A grandchild that leaves the process group (setsid) and outlives the plugin;
            # it keeps the plugin's stdio, as a careless daemonizing library would. With
            # f.escape_clean it also clears its environment (the marker): only a cgroup holds it.
            clean = name == "f.escape_clean"
            r, w = os.pipe()
            child = os.fork()
            if child == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    if clean:
                        os.execve("/bin/sleep", ["sleep", "300"], {})
                    os.execv("/bin/sleep", ["sleep", "300"])
                os._exit(0)
            os.close(w)
            # The pipe is close-on-exec: EOF means the grandchild has exec'd (and, for
            # f.escape_clean, cleared its environment), so the test never sees it half-way.
            got = b""
            while True:
                chunk = os.read(r, 32)
                if not chunk:
                    break
                got += chunk
            pid = int(got)
            os.close(r)
            os.waitpid(child, 0)
            reply(id_, pid)
        elif name == "f.spin":
            while True:
                pass
        elif name == "f.garbage":
            raw("this is not json\n")
            reply(id_, "ok")
        elif name == "f.note":
            # Appends its args as a JSON line to the file its last argument names.
            with open(args[-1], "a") as f:
                f.write(json.dumps(args) + "\n")
            reply(id_, len(args))
        elif name == "f.note_sleep":
            # Notes each run (its pid and task id) before sleeping, so a test can count runs.
            seconds, path = args
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "task_id": task_id, "args": args}) + "\n")
                f.flush()
            if cancel.wait(seconds):
                error(id_, -32001, "Cancelled", "cancelled")
            else:
                reply(id_, "slept")
        elif name == "f.wait_file":
            # A long task the test ends when it is ready to: it creates the file.
            while not os.path.exists(args[0]):
                if cancel.wait(0.02):
                    error(id_, -32001, "Cancelled", "cancelled")
                    break
            else:
                reply(id_, "released")
        elif name == "f.raise":
            error(id_, -32000, "ValueError", "bad value: %r" % (args,))
        elif name == "f.progress":
            send({"method": "task.progress", "params": {"task_id": task_id, "done": 1, "total": 2, "message": "half"}})
            send({"method": "task.stream", "params": {"task_id": task_id, "items": ["a", "b"]}})
            send({"method": "task.stream", "params": {"task_id": task_id, "items": ["c"]}})
            reply(id_, "done")
        elif name == "f.stderr":
            for i in range(args[0] if args else 1):
                sys.stderr.write("stderr line %d\n" % i)
            sys.stderr.flush()
            reply(id_, "wrote")
        elif name in ("f.retry_until", "f.retry_bare"):
            # Asks for a retry (protocol 1.4) until Celery's retry count reaches args[0].
            retries = (params.get("request") or {}).get("retries", 0)
            if retries >= (args[0] if args else 1):
                reply(id_, {"retries": retries})
            else:
                data = {"countdown": 1, "max_retries": args[1] if len(args) > 1 else 5}
                if name == "f.retry_until":
                    data["exc"] = {"type": "ConnectionError", "message": "try again",
                                   "module": "builtins", "retryable": True}
                send({"id": id_, "error": {"code": -32004, "message": "retry", "data": data}})
        elif name == "f.stderr_wait":
            for i in range(args[0] if args else 1):
                sys.stderr.write("stderr line %d\n" % i)
            sys.stderr.flush()
            send({"method": "log", "params": {"level": "info", "message": "noted",
                                              "fields": {"task_id": task_id}}})
            cancel.wait(3600)
            error(id_, -32001, "Cancelled", "cancelled")
        else:
            send({"id": id_, "error": {"code": -32003, "message": "unknown task " + name}})
    finally:
        with RUNNING_LOCK:
            RUNNING.pop(task_id, None)
            RUNNING_LOCK.notify_all()


def declared_tasks():
    names = ["f.ok", "f.pid", "f.sleep", "f.sleep_nocancel", "f.crash", "f.crash_once", "f.exit",
             "f.huge", "f.garbage", "f.raise", "f.progress", "f.stderr", "f.stderr_wait", "f.retry_until", "f.retry_bare", "f.where",
             "f.string_id", "f.bad_utf8", "f.huge_then_answer", "f.block", "f.stderr_flood",
             "f.garbage_flood", "f.request_flood", "f.env", "f.spin", "f.escape", "f.escape_clean", "f.write", "f.fs", "f.note",
             "f.note_sleep", "f.wait_file"]
    if ENV("FAULT_HANDSHAKE") == "extra_task":
        names.append("f.undeclared")
    return [{"name": n} for n in names]


def main():
    if ENV("FAULT_TERM") == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ENV("FAULT_FORK"):
        pid = os.fork()
        if pid == 0:
            # The grandchild keeps no protocol pipes, like a daemonised helper would.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            while True:
                time.sleep(60)
        with open(ENV("FAULT_FORK"), "w") as f:
            f.write(str(pid))
    if ENV("FAULT_GARBAGE") == "1":
        raw("hello from a stray print\n")
        raw("[1, 2, 3]\n")
    for line in sys.stdin:
        msg = json.loads(line)
        method, id_, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
        if method == "initialize":
            mode = ENV("FAULT_HANDSHAKE", "ok")
            marker = ENV("FAULT_SECOND_START")
            if marker and os.path.exists(marker):
                if ENV("FAULT_SECOND_START_MODE") == "hang":
                    sys.stderr.write("hanging at a second start\n")
                    continue
                sys.stderr.write("refusing a second start\n")
                sys.exit(3)
            if marker:
                open(marker, "w").close()
            if ENV("FAULT_EXIT_IF") and os.path.exists(ENV("FAULT_EXIT_IF")):
                sys.stderr.write("refusing to start while %s exists\n" % ENV("FAULT_EXIT_IF"))
                sys.exit(3)
            if mode == "exit":
                sys.stderr.write("refusing to start\n")
                sys.exit(3)
            if mode == "hang":
                continue
            reply(id_, {
                "protocol_version": "2.0" if mode == "version" else "1.0",
                "plugin": {"name": ENV("FAULT_NAME", ENV("WORKER_PLUGIN_NAME", "faulty")),
                           "version": ENV("FAULT_VERSION", "0.0.1")},
                "tasks": declared_tasks(),
                "capabilities": [c for c in ENV("FAULT_CAPS", "").split(",") if c],
            })
        elif method == "task.run" and params.get("task") == "f.request_flood":
            # Requests to the worker, never reading its answers (stdin is not read meanwhile).
            for i in range((params.get("args") or [100000])[0]):
                raw('{"jsonrpc":"2.0","id":%d,"method":"worker.flood"}\n' % i)
            reply(id_, "flooded")
        elif method == "task.run" and params.get("task") == "f.block":
            # The simplest plugin in any language: one task at a time, nothing read meanwhile.
            args = params.get("args") or []
            time.sleep(args[0] if args else 3600)
            reply(id_, "unblocked")
        elif method == "task.run":
            threading.Thread(target=run_task, args=(id_, params), daemon=True).start()
        elif method == "task.cancel":
            with RUNNING_LOCK:
                event = RUNNING.get(params.get("task_id"))
            if event:
                event.set()
        elif method == "ping":
            mode = ENV("FAULT_PING") or "ok"
            if mode.startswith("burn:"):
                until = time.process_time() + float(mode[len("burn:"):])
                while time.process_time() < until:
                    pass
            if mode != "hang":
                reply(id_, {})
        elif method == "shutdown":
            if ENV("FAULT_TERM") == "ignore":
                continue

            def wait_and_reply(id_=id_):
                with RUNNING_LOCK:
                    while RUNNING:
                        RUNNING_LOCK.wait()
                reply(id_, None)

            threading.Thread(target=wait_and_reply, daemon=True).start()
        elif method == "exit":
            if ENV("FAULT_TERM") != "ignore":
                os._exit(0)
        elif id_ is not None and method is not None:
            send({"id": id_, "error": {"code": -32601, "message": "unknown method " + method}})
    # stdin closed: the worker is gone.
    if ENV("FAULT_TERM") == "ignore":
        while True:
            time.sleep(60)


if __name__ == "__main__":
    main()
