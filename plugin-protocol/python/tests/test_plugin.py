"""The Python SDK driven over a real pipe, as the worker drives it."""
import array
import fcntl
import importlib.util
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unittest

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_plugin.py")


class Session:
    """A fixture plugin (`script`) as a child process, and its messages as they come."""

    def __init__(self, python=sys.executable, env=None, script=FIXTURE):
        self.child = subprocess.Popen([python, script], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.messages = []
        self._lines = queue.Queue()
        self.stderr = b""
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self):
        for line in self.child.stdout:
            self._lines.put(json.loads(line))

    def _read_stderr(self):
        for line in self.child.stderr:
            self.stderr += line

    def send(self, **msg):
        self.send_all(msg)

    def send_all(self, *msgs):
        """Writes `msgs` in one write: under 4 KiB, the plugin gets them in one read."""
        lines = [json.dumps(dict(msg, jsonrpc="2.0")) + "\n" for msg in msgs]
        self.child.stdin.write("".join(lines).encode())
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

    def wait_for_stderr(self, text, timeout=10):
        # stderr is read by its own thread: wait for the text rather than race it.
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if time.monotonic() > deadline:
                raise AssertionError("%r never reached stderr: %r" % (text, self.stderr))
            time.sleep(0.01)

    def close(self):
        self.child.kill()
        self.child.wait()
        for reader in self._readers:  # they end at the pipes' end of file
            reader.join(timeout=10)
        for pipe in (self.child.stdin, self.child.stdout, self.child.stderr):
            pipe.close()


def started(test, python=sys.executable, env=None, **limits):
    """The fixture, initialized, stopped when `test` ends; returns it and its initialize reply."""
    session = Session(python, env)
    test.addCleanup(session.close)
    session.send(id=0, method="initialize",
                 params={"settings": {"greeting": "hi"}, "limits": dict(concurrency=4, **limits)})
    return session, session.response(0)


def output_of(messages, task_id):
    """The (stream, level, message) of each output line of `task_id` among `messages`."""
    return [(m["params"]["fields"]["stream"], m["params"]["level"], m["params"]["message"])
            for m in messages if m.get("method") == "log"
            and m["params"]["fields"].get("task_id") == task_id
            and "stream" in m["params"]["fields"]]


# Args and kwargs of a jsonpickle body as the worker passes them on (tuples made arrays): a date
# and a Fraction, as jsonpickle 4 writes them.
JSONPICKLED_ARGS = [{"py/object": "datetime.date",
                     "__reduce__": [{"py/type": "datetime.date"}, ["B+QBAg=="]]}]
JSONPICKLED_KWARGS = {"ratio": {"py/reduce": [{"py/type": "fractions.Fraction"}, [3, 4]]}}


def as_json(value):
    """How t.decoded describes a value that arrived as plain JSON."""
    return [type(value).__module__ + "." + type(value).__qualname__, repr(value)]


class PluginTest(unittest.TestCase):
    def setUp(self):
        self.p, self.init = started(self)

    def test_initialize_names_the_plugin_its_tasks_and_capabilities(self):
        result = self.init["result"]
        self.assertEqual(result["protocol_version"], "1.5")
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

    def test_an_on_events_handler_gets_each_reads_events_in_one_call(self):
        p, _ = started(self, env=dict(os.environ, FIXTURE_EVENT_BATCHES="1"))

        def event(n, **extra):
            params = {"event": "task.received", "time": 1.5, "dropped": 0, "task_id": "t%d" % n}
            return dict(method="event", params=dict(params, **extra))

        def seen_once_handled(id_, want):
            # A task read with the events could run before they are handed over: ask again.
            deadline = time.monotonic() + 10
            while True:
                p.run(id_, "t.events")
                seen = p.response(id_)["result"]
                if seen == want or time.monotonic() > deadline:
                    return seen
                id_ += 1
                time.sleep(0.01)

        p.send_all(event(0), event(1), event(2))
        self.assertEqual(seen_once_handled(1, [["t0", "t1", "t2"]]), [["t0", "t1", "t2"]])
        p.send_all(event(3, boom=True), event(4))
        p.wait_for_stderr(b"event handler failed on task.received and 1 more")
        p.send_all(event(5))
        self.assertEqual(seen_once_handled(100, [["t0", "t1", "t2"], ["t5"]]),
                         [["t0", "t1", "t2"], ["t5"]])

    def test_results_come_after_progress_stream_and_what_the_task_printed(self):
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
        self.assertEqual(output_of(before, "task-2"), [("stdout", "info", "reporting")])

    def test_an_inline_task_runs_on_the_reader_thread_with_everything_a_task_has(self):
        self.p.run(1, "t.where")
        done = self.p.response(1)
        self.assertEqual(done["result"], threading.main_thread().name)
        before = self.p.messages[:self.p.messages.index(done)]
        self.assertEqual(output_of(before, "task-1"), [("stdout", "info", "inline says hi")])
        self.p.run(2, "t.where_pooled")
        self.assertTrue(self.p.response(2)["result"].startswith("task-"))
        self.p.run(3, "t.where", [True])
        err = self.p.response(3)["error"]
        self.assertEqual((err["code"], err["data"]["type"]), (-32000, "ValueError"))
        self.p.run(4, "t.add", [1, 1])  # the reader goes on after an inline failure
        self.assertEqual(self.p.response(4)["result"], 2)

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

    def test_answers_to_lines_read_together_leave_together_and_before_a_shutdowns(self):
        # Everything in one write, so one read of the plugin's takes it all: inline tasks,
        # a ping, a line that does not parse, then the shutdown, an inline task it refuses,
        # and a last inline answer that must still go out before the plugin exits.
        lines = [{"id": i, "method": "task.run", "params": {
            "task_id": "task-%d" % i, "task": "t.where", "args": [], "kwargs": {},
            "attempt": 1}} for i in range(1, 101)]
        lines.append({"id": 101, "method": "ping"})
        lines.append({"id": 102, "method": "shutdown"})
        lines.append({"id": 103, "method": "task.run", "params": {
            "task_id": "task-103", "task": "t.where", "args": [], "kwargs": {}, "attempt": 1}})
        text = "".join(json.dumps(dict(m, jsonrpc="2.0")) + "\n" for m in lines[:101])
        text += "not json\n"
        text += "".join(json.dumps(dict(m, jsonrpc="2.0")) + "\n" for m in lines[101:])
        self.p.child.stdin.write(text.encode())
        self.p.child.stdin.flush()
        answers = [self.p.response(i) for i in range(1, 104)]
        self.assertEqual([a["result"] for a in answers[:100]], ["MainThread"] * 100)
        self.assertEqual(answers[100]["result"], {})
        self.assertEqual(answers[102]["error"]["code"], -32002)
        order = [self.p.messages.index(a) for a in answers]
        self.assertEqual(order[:102], sorted(order[:102]), "answered in the order asked")
        parse_error = self.p.until(lambda m: m.get("error", {}).get("code") == -32700)
        self.assertLess(order[100], self.p.messages.index(parse_error))
        self.assertLess(self.p.messages.index(parse_error), order[101])
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

    def test_headers_reach_ctx_request_as_a_dict_and_as_attributes_never_over_a_fact(self):
        headers = {"jobInfoSpec": {"method": "PUT", "url": "http://girder/api/v1/job/1"},
                   "girder_client_token": "abc", "girder_result_hooks": [{"py/object": "x.Y"}],
                   "id": "not-the-task", "retries": 9, "headers": "not-the-dict",
                   "content-type": "text/plain", "__class__": "no"}
        self.p.run(1, "t.context", request={"retries": 1, "headers": headers})
        request = self.p.response(1)["result"]["request"]
        self.assertEqual(request["headers"], headers)
        self.assertEqual(request["jobInfoSpec"], headers["jobInfoSpec"])
        self.assertEqual(request["girder_client_token"], "abc")
        # Left as JSON, not decoded.
        self.assertEqual(request["girder_result_hooks"], [{"py/object": "x.Y"}])
        self.assertEqual((request["id"], request["retries"]), ("task-1", 1))
        self.assertNotIn("content-type", request)
        self.assertNotIn("__class__", request)
        # None at all (a 1.3 worker, or a message without any): an empty dict.
        self.p.run(2, "t.context", request={"retries": 0})
        self.assertEqual(self.p.response(2)["result"]["request"]["headers"], {})
        self.p.run(3, "t.context")
        self.assertEqual(self.p.response(3)["result"]["request"]["headers"], {})

    def test_a_json_task_gets_its_args_as_they_came_even_with_jsonpickle_tags(self):
        for id_, delivery_info in ((1, {}), (2, {"queue": "q", "serializer": "json"})):
            self.p.run(id_, "t.decoded", JSONPICKLED_ARGS, JSONPICKLED_KWARGS,
                       delivery_info=delivery_info)
            seen = self.p.response(id_)["result"]
            self.assertEqual(seen["serializer"], "json")
            self.assertEqual(seen["args"], [as_json(JSONPICKLED_ARGS[0])])
            self.assertEqual(seen["kwargs"], {"ratio": as_json(JSONPICKLED_KWARGS["ratio"])})

    def test_the_current_queue_name_is_the_running_tasks(self):
        self.p.run(1, "t.queue", delivery_info={"queue": "london.highpriority#custom"})
        self.assertEqual(self.p.response(1)["result"], {
            "name": "london.highpriority#custom", "site": "london",
            "parsed": "london.highpriority#custom"})


class RetryTest(unittest.TestCase):
    """ctx.retry(...) answers -32004 (protocol 1.4); bad arguments fail the task instead."""

    def setUp(self):
        self.p, _ = started(self)

    def retry_answer(self, id_, task, args=(), kwargs=None):
        self.p.run(id_, task, args, kwargs)
        err = self.p.response(id_)["error"]
        self.assertEqual(err["code"], -32004, err)
        return err

    def test_a_retry_with_exc_countdown_and_max_retries_carries_them_all(self):
        err = self.retry_answer(1, "t.retry_exc")
        self.assertEqual(err["message"], "retry: ValueError: x")
        traceback = err["data"]["exc"].pop("traceback")
        self.assertEqual(err["data"], {
            "countdown": 5, "max_retries": 2,
            "exc": {"type": "ValueError", "message": "x", "module": "builtins",
                    "retryable": False}})
        # The exception was never raised: the traceback is where ctx.retry was called.
        self.assertIn('ctx.retry(exc=ValueError("x")', traceback)
        self.assertTrue(traceback.endswith("ValueError: x\n"), traceback)

    def test_a_caught_exception_keeps_its_own_traceback(self):
        err = self.retry_answer(1, "t.retry_raised")
        self.assertEqual(err["message"], "retry: ConnectionError: upstream refused")
        exc = err["data"]["exc"]
        self.assertEqual((exc["type"], exc["module"]), ("ConnectionError", "builtins"))
        self.assertIn('raise ConnectionError("upstream refused")', exc["traceback"])
        self.assertNotIn("ctx.retry", exc["traceback"])

    def test_a_bare_retry_has_empty_data_and_what_the_task_printed_comes_first(self):
        err = self.retry_answer(1, "t.retry")
        self.assertEqual((err["message"], err["data"]), ("retry", {}))
        answer = self.p.response(1)
        before = self.p.messages[:self.p.messages.index(answer)]
        self.assertEqual(output_of(before, "task-1"), [("stdout", "info", "retrying")])

    def test_an_eta_becomes_an_iso_string_in_utc_and_a_string_one_is_written_in_full(self):
        for id_, aware in ((1, False), (2, True)):
            err = self.retry_answer(id_, "t.retry_eta", [aware])
            self.assertEqual(err["data"], {"eta": "2030-01-02T03:04:05.600000+00:00"})
        for id_, (given, sent) in enumerate([
                ("2030-01-02T03:04:05+02:00", "2030-01-02T03:04:05+02:00"),
                ("2030-01-02 03:04:05.5Z", "2030-01-02T03:04:05.5+00:00"),
                ("2030-01-02T03:04:05-0130", "2030-01-02T03:04:05-01:30"),
                ("2030-01-02T03:04:05", "2030-01-02T03:04:05+00:00")], start=3):
            err = self.retry_answer(id_, "t.retry", kwargs={"eta": given, "countdown": 0})
            self.assertEqual(err["data"], {"countdown": 0, "eta": sent})

    def test_bad_arguments_fail_the_task_naming_the_argument(self):
        for id_, (kwargs, type_, says) in enumerate([
                ({"countdown": -1}, "ValueError", "countdown must be a finite number"),
                ({"countdown": "soon"}, "TypeError", "countdown must be a number"),
                ({"countdown": True}, "TypeError", "countdown must be a number"),
                ({"countdown": 10 ** 400}, "ValueError", "countdown must be a finite number"),
                ({"max_retries": -1}, "ValueError", "max_retries must be >= 0"),
                ({"max_retries": 2.5}, "TypeError", "max_retries must be an int"),
                ({"eta": "tomorrow"}, "ValueError", "eta must be an ISO 8601 time"),
                ({"eta": "2030-02-30T00:00:00Z"}, "ValueError", "eta must be an ISO 8601 time"),
                ({"eta": 5}, "TypeError", "eta must be a datetime or an ISO 8601 string"),
                ({"exc": "boom"}, "TypeError", "exc must be an exception instance"),
                ({"throw": False}, "TypeError", "throw"),
        ], start=1):
            self.p.run(id_, "t.retry", kwargs=kwargs)
            err = self.p.response(id_)["error"]
            self.assertEqual(err["code"], -32000, kwargs)
            self.assertEqual(err["data"]["type"], type_, kwargs)
            self.assertIn(says, err["data"]["message"])
            self.assertIn(says, err["message"])
        self.p.run(99, "t.retry_changed")
        err = self.p.response(99)["error"]
        self.assertEqual((err["code"], err["data"]["type"]), (-32000, "ValueError"))
        self.assertIn("countdown must be a finite number", err["data"]["message"])
        self.p.run(100, "t.add", [2, 3])
        self.assertEqual(self.p.response(100)["result"], 5)


class TaskOutputTest(unittest.TestCase):
    """What a handler writes to sys.stdout and sys.stderr reaches the worker as its task's `log`
    notifications, before its answer."""

    def test_a_tasks_lines_come_as_its_log_before_its_answer_the_partial_one_last(self):
        p, _ = started(self)
        p.run(1, "t.print")
        done = p.response(1)
        self.assertEqual(done["result"], "printed")
        before = p.messages[:p.messages.index(done)]
        self.assertEqual(output_of(before, "task-1"), [
            ("stdout", "info", "one"), ("stderr", "info", "three"), ("stderr", "info", "two")])
        self.assertEqual(output_of(p.messages, "task-1"), output_of(before, "task-1"))
        line = next(m for m in before if m.get("method") == "log")
        self.assertEqual(line["params"], {"level": "info", "message": "one",
                                          "fields": {"task_id": "task-1", "stream": "stdout"}})

    def test_a_failing_task_sends_its_partial_line_before_its_error(self):
        p, _ = started(self)
        p.run(1, "t.write", [[["stdout", "a\nb\n\nhalf"], ["stderr", "err"]]], {"fail": True})
        done = p.response(1)
        self.assertEqual(done["error"]["data"]["type"], "ValueError")
        before = p.messages[:p.messages.index(done)]
        self.assertEqual(output_of(before, "task-1"), [
            ("stdout", "info", "a"), ("stdout", "info", "b"), ("stdout", "info", ""),
            ("stdout", "info", "half"), ("stderr", "info", "err")])

    def test_long_lines_go_in_pieces_and_one_too_big_for_a_line_is_cut(self):
        p, _ = started(self)
        p.run(1, "t.write", [[["stdout", "x" * 150000], ["stderr", "y" * 70000 + "\nz\n"]]])
        done = p.response(1)
        before = p.messages[:p.messages.index(done)]
        pieces = output_of(before, "task-1")
        self.assertEqual([(s, len(m)) for s, _, m in pieces], [
            ("stdout", 65536), ("stdout", 65536), ("stderr", 65536), ("stderr", 4464),
            ("stderr", 1), ("stdout", 150000 - 131072)])
        self.assertEqual("".join(m for s, _, m in pieces if s == "stdout"), "x" * 150000)

        small, _ = started(self, max_line_bytes=1000)
        small.run(1, "t.write", [[["stderr", "\u00e9" * 5000 + "\n"]]])
        small.response(1)
        (cut,) = [m for m in small.messages if m.get("method") == "log"]
        self.assertLessEqual(len(json.dumps(cut, separators=(",", ":"))), 1000)
        self.assertTrue(cut["params"]["message"].startswith("\u00e9" * 50))
        self.assertRegex(cut["params"]["message"], r"\.\.\. \[output line cut: \d+ of 5000 "
                                                   r"characters\]$")

    def test_concurrent_tasks_each_get_their_own_lines(self):
        p, _ = started(self)
        p.run(1, "t.chatter", ["left", 50])
        p.run(2, "t.chatter", ["right", 50])
        self.assertEqual(p.response(1)["result"], "left")
        self.assertEqual(p.response(2)["result"], "right")
        for task_id, tag in (("task-1", "left"), ("task-2", "right")):
            self.assertEqual(output_of(p.messages, task_id),
                             [("stdout", "info", "%s %d" % (tag, i)) for i in range(50)])

    def test_a_thread_the_task_started_prints_to_stderr(self):
        p, _ = started(self)
        p.run(1, "t.thread_print")
        self.assertEqual(p.response(1)["result"], "ok")
        p.wait_for_stderr(b"from a plugin thread\n")
        self.assertEqual([m for m in p.messages if m.get("method") == "log"], [])

    def test_capture_output_false_leaves_prints_on_stderr(self):
        p, _ = started(self, env=dict(os.environ, FIXTURE_CAPTURE_OUTPUT="0"))
        p.run(1, "t.print")
        self.assertEqual(p.response(1)["result"], "printed")
        # stderr is read by lines: a second task ends the one the first left open.
        p.run(2, "t.write", [[["stdout", "end\n"]]])
        self.assertEqual(p.response(2)["result"], "written")
        p.wait_for_stderr(b"one\nthree\ntwoend\n")
        self.assertEqual([m for m in p.messages if m.get("method") == "log"], [])


class JsonpickleAbsentTest(unittest.TestCase):
    def test_without_jsonpickle_a_jsonpickle_task_gets_the_json_as_it_came(self):
        p, _ = started(self, env=dict(os.environ, FIXTURE_HIDE_JSONPICKLE="1"))
        for id_ in (1, 2):
            p.run(id_, "t.decoded", JSONPICKLED_ARGS, JSONPICKLED_KWARGS,
                  delivery_info={"serializer": "jsonpickle"})
            seen = p.response(id_)["result"]
            self.assertEqual(seen["serializer"], "jsonpickle")
            self.assertEqual(seen["args"], [as_json(JSONPICKLED_ARGS[0])])
            self.assertEqual(seen["kwargs"], {"ratio": as_json(JSONPICKLED_KWARGS["ratio"])})
        p.wait_for_stderr(b"jsonpickle cannot be imported")
        self.assertEqual(p.stderr.count(b"jsonpickle cannot be imported"), 1)


_jsonpickle_python = None


def jsonpickle_python():
    """An interpreter that can import jsonpickle and why there is none: this one, else a venv
    made once for the run (ensurepip and `pip install jsonpickle`), else (None, the reason)."""
    global _jsonpickle_python
    if _jsonpickle_python is None:
        _jsonpickle_python = _find_jsonpickle_python()
    return _jsonpickle_python


def _find_jsonpickle_python():
    if importlib.util.find_spec("jsonpickle") is not None:
        return sys.executable, None
    root = tempfile.mkdtemp(prefix="worker-plugin-jsonpickle-")
    unittest.addModuleCleanup(shutil.rmtree, root, True)
    python = os.path.join(root, "venv", "bin", "python")
    for cmd in ([sys.executable, "-m", "venv", os.path.join(root, "venv")],
                [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--timeout", "20", "--retries", "1", "jsonpickle"]):
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, "no interpreter with jsonpickle: %s: %s" % (" ".join(cmd[1:4]), exc)
        if done.returncode != 0:
            why = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            return None, "no interpreter with jsonpickle: `%s` failed: %s" % (
                " ".join(cmd[1:4]), why)
    return python, None


# A Girder Worker client's body (args, kwargs, embed), encoded as `girder_io` does.
ENCODE_BODY = """
import datetime, fractions, warnings
warnings.simplefilter("ignore")  # jsonpickle 4 says `keys` will default to True in 5.0
import jsonpickle
shared = ["a"]
print(jsonpickle.encode(
    ((datetime.date(2020, 1, 2), shared),
     {"same": shared, "tags": {"x"}, "ratio": fractions.Fraction(3, 4), "pair": (1, 2)},
     {"callbacks": None, "errbacks": None, "chain": None, "chord": None})))
"""


def untupled(value):
    """`value` with jsonpickle's tuples made arrays, as the worker passes a jsonpickle body on."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("py/tuple"), list):
            return [untupled(v) for v in value["py/tuple"]]
        return {k: untupled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untupled(v) for v in value]
    return value


class JsonpickleTest(unittest.TestCase):
    """The fixture under an interpreter that has jsonpickle (a venv made for the run if need be)."""

    @classmethod
    def setUpClass(cls):
        cls.python, why = jsonpickle_python()
        if cls.python is None:
            raise unittest.SkipTest(why)

    def setUp(self):
        self.p, _ = started(self, self.python)

    def test_a_jsonpickle_task_gets_its_args_and_kwargs_decoded(self):
        body = subprocess.run([self.python, "-c", ENCODE_BODY], capture_output=True, check=True,
                              timeout=60).stdout
        args, kwargs, _embed = untupled(json.loads(body))
        self.p.run(1, "t.decoded", args, kwargs, delivery_info={"serializer": "jsonpickle"})
        seen = self.p.response(1)["result"]
        self.assertEqual(seen["serializer"], "jsonpickle")
        self.assertEqual(seen["args"], [["datetime.date", "datetime.date(2020, 1, 2)"],
                                        ["builtins.list", "['a']"]])
        self.assertEqual(seen["kwargs"], {
            "same": ["builtins.list", "['a']"],  # `py/id` finds the list args[1] is
            "tags": ["builtins.set", "{'x'}"],
            "ratio": ["fractions.Fraction", "Fraction(3, 4)"],
            "pair": ["builtins.list", "[1, 2]"],  # the worker made the tuple a list
        })
        self.assertEqual(seen["ctx_kwargs"], seen["kwargs"])
        # A JSON task next to it is left alone, tags and all.
        self.p.run(2, "t.decoded", JSONPICKLED_ARGS, JSONPICKLED_KWARGS)
        self.assertEqual(self.p.response(2)["result"]["args"], [as_json(JSONPICKLED_ARGS[0])])

    def test_args_jsonpickle_cannot_decode_fail_the_task_not_the_plugin(self):
        self.p.run(1, "t.decoded", [], {"bad": {"py/reduce": [{"py/type": "fractions.Fraction"},
                                                              ["not a number"]]}},
                   delivery_info={"serializer": "jsonpickle"})
        err = self.p.response(1)["error"]
        self.assertEqual(err["code"], -32000)
        self.assertEqual(err["data"]["type"], "JsonpickleDecodeError")
        self.assertIn("jsonpickle could not decode the task's args and kwargs: ValueError",
                      err["data"]["message"])
        self.assertFalse(err["data"]["retryable"])
        self.p.run(2, "t.add", [2, 3])
        self.assertEqual(self.p.response(2)["result"], 5)


class LinesReadTest(unittest.TestCase):
    """How the SDK cuts what it reads from stdin into lines (worker_plugin._lines_read)."""

    def test_each_read_gives_its_complete_lines_and_a_cut_line_is_finished_by_the_next(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import worker_plugin
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        lines = worker_plugin._lines_read(r)
        os.write(w, b'{"a":1}\n{"b"')
        self.assertEqual(next(lines), [b'{"a":1}'])
        os.write(w, b':2}\n\n{"c":')
        self.assertEqual(next(lines), [b'{"b":2}', b""])
        os.write(w, b"3")
        os.write(w, b"}")
        os.close(w)  # the end of the input finishes a line without its newline
        self.assertEqual(next(lines), [b'{"c":3}'])
        self.assertEqual(list(lines), [])


class LoadsTest(unittest.TestCase):
    """How the SDK parses a line (worker_plugin._loads): one whole value straight from json's
    scanner, anything else through json's decode, so every value and error is decode's."""

    def test_every_line_parses_or_fails_as_json_decode_has_it(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import worker_plugin

        def outcome(parse, line):
            try:
                return ("value", parse(line))
            except ValueError as exc:
                return ("error", type(exc).__name__, str(exc))

        lines = ['{"a":1}', ' {"a":1}', '{"a":1} ', '{"a":1}\r', '{"a":1}{"b":2}', "", "   ",
                 '{"a":', "nul", "[1,2]", '"x"', '{"a":"\\u00e9"}', "1 2", '{"a":1,"a":2}']
        for line in lines:
            self.assertEqual(outcome(worker_plugin._loads, line),
                             outcome(json.JSONDecoder().decode, line), repr(line))


class OutputBoundTest(unittest.TestCase):
    """What waits behind a write under way (worker_plugin.Plugin._write): a task thread waits
    once _PENDING_LIMIT bytes are queued; the reading thread never does."""

    def test_a_task_waits_behind_a_stuck_write_and_the_reading_thread_does_not(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import worker_plugin

        gate, written = threading.Event(), []

        class StuckStdout:
            def write(self, data):
                gate.wait(30)
                written.append(bytes(data))
                return len(data)

        plugin = worker_plugin.Plugin("bound", "1.0")
        plugin._out = StuckStdout()
        plugin._reader = threading.get_ident()  # this test's thread reads
        chunk = b"x" * (64 * 1024 - 1) + b"\n"
        per_limit = worker_plugin._PENDING_LIMIT // len(chunk)
        sent = threading.Semaphore(0)

        def task():
            for _ in range(3 * per_limit):
                plugin._write(chunk)
                sent.release()

        first = threading.Thread(target=plugin._write, args=(b"first\n",), daemon=True)
        first.start()  # the write under way, stuck
        deadline = time.monotonic() + 10
        while not plugin._writing and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertTrue(plugin._writing, "the first write is under way")
        streaming = threading.Thread(target=task, daemon=True)
        streaming.start()
        for _ in range(per_limit):
            self.assertTrue(sent.acquire(timeout=10), "queued up to the limit")
        self.assertFalse(sent.acquire(timeout=0.2), "the task waits for room")
        self.assertEqual(plugin._pending_bytes, per_limit * len(chunk))
        plugin._write(b"ping answer\n")  # the reading thread: in at once, full or not
        gate.set()
        streaming.join(30)
        first.join(30)
        self.assertFalse(streaming.is_alive())
        out = b"".join(written)
        self.assertEqual(out.count(chunk), 3 * per_limit)
        self.assertTrue(out.startswith(b"first\n"))
        self.assertIn(b"ping answer\n", out)
        self.assertEqual(plugin._pending_bytes, 0)

    def test_the_reading_thread_hands_what_a_full_pipe_cannot_take_to_a_flushing_thread(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import worker_plugin

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        plugin = worker_plugin.Plugin("full", "1.0")
        plugin._out = os.fdopen(write_end, "wb", buffering=0)
        self.addCleanup(plugin._out.close)
        os.set_blocking(write_end, False)  # as run() leaves a pipe
        plugin._room = select.poll()
        plugin._room.register(write_end, select.POLLOUT)
        plugin._reader = threading.get_ident()  # this test's thread reads

        plugin._write(b"room\n")
        self.assertFalse(plugin._writing, "written at once: no write left under way")
        self.assertEqual(os.read(read_end, 100), b"room\n")

        filled = 0
        try:
            while True:
                filled += os.write(write_end, b"f" * 4096)
        except BlockingIOError:
            pass
        started = time.monotonic()
        plugin._write(b"ping answer\n")  # no room at all: handed on
        plugin._write(b"second\n")  # queued behind it
        self.assertLess(time.monotonic() - started, 5, "the reading thread never waits")
        self.assertTrue(plugin._writing, "a flushing thread writes it")
        out = b""
        while not out.endswith(b"second\n"):
            out += os.read(read_end, 65536)
        self.assertEqual(out, b"f" * filled + b"ping answer\nsecond\n")
        deadline = time.monotonic() + 10
        while plugin._writing and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertFalse(plugin._writing, "the flushing thread ends when nothing is queued")


class FullStdoutTest(unittest.TestCase):
    """A worker that stops reading a plugin's stdout (it holds an event back for a slow
    submitter) never stops the plugin reading its stdin: a cancel still reaches its task.
    What is queued when it must exit is still written, unless nobody reads it for 5 s."""

    def full(self):
        """The fixture, serving, a task waiting for its cancel, and its stdout pipe full with
        nobody writing (a reply that filled it exactly). Returns the child, a way to send
        messages, and its stderr lines as they come."""
        child = subprocess.Popen([sys.executable, FIXTURE], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (child.kill(), child.wait(),
                                 [f.close() for f in (child.stdin, child.stdout, child.stderr)]))
        stderr = []
        threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True).start()

        def send(*msgs):
            child.stdin.write("".join(json.dumps(dict(m, jsonrpc="2.0")) + "\n"
                                      for m in msgs).encode())
            child.stdin.flush()

        def run(id_, task, args):
            return {"id": id_, "method": "task.run", "params": {
                "task_id": "task-%d" % id_, "task": task, "args": args, "kwargs": {},
                "attempt": 1}}

        send({"id": 0, "method": "initialize", "params": {"limits": {"concurrency": 2}}})
        self.assertEqual(json.loads(os.read(child.stdout.fileno(), 65536))["id"], 0)
        send({"method": "initialized", "params": {}}, run(1, "t.await_cancel", []))
        size = fcntl.fcntl(child.stdout.fileno(), F_GETPIPE_SZ)
        self.fill = size - len('{"jsonrpc":"2.0","id":2,"result":""}\n')
        send(run(2, "t.fill", [self.fill]))
        self.assertEqual(self.wait_for(child.stdout, lambda n: n >= size), size, "pipe full")
        # The reader answers a ping itself, into the full pipe.
        send({"id": 3, "method": "ping"})
        self.assertEqual(self.wait_for(child.stdin, lambda n: n == 0), 0, "ping read")
        return child, send, stderr

    @staticmethod
    def wait_for(pipe, done, timeout=10):
        """The bytes in `pipe` once `done` says so, or after `timeout`."""
        available = array.array("i", [0])
        deadline = time.monotonic() + timeout
        while True:
            fcntl.ioctl(pipe.fileno(), termios.FIONREAD, available)
            if done(available[0]) or time.monotonic() > deadline:
                return available[0]
            time.sleep(0.001)

    def replies(self, child):
        replies = {}
        for line in child.stdout:
            msg = json.loads(line)
            replies[msg["id"]] = msg
        return replies

    def test_a_cancel_is_read_while_the_pipe_to_the_worker_is_full(self):
        child, send, stderr = self.full()
        send({"method": "task.cancel", "params": {"task_id": "task-1", "reason": "test"}})
        deadline = time.monotonic() + 10
        while not any(b"saw its cancel" in line for line in stderr):
            if time.monotonic() > deadline:
                self.fail("the cancel was not read in 10 s while stdout was full: %r" % stderr)
            time.sleep(0.01)
        child.stdin.close()
        replies = self.replies(child)
        self.assertEqual(len(replies[2]["result"]), self.fill)
        self.assertEqual(replies[3]["result"], {})
        self.assertEqual(replies[1]["error"]["code"], -32001)
        self.assertEqual(child.wait(10), 0)

    def test_what_waits_for_stdout_at_the_end_of_stdin_is_written_before_exit(self):
        child, send, stderr = self.full()
        child.stdin.close()  # the end of stdin: the ping's answer still waits for room
        with self.assertRaises(subprocess.TimeoutExpired, msg="it waits for the worker to read"):
            child.wait(0.5)
        replies = self.replies(child)
        self.assertEqual(sorted(replies), [2, 3])
        self.assertEqual(replies[3]["result"], {})
        self.assertEqual(child.wait(10), 0)

    def test_a_worker_that_never_reads_again_does_not_keep_the_plugin_from_exiting(self):
        child, send, stderr = self.full()
        started = time.monotonic()
        send({"method": "exit"})
        self.assertEqual(child.wait(15), 0)
        self.assertGreater(time.monotonic() - started, 4, "it waited for the worker to read")


if __name__ == "__main__":
    unittest.main()
