"""File-action tasks (the Ngenea Hub contract) and queue names, in the Python SDK."""
import datetime
import os
import resource
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import worker_plugin as w  # noqa: E402


class FakeContext:
    """What StreamTaskResults needs of a running task, recording what it streams."""

    def __init__(self, kwargs, queue="london.highpriority#custom"):
        self.task = "my-plugin"
        self.task_id = "t-1"
        self.kwargs = kwargs
        self.queue = queue
        self.streamed = []

    def stream(self, *items):
        self.streamed.extend(items)


class FileActionStatusTest(unittest.TestCase):
    def test_the_payload_is_exactly_the_hub_contract(self):
        status = w.FileActionStatus("my-plugin", ["/mmfs1/data/f1", {"path": "/mmfs1/data/f2"}], 100)
        status.add("processed", "/mmfs1/data/f1")
        status.add("failures", {"path": "/mmfs1/data/f2"}, "Reason xyz for the failure")
        out = status.dump()
        started = out["status"].pop("started")
        self.assertIsNotNone(datetime.datetime.fromisoformat(started).tzinfo, "timezone-aware")
        self.assertEqual(out, {
            "jobid": 100,
            "paths": [{"path": "/mmfs1/data/f1"}],
            "status": {
                "task": "my-plugin",
                "input_paths": [{"path": "/mmfs1/data/f1"}, {"path": "/mmfs1/data/f2"}],
                "input_total": 2,
                "summary": {"failures": 1, "processed": 1, "skipped": 0},
                "details": {
                    "failures": [{"path": "/mmfs1/data/f2",
                                  "message": ["Reason xyz for the failure"]}],
                    "processed": [{"path": "/mmfs1/data/f1"}],
                    "skipped": [],
                },
            },
        })

    def test_paths_for_the_next_task_are_processed_and_skipped_and_other_states_show_up(self):
        status = w.FileActionStatus("t", [], 7)
        status.add("skipped", {"path": "/s", "size": 3})
        status.add("aborted", "/a", ["one", "two"])
        status.add("processed", "/p")
        status.add("inprogress", "/i")
        out = status.dump()
        self.assertEqual(out["paths"], [{"path": "/p"}, {"path": "/s"}])
        self.assertEqual(out["status"]["summary"],
                         {"failures": 0, "processed": 1, "skipped": 1, "aborted": 1, "inprogress": 1})
        self.assertEqual(out["status"]["details"]["skipped"], [{"path": "/s", "size": 3}])
        self.assertEqual(out["status"]["details"]["aborted"], [{"path": "/a", "message": ["one", "two"]}])

    def test_an_unknown_state_or_path_is_an_error(self):
        status = w.FileActionStatus("t", [])
        with self.assertRaisesRegex(ValueError, "unknown file state 'done'"):
            status.add("done", "/x")
        with self.assertRaises(TypeError):
            status.add("processed", 42)

    def test_from_context_reads_jobid_paths_and_queue(self):
        ctx = FakeContext({"jobid": 5, "paths": [{"path": "/x"}]})
        status = w.FileActionStatus.from_context(ctx)
        self.assertEqual((status.jobid, status.input_paths, status.queue, status.task),
                         (5, [{"path": "/x"}], "london.highpriority#custom", "my-plugin"))

    def test_streamed_results_come_in_batches_and_dump_flushes_the_rest(self):
        ctx = FakeContext({"jobid": 9, "paths": []})
        results = w.StreamTaskResults.from_context(ctx, batch_size=2, interval=3600)
        for i in range(5):
            results.add("processed", "/f%d" % i)
        self.assertEqual(len(ctx.streamed), 2, "two full batches so far")
        out = results.dump()
        self.assertEqual([len(b["files"]) for b in ctx.streamed], [2, 2, 1])
        self.assertEqual(ctx.streamed[0], {"jobid": 9, "task": "my-plugin", "files": [
            {"path": "/f0", "state": "processed"}, {"path": "/f1", "state": "processed"}]})
        self.assertEqual(out["status"]["summary"]["processed"], 5)

    def test_streamed_results_also_flush_after_the_interval(self):
        ctx = FakeContext({})
        results = w.StreamTaskResults.from_context(ctx, batch_size=1000, interval=0)
        results.add("skipped", "/a")
        self.assertEqual(len(ctx.streamed), 1)


class ExpandPathsTest(unittest.TestCase):
    def test_folders_expand_recursively_in_pages_without_following_symlinks(self):
        with tempfile.TemporaryDirectory() as root:
            os.makedirs(os.path.join(root, "a", "b"))
            for name in ("a/1", "a/b/2", "a/b/3", "top"):
                open(os.path.join(root, name), "w").close()
            os.symlink(root, os.path.join(root, "a", "loop"))  # a loop, listed as a file
            pages = list(w.expand_paths([{"path": root, "jobid": 1}], page_size=2))
            files = [p["path"] for page in pages for p in page]
            self.assertEqual(sorted(os.path.relpath(f, root) for f in files),
                             ["a/1", "a/b/2", "a/b/3", "a/loop", "top"])
            self.assertTrue(all(len(page) <= 2 for page in pages))
            self.assertTrue(all(p["jobid"] == 1 for page in pages for p in page))

    def test_a_tree_of_200000_files_is_paged_in_bounded_memory(self):
        # tmpfs when there is one: creating 200,000 files on this kind of disk takes minutes.
        fast = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        with tempfile.TemporaryDirectory(dir=fast) as root:
            for d in range(200):
                folder = os.path.join(root, "d%03d" % d)
                os.mkdir(folder)
                for f in range(1000):
                    os.close(os.open(os.path.join(folder, "f%04d" % f), os.O_CREAT | os.O_WRONLY))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            count = 0
            for page in w.expand_paths([root], page_size=1000):
                count += len(page)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            self.assertEqual(count, 200000)
            self.assertLess(grown, 20 * 1024, "peak RSS grew %d KiB" % grown)


class QueueNameTest(unittest.TestCase):
    def test_names_parse_and_round_trip(self):
        q = w.ParsedQueueName.parse("london.highpriority#custom")
        self.assertEqual((q.site, q.queue, q.function), ("london", "highpriority", "custom"))
        self.assertEqual(str(q), "london.highpriority#custom")
        for name in ("london.highpriority", "highpriority#custom", "celery"):
            self.assertEqual(str(w.ParsedQueueName.parse(name)), name)
        self.assertIsNone(w.ParsedQueueName.parse("celery").site)
        self.assertEqual(w.format_queue_name("paris", "low", "checksum"), "paris.low#checksum")

    def test_outside_a_task_there_is_no_current_queue(self):
        self.assertIsNone(w.current_task_queue_name())
        self.assertIsNone(w.current_site())
        self.assertIsNone(w.ParsedQueueName.current())


if __name__ == "__main__":
    unittest.main()
