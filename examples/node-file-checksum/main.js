'use strict';
/**
 * node-file-checksum: the file-action task of examples/file-checksum, on the Node.js SDK.
 *
 * `node.file.checksum` takes `jobid` and `paths` (files or folders) as kwargs and answers Ngenea
 * Hub's payload: each file's SHA-256 (`processed`, with `sha256` in its path object); a file
 * whose `<file>.sha256` sidecar already holds that digest is `skipped`; a file that cannot be
 * read is a `failures` entry with the reason. With `stream_results: true` the files also reach
 * the caller in batches (`task.stream`) as they are done.
 */
const crypto = require('node:crypto');
const fs = require('node:fs');
const { Plugin, FileActionStatus, StreamTaskResults, expandPaths } = require('worker-plugin');

const plugin = new Plugin('node-file-checksum', '1.0.0');

async function sha256Of(path) {
  const hash = crypto.createHash('sha256');
  for await (const chunk of fs.createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk);
  return hash.digest('hex');
}

function storedDigest(path) {
  try {
    return fs.readFileSync(`${path}.sha256`, 'utf8').split(/\s+/)[0] || null;
  } catch {
    return null;
  }
}

plugin.task('node.file.checksum', { description: 'SHA-256 of each file under paths (Ngenea Hub payload)' },
  async (ctx, kwargs = {}) => {
    const Kind = kwargs.stream_results ? StreamTaskResults : FileActionStatus;
    const status = Kind.fromContext(ctx, 'node-file-checksum');
    for (const page of expandPaths(kwargs.paths || [], Number(ctx.settings.page_size || 1000))) {
      for (const f of page) {
        ctx.checkCancelled();
        if (f.path.endsWith('.sha256')) continue;
        let digest;
        try {
          digest = await sha256Of(f.path);
        } catch (e) {
          status.add('failures', f, `${e.code || e.name}: ${e.message}`);
          continue;
        }
        status.add(storedDigest(f.path) === digest ? 'skipped' : 'processed', { ...f, sha256: digest });
      }
    }
    return status.dump();
  });

plugin.run();
