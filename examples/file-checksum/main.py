"""file-checksum: a file-action task in the Ngenea Hub contract, on the Python SDK.

`file.checksum` takes `jobid` and `paths` (files or folders) as kwargs and answers the Hub's
payload: each file's SHA-256 is computed (`processed`, with `sha256` in its path object), a
file whose `<file>.sha256` sidecar already holds that digest is `skipped`, and a file that
cannot be read is a `failures` entry with the reason. With `stream_results=True` the files are
also streamed to the caller in batches as they are done.
"""
import hashlib

from worker_plugin import FileActionStatus, Plugin, StreamTaskResults, expand_paths

plugin = Plugin("file-checksum", "1.0.0")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stored_digest(path):
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


@plugin.task("file.checksum", description="SHA-256 of each file under paths (Ngenea Hub payload)")
def checksum(ctx, jobid=None, paths=(), stream_results=False, **fields):
    kind = StreamTaskResults if stream_results else FileActionStatus
    status = kind.from_context(ctx, task="file-checksum")
    for page in expand_paths(paths, page_size=int(ctx.settings.get("page_size", 1000))):
        for f in page:
            ctx.check_cancelled()
            if f["path"].endswith(".sha256"):
                continue
            try:
                digest = sha256_of(f["path"])
            except OSError as e:
                status.add("failures", f, "%s: %s" % (type(e).__name__, e.strerror or e))
                continue
            state = "skipped" if stored_digest(f["path"]) == digest else "processed"
            status.add(state, dict(f, sha256=digest))
    return status.dump()


if __name__ == "__main__":
    plugin.run()
