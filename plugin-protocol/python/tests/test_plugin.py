"""The Python SDK driven over a real pipe, as the worker drives it."""
import json
import os
import queue
import subprocess
import sys
import threading
import time
import unittest

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_plugin.py")


class Session:
    """The fixture plugin as a child process, and its messages as they come."""

    def __init__(self):
        self.child = subprocess.Popen([sys.executable, FIXTURE], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.messages = []
        self._lines = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self):
        for line in self.child.stdout:
            self._lines.put(json.loads(line))

    def _read_stderr(self):
        for line in self.child.stderr:
            self.stderr += line

    def send(self, **msg):
        msg["jsonrpc"] = "2.0"
        self.child.stdin.write((json.dumps(msg) + "\n").encode())
        self.child.stdin.flush()

    def until(self, pred, timeout=10):
        for m in self.messages:
            if pred(m):
                return m
        while True:
            m = self._lines.get(timeout=timeout)
            self.messages.append(m)
            if pred(m):
                return m

    def response(self, id_):
        return self.until(lambda m: m.get("id") == id_ and "method" not in m)

    def run(self, id_, task, args=(), kwargs=None, **extra):
        params = {"task_id": "task-%s" % id_, "task": task, "args": list(args),
                  "kwargs": kwargs or {}, "attempt": 1}
        params.update(extra)
        self.send(id=id_, method="task.run", params=params)

    def close(self):
        self.child.kill()
        self.child.wait()


class PluginTest(unittest.TestCase):
    def setUp(self):
        self.p = Session()
        self.addCleanup(self.p.close)
        self.p.send(id=0, method="initialize",
                    params={"settings": {"greeting": "hi"}, "limits": {"concurrency": 4}})
        self.init = self.p.response(0)

    def test_initialize_names_the_plugin_its_tasks_and_capabilities(self):
        result = self.init["result"]
        self.assertEqual(result["protocol_version"], "1.3")
        self.assertEqual(result["plugin"], {"name": "fixture", "version": "0.1.0"})
        self.assertEqual(result["tasks"][0], {"name": "t.add", "description": "Adds"})
        self.assertIn("ping_while_busy", result["capabilities"])

    def test_events_reach_the_handler_in_order_and_a_failing_one_is_logged_not_fatal(self):
        for n, extra in enumerate([{}, {"boom": True}, {}]):
            self.p.send(method="event", params=dict(
                {"event": "task.received", "time": 1.5, "dropped": n, "task_id": "t%d" % n},
                **extra))
        self.p.run(1, "t.events")
        seen = self.p.response(1)["result"]
        self.assertEqual([(e["task_id"], e["dropped"]) for e in seen], [("t0", 0), ("t2", 2)])
        self.assertEqual(seen[0]["event"], "task.received")
        deadline = time.monotonic() + 10
        while b"event handler failed on task.received" not in self.p.stderr:
            self.assertLess(time.monotonic(), deadline, self.p.stderr)
            time.sleep(0.01)

    def test_results_come_after_progress_and_stream_and_print_goes_to_stderr(self):
        self.p.run(1, "t.add", [2, 3])
        self.assertEqual(self.p.response(1)["result"], 5)
        self.p.run(2, "t.report", [3])
        done = self.p.response(2)
        self.assertEqual(done["result"], "hi")
        before = self.p.messages[:self.p.messages.index(done)]
        streamed = [m["params"]["items"][0] for m in before if m.get("method") == "task.stream"]
        self.assertEqual(streamed, [1, 2, 3])
        progress = [m["params"] for m in before if m.get("method") == "task.progress"]
        self.assertEqual(progress[2], {"task_id": "task-2", "done": 3, "total": 3,
                                       "message": "step 3"})
        # stderr is read by its own thread: wait for the line rather than race it.
        deadline = time.monotonic() + 10
        while b"this goes to stderr" not in self.p.stderr:
            self.assertLess(time.monotonic(), deadline, self.p.stderr)
            time.sleep(0.01)

    def test_kwargs_and_the_attempt_reach_the_handler(self):
        self.p.run(1, "t.kwargs", kwargs={"x": 1})
        self.assertEqual(self.p.response(1)["result"],
                         {"kwargs": {"x": 1}, "attempt": 1, "id": "task-1"})

    def test_errors_carry_type_message_module_and_traceback(self):
        self.p.run(1, "t.fail")
        err = self.p.response(1)["error"]
        self.assertEqual(err["code"], -32000)
        self.assertEqual(err["data"]["type"], "ValueError")
        self.assertEqual(err["data"]["message"], "too far")
        self.assertEqual(err["data"]["module"], "builtins")
        self.assertIn("fixture_plugin.py", err["data"]["traceback"])
        self.p.run(2, "t.typed")
        typed = self.p.response(2)["error"]["data"]
        self.assertEqual((typed["type"], typed["retryable"]), ("Busy", True))
        self.p.run(3, "no.such")
        self.assertEqual(self.p.response(3)["error"]["code"], -32003)
        self.p.run(4, "t.unserializable")
        self.assertEqual(self.p.response(4)["error"]["data"]["type"], "TypeError")
        self.p.send(id=5, method="no.such.method")
        self.assertEqual(self.p.response(5)["error"]["code"], -32601)
        self.p.child.stdin.write(b"not json\n")
        self.p.child.stdin.flush()
        parse = self.p.until(lambda m: m.get("error", {}).get("code") == -32700)
        self.assertIsNone(parse["id"])

    def test_a_cancel_wakes_a_waiting_task_which_ends_as_cancelled(self):
        self.p.run(1, "t.wait", [60])
        self.p.send(method="task.cancel", params={"task_id": "task-1", "reason": "test"})
        err = self.p.response(1)["error"]
        self.assertEqual((err["code"], err["data"]["type"]), (-32001, "Cancelled"))

    def test_a_cancel_reaches_a_busy_task_that_polls_check_cancelled(self):
        self.p.run(1, "t.spin", [])
        self.p.send(id=2, method="ping")
        self.assertEqual(self.p.response(2)["result"], {})
        self.p.send(method="task.cancel", params={"task_id": "task-1", "reason": "test"})
        err = self.p.response(1)["error"]
        self.assertEqual((err["code"], err["data"]["type"]), (-32001, "Cancelled"))

    def test_shutdown_answers_after_running_tasks_and_refuses_new_ones(self):
        self.p.run(1, "t.wait", [0.3])
        self.p.send(id=2, method="shutdown")
        self.p.run(3, "t.add", [1, 1])
        self.assertEqual(self.p.response(3)["error"]["code"], -32002)
        waited = self.p.response(1)
        shutdown = self.p.response(2)
        self.assertEqual(waited["result"], "waited")
        self.assertLess(self.p.messages.index(waited), self.p.messages.index(shutdown))
        self.p.send(method="exit")
        self.assertEqual(self.p.child.wait(timeout=10), 0)

    def test_ctx_queue_and_request_carry_where_the_task_came_from(self):
        self.p.run(1, "t.context",
                   delivery_info={"queue": "london.highpriority#custom", "exchange": "",
                                  "routing_key": "london.highpriority#custom"},
                   request={"retries": 2, "root_id": "r", "hostname": "worker@host"})
        seen = self.p.response(1)["result"]
        self.assertEqual(seen["queue"], "london.highpriority#custom")
        self.assertEqual(seen["request"]["retries"], 2)
        self.assertEqual(seen["request"]["root_id"], "r")
        self.assertEqual(seen["request"]["id"], "task-1")
        self.assertIsNone(seen["request"]["group"])
        # A 1.1 worker sends neither: defaults.
        self.p.run(2, "t.context")
        old = self.p.response(2)["result"]
        self.assertIsNone(old["queue"])
        self.assertEqual(old["request"]["retries"], 0)

    def test_the_current_queue_name_is_the_running_tasks(self):
        self.p.run(1, "t.queue", delivery_info={"queue": "london.highpriority#custom"})
        self.assertEqual(self.p.response(1)["result"], {
            "name": "london.highpriority#custom", "site": "london",
            "parsed": "london.highpriority#custom"})


if __name__ == "__main__":
    unittest.main()
