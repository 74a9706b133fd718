'use strict';
const { test } = require('node:test');
const assert = require('node:assert');
const { execFileSync } = require('node:child_process');
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

/** tmpfs when there is one: creating 200,000 files on this kind of disk takes minutes. */
const fastTmp = () => {
  try {
    fs.accessSync('/dev/shm', fs.constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
};

test('a tree of 200,000 files is paged with peak RSS growing under 20 MiB', () => {
  const root = fs.mkdtempSync(path.join(fastTmp(), 'expand-big-'));
  try {
    for (let d = 0; d < 200; d += 1) {
      const folder = path.join(root, `d${String(d).padStart(3, '0')}`);
      fs.mkdirSync(folder);
      for (let f = 0; f < 1000; f += 1) fs.closeSync(fs.openSync(path.join(folder, `f${String(f).padStart(4, '0')}`), 'w'));
    }
    // In a fresh process with a small heap: by default V8 lets garbage reach ~40 MiB before it
    // collects (a loop allocating 1000-object pages and dropping them grows 13 MiB), whatever
    // the SDK holds. With 1 MiB semispaces and an 8 MiB old space the RSS shows what is kept,
    // and an SDK that kept the pages would die of it (tried: a leaking loop aborts).
    const script = `
      const w = require(${JSON.stringify(path.join(__dirname, '..'))});
      const before = process.resourceUsage().maxRSS;
      let count = 0;
      for (const page of w.expandPaths([${JSON.stringify(root)}], 1000)) count += page.length;
      console.log(JSON.stringify({ count, grown: process.resourceUsage().maxRSS - before }));`;
    const out = execFileSync(process.execPath, ['--max-semi-space-size=1', '--max-old-space-size=8', '-e', script], { encoding: 'utf8' });
    const { count, grown } = JSON.parse(out);
    assert.strictEqual(count, 200000);
    assert.ok(grown < 20 * 1024, `peak RSS grew ${grown} KiB`);
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
