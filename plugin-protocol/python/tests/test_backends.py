"""Queue and result backends (protocol 1.5) in the Python SDK: the fixture backend driven over a
real pipe, the test acting as the worker."""
import os
import queue
import sys
import time
import unittest
import uuid

from test_plugin import Session

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from worker_plugin import Offer  # noqa: E402

BACKEND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_backend.py")

# PROTOCOL.md's `result.store` example.
RECORD = {"task_id": "jobs-42", "task": "fibonacci", "state": "SUCCESS", "result": 121393,
          "args": [26], "kwargs": {}, "submitter": "queue backend pg-queue", "attempts": 1,
          "started": 1764140000.25, "finished": 1764140000.5}


def backend(test, window=None, settings=None, env=None):
    """The fixture backend, initialized (a queue backend with `window` when one is given) and
    told `initialized`; stopped when `test` ends. Returns it and its initialize reply."""
    session = Session(env=env, script=BACKEND)
    test.addCleanup(session.close)
    params = {"protocol_version": "1.5", "settings": settings or {},
              "limits": {"concurrency": 4}}
    if window is not None:
        params["queue_backend"] = {"window": window}
    session.send(id=0, method="initialize", params=params)
    reply = session.response(0)
    session.send(method="initialized", params={})
    return session, reply


def is_offer(m):
    return m.get("method") == "task.offer"


def offers_in(messages):
    return [m for m in messages if is_offer(m)]


def next_offer(p, taken, timeout=10):
    """The first `task.offer` request not in `taken` (request ids), now taken."""
    offer = p.until(lambda m: is_offer(m) and m["id"] not in taken, timeout)
    taken.add(offer["id"])
    return offer


def seen(p, kind, **match):
    """The fields of the fixture's first report of `kind` whose fields include `match`."""
    return p.until(lambda m: m.get("method") == "log"
                   and m["params"]["fields"].get("seen") == kind
                   and all(m["params"]["fields"].get(k) == v for k, v in match.items())
                   )["params"]["fields"]


def reports(messages, kind):
    return [m["params"]["fields"] for m in messages
            if m.get("method") == "log" and m["params"]["fields"].get("seen") == kind]


def succeed(p, offer):
    """Answers `offer` as the worker does once its task succeeded; returns the outcome."""
    n = offer["params"]["args"][0]
    outcome = {"task_id": offer["params"]["task_id"], "state": "SUCCESS", "result": n + n}
    p.send(id=offer["id"], result=outcome)
    return outcome


class OfferTest(unittest.TestCase):
    """An Offer's `task.offer` params, built in this process."""

    def test_defaults_give_a_uuid4_task_id_and_only_the_required_members(self):
        params = Offer("t.add", on_outcome=print)._params()
        self.assertEqual(uuid.UUID(params.pop("task_id")).version, 4)
        self.assertEqual(params, {"task": "t.add", "args": [], "kwargs": {}})

    def test_limits_given_and_callbacks_given_are_sent(self):
        offer = Offer("t.add", args=(1, 2), kwargs={"x": 1}, task_id="jobs-1",
                      soft_time_limit=30, on_outcome=print, on_progress=print, on_stream=print)
        self.assertEqual(offer._params(), {
            "task_id": "jobs-1", "task": "t.add", "args": [1, 2], "kwargs": {"x": 1},
            "time_limit": {"soft": 30.0}, "progress": True, "stream": True})

    def test_on_outcome_is_required(self):
        with self.assertRaisesRegex(TypeError, "on_outcome is required"):
            Offer("t.add", task_id="jobs-1")


class QueueBackendTest(unittest.TestCase):
    def test_a_backend_alone_declares_no_tasks_and_its_generator_gets_the_window(self):
        p, init = backend(self, window=3)
        self.assertEqual(init["result"]["protocol_version"], "1.5")
        self.assertEqual(init["result"]["tasks"], [])
        self.assertEqual(seen(p, "started")["window"], 3)

    def test_the_window_keeps_exactly_window_offers_unanswered(self):
        p, _ = backend(self, window=2)
        taken = set()
        unanswered = [next_offer(p, taken), next_offer(p, taken)]
        self.assertEqual([o["params"] for o in unanswered], [
            {"task_id": "job-1", "task": "t.add", "args": [1, 1], "kwargs": {},
             "time_limit": {"hard": 60.0}, "progress": True, "stream": True},
            {"task_id": "job-2", "task": "t.add", "args": [2, 2], "kwargs": {}}])
        # The generator is not even asked for a third. (A bounded wait for what must not come:
        # it gives a bug time to show and cannot fail a correct SDK.)
        with self.assertRaises(queue.Empty):
            p.until(lambda m: (is_offer(m) and m["id"] not in taken)
                    or {"seen": "pulled", "n": 3}.items() <= m.get("params", {}).get(
                        "fields", {}).items(), timeout=0.5)
        answered = 0
        for _ in range(6):
            oldest = unanswered.pop(0)
            outcome = succeed(p, oldest)
            answered += 1
            unanswered.append(next_offer(p, taken))
            self.assertLessEqual(len(offers_in(p.messages)), answered + 2)
            self.assertEqual(seen(p, "outcome", task_id=outcome["task_id"])["outcome"], outcome)
        self.assertEqual([o["params"]["task_id"] for o in unanswered], ["job-7", "job-8"])
        with self.assertRaises(queue.Empty):
            p.until(lambda m: is_offer(m) and m["id"] not in taken, timeout=0.5)

    def test_a_failure_reaches_on_outcome_as_the_worker_sent_it(self):
        p, _ = backend(self, window=1)
        offer = next_offer(p, set())
        outcome = {"task_id": "job-1", "state": "FAILURE", "error": {
            "kind": "raised", "type": "ValueError", "module": "builtins",
            "message": "n must be >= 0", "traceback": "Traceback (most recent call last): ..."}}
        p.send(id=offer["id"], result=outcome)
        self.assertEqual(seen(p, "outcome", task_id="job-1")["outcome"], outcome)

    def test_an_offer_not_taken_is_offered_again_a_second_later(self):
        p, _ = backend(self, window=1)
        taken = set()
        offer = next_offer(p, taken)
        for code in (-32002, -32005):
            refused_at = time.monotonic()
            p.send(id=offer["id"], error={"code": code, "message": "not run; offer it again",
                                          "data": {"task_id": "job-1", "kind": "test"}})
            again = next_offer(p, taken)
            self.assertEqual(again["params"], offer["params"])
            # A lower bound on the SDK's own delay: a slow machine only makes it longer.
            self.assertGreaterEqual(time.monotonic() - refused_at, 0.9)
            offer = again
        outcome = succeed(p, offer)
        self.assertEqual(seen(p, "outcome", task_id="job-1")["outcome"], outcome)
        self.assertEqual(next_offer(p, taken)["params"]["task_id"], "job-2")
        # While job-1 waited it held no place, yet the generator was not asked for job-2: with
        # window 1, one offer waiting is as many as the SDK keeps out of the queue.
        pulled = [m["params"]["fields"]["n"] for m in p.messages[:p.messages.index(offer)]
                  if reports([m], "pulled")]
        self.assertEqual(pulled, [1])
        seen(p, "pulled", n=2)
        self.assertEqual(reports(p.messages, "release"), [])

    def test_an_offer_refused_for_good_is_released_and_dropped(self):
        p, _ = backend(self, window=1)
        taken = set()
        offer = next_offer(p, taken)
        p.send(id=offer["id"], error={"code": -32602, "message": "time_limit.hard must be > 0"})
        self.assertEqual(seen(p, "release", task_id="job-1")["reason"],
                         "time_limit.hard must be > 0")
        self.assertEqual(next_offer(p, taken)["params"]["task_id"], "job-2")
        p.wait_for_stderr(b"refused the offer of task job-1 for good")
        self.assertEqual([o["params"]["task_id"] for o in offers_in(p.messages)],
                         ["job-1", "job-2"])

    def test_progress_and_stream_reach_the_offer_that_asked_for_them(self):
        p, _ = backend(self, window=2)
        taken = set()
        next_offer(p, taken)
        next_offer(p, taken)
        for method, params in [
                ("offer.progress", {"task_id": "job-1", "done": 3, "total": 10,
                                    "message": "fetched"}),
                ("offer.progress", {"task_id": "job-2", "done": 1}),  # it did not ask
                ("offer.progress", {"task_id": "job-99", "done": 1}),  # not outstanding
                ("offer.stream", {"task_id": "job-1", "items": [{"row": 1}]}),
                ("offer.progress", {"task_id": "job-1", "done": 4})]:
            p.send(method=method, params=params)
        p.send(id=50, method="ping")
        self.assertEqual(p.response(50)["result"], {})
        self.assertEqual(seen(p, "progress", update=[4, None, None])["task_id"], "job-1")
        self.assertEqual([(r["task_id"], r.get("update"), r.get("items"))
                          for r in reports(p.messages, "progress") + reports(p.messages, "stream")],
                         [("job-1", [3, 10, "fetched"], None), ("job-1", [4, None, None], None),
                          ("job-1", None, [{"row": 1}])])

    def test_a_failing_on_outcome_is_logged_and_the_backend_carries_on(self):
        p, _ = backend(self, window=1, settings={"fail_acks": True})
        taken = set()
        succeed(p, next_offer(p, taken))
        self.assertEqual(next_offer(p, taken)["params"]["task_id"], "job-2")
        p.wait_for_stderr(b"on_outcome of the offer of task job-1 failed:\nTraceback")
        p.wait_for_stderr(b"RuntimeError: ack of job-1 failed")

    def test_without_queue_backend_in_initialize_nothing_is_offered_and_the_log_says_why(self):
        p, _ = backend(self)
        p.wait_for_stderr(b"add `provides = [\"queue_backend\"]` to plugin.toml")
        p.send(id=50, method="ping")
        p.response(50)
        self.assertEqual(offers_in(p.messages), [])


class ShutdownTest(unittest.TestCase):
    def test_shutdown_answers_once_every_offer_is_answered_and_its_callback_ran(self):
        p, _ = backend(self, window=2)
        taken = set()
        first, second = next_offer(p, taken), next_offer(p, taken)
        p.send(id=100, method="shutdown")
        # Stores go on meanwhile: the worker stores an offered task's result before answering.
        p.send(id=101, method="result.store", params=dict(RECORD, task_id="job-1"))
        self.assertEqual(p.response(101)["result"], {})
        outcome = succeed(p, first)
        stopping = "not run: the worker is stopping; offer task job-2 again later"
        p.send(id=second["id"], error={"code": -32002, "message": stopping})
        done = p.response(100)
        self.assertIsNone(done["result"])
        before = p.messages[:p.messages.index(done)]
        self.assertEqual([r["outcome"] for r in reports(before, "outcome")], [outcome])
        self.assertEqual([(r["task_id"], r["reason"]) for r in reports(before, "release")],
                         [("job-2", stopping)])
        self.assertEqual([r["pulled"] for r in reports(before, "closed")], [2])
        self.assertEqual(len(offers_in(p.messages)), 2)
        p.send(method="exit")
        self.assertEqual(p.child.wait(timeout=10), 0)

    def test_shutdown_releases_an_offer_waiting_to_be_offered_again(self):
        p, _ = backend(self, window=1)
        offer = next_offer(p, set())
        # One write: the shutdown is read long before the refused offer's second is up.
        p.child.stdin.write(
            b'{"jsonrpc":"2.0","id":%d,"error":{"code":-32002,"message":"not run"}}\n'
            b'{"jsonrpc":"2.0","id":100,"method":"shutdown"}\n' % offer["id"])
        p.child.stdin.flush()
        done = p.response(100)
        before = p.messages[:p.messages.index(done)]
        self.assertEqual([(r["task_id"], r["reason"]) for r in reports(before, "release")],
                         [("job-1", "shutting down")])
        self.assertEqual([r["pulled"] for r in reports(before, "closed")], [1])
        self.assertEqual(len(offers_in(p.messages)), 1)


class ResultBackendTest(unittest.TestCase):
    def test_a_stored_result_is_answered_with_an_empty_object(self):
        p, _ = backend(self)
        p.send(id=9, method="result.store", params=RECORD)
        done = p.response(9)
        self.assertEqual(done["result"], {})
        self.assertEqual(seen(p, "stored")["record"], RECORD)
        self.assertLess(p.messages.index(next(m for m in p.messages if reports([m], "stored"))),
                        p.messages.index(done))

    def test_a_store_that_raises_is_answered_with_an_error_so_the_worker_retries(self):
        p, _ = backend(self)
        p.send(id=9, method="result.store", params=dict(RECORD, task_id="fail-1"))
        error = p.response(9)["error"]
        self.assertEqual(error["code"], -32000)
        self.assertEqual(error["message"], "ConnectionError: database down")
        self.assertEqual(reports(p.messages, "stored"), [])

    def test_stores_run_concurrently(self):
        p, _ = backend(self)
        for id_ in (1, 2):  # each waits for the other
            p.send(id=id_, method="result.store",
                   params=dict(RECORD, task_id="jobs-%d" % id_, kwargs={"meet": True}))
        self.assertEqual([p.response(id_)["result"] for id_ in (1, 2)], [{}, {}])

    def test_without_a_store_handler_result_store_is_method_not_found(self):
        p, _ = backend(self, env=dict(os.environ, FIXTURE_NO_STORE="1"))
        p.send(id=9, method="result.store", params=RECORD)
        self.assertEqual(p.response(9)["error"]["code"], -32601)


if __name__ == "__main__":
    unittest.main()
