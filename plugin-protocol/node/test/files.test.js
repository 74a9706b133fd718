'use strict';
const { test } = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const w = require('..');

const fakeContext = (kwargs) => {
  const ctx = { task: 'my-plugin', taskId: 't-1', kwargs, queue: 'london.highpriority#custom', streamed: [] };
  ctx.stream = (...items) => ctx.streamed.push(...items);
  return ctx;
};

test('the payload is exactly the Hub contract', () => {
  const status = new w.FileActionStatus('my-plugin', ['/mmfs1/data/f1', { path: '/mmfs1/data/f2' }], 100);
  status.add('processed', '/mmfs1/data/f1');
  status.add('failures', { path: '/mmfs1/data/f2' }, 'Reason xyz for the failure');
  const out = status.dump();
  assert.match(out.status.started, /\+00:00$/);
  delete out.status.started;
  assert.deepStrictEqual(out, {
    jobid: 100,
    paths: [{ path: '/mmfs1/data/f1' }],
    status: {
      task: 'my-plugin',
      input_paths: [{ path: '/mmfs1/data/f1' }, { path: '/mmfs1/data/f2' }],
      input_total: 2,
      summary: { failures: 1, processed: 1, skipped: 0 },
      details: {
        failures: [{ path: '/mmfs1/data/f2', message: ['Reason xyz for the failure'] }],
        processed: [{ path: '/mmfs1/data/f1' }],
        skipped: [],
      },
    },
  });
});

test('next paths are processed and skipped; other states show up; unknown ones are errors', () => {
  const status = new w.FileActionStatus('t', [], 7);
  status.add('skipped', { path: '/s', size: 3 });
  status.add('aborted', '/a', ['one', 'two']);
  status.add('processed', '/p');
  const out = status.dump();
  assert.deepStrictEqual(out.paths, [{ path: '/p' }, { path: '/s' }]);
  assert.deepStrictEqual(out.status.summary, { failures: 0, processed: 1, skipped: 1, aborted: 1 });
  assert.deepStrictEqual(out.status.details.skipped, [{ path: '/s', size: 3 }]);
  assert.throws(() => status.add('done', '/x'), /unknown file state "done"/);
  assert.throws(() => status.add('processed', 42), TypeError);
});

test('from a context; streamed in batches, and dump flushes the rest', () => {
  const ctx = fakeContext({ jobid: 9, paths: [{ path: '/x' }] });
  const plain = w.FileActionStatus.fromContext(ctx);
  assert.deepStrictEqual([plain.jobid, plain.inputPaths, plain.queue, plain.task], [9, [{ path: '/x' }], 'london.highpriority#custom', 'my-plugin']);
  const results = w.StreamTaskResults.fromContext(ctx, undefined, { batchSize: 2, interval: 3600 });
  for (let i = 0; i < 5; i += 1) results.add('processed', `/f${i}`);
  assert.strictEqual(ctx.streamed.length, 2);
  const out = results.dump();
  assert.deepStrictEqual(ctx.streamed.map((b) => b.files.length), [2, 2, 1]);
  assert.deepStrictEqual(ctx.streamed[0], { jobid: 9, task: 'my-plugin', files: [{ path: '/f0', state: 'processed' }, { path: '/f1', state: 'processed' }] });
  assert.strictEqual(out.status.summary.processed, 5);
});

test('expandPaths pages a tree recursively without following symlinks', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'expand-'));
  try {
    fs.mkdirSync(path.join(root, 'a', 'b'), { recursive: true });
    for (const name of ['a/1', 'a/b/2', 'a/b/3', 'top']) fs.writeFileSync(path.join(root, name), '');
    fs.symlinkSync(root, path.join(root, 'a', 'loop'));
    const pages = [...w.expandPaths([{ path: root, jobid: 1 }], 2)];
    const files = pages.flat().map((p) => path.relative(root, p.path)).sort();
    assert.deepStrictEqual(files, ['a/1', 'a/b/2', 'a/b/3', 'a/loop', 'top']);
    assert.ok(pages.every((page) => page.length <= 2));
    assert.ok(pages.flat().every((p) => p.jobid === 1));
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test('queue names parse, format and round-trip; none outside a task', () => {
  const q = w.ParsedQueueName.parse('london.highpriority#custom');
  assert.deepStrictEqual([q.site, q.queue, q.function], ['london', 'highpriority', 'custom']);
  for (const name of ['london.highpriority#custom', 'london.highpriority', 'highpriority#custom', 'celery']) {
    assert.strictEqual(String(w.ParsedQueueName.parse(name)), name);
  }
  assert.strictEqual(w.formatQueueName('paris', 'low', 'checksum'), 'paris.low#checksum');
  assert.strictEqual(w.currentTaskQueueName(), null);
  assert.strictEqual(w.currentSite(), null);
  assert.strictEqual(w.ParsedQueueName.current(), null);
});
