'use strict';
const { test } = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const path = require('node:path');
const readline = require('node:readline');
const { Context } = require('..');

const FIXTURE = [path.join(__dirname, '..', 'fixtures', 'plugin.js')];

/** A plugin (the fixture, unless `argv` says another) as a child process, and its messages as
 * they come. */
function start(argv = FIXTURE) {
  const child = spawn(process.execPath, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
  const messages = [];
  const waiters = [];
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    messages.push(JSON.parse(line));
    waiters.splice(0).forEach((w) => w());
  });
  const send = (msg) => child.stdin.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n');
  const until = async (pred) => {
    for (;;) {
      const found = messages.find(pred);
      if (found) return found;
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`timed out; got ${JSON.stringify(messages)}`)), 10000);
        waiters.push(() => { clearTimeout(timer); resolve(); });
      });
    }
  };
  const response = (id) => until((m) => m.id === id && !m.method);
  return { child, messages, send, response, until, stderr: () => stderr };
}

async function initialized(argv) {
  const p = start(argv);
  p.send({ id: 0, method: 'initialize', params: { settings: { greeting: 'hi' }, limits: { concurrency: 4 } } });
  const init = await p.response(0);
  return { p, init };
}

const run = (p, id, task, args = [], kwargs = {}) =>
  p.send({ id, method: 'task.run', params: { task_id: `task-${id}`, task, args, kwargs, attempt: 1 } });

test('initialize names the plugin, its tasks and capabilities', async () => {
  const { p, init } = await initialized();
  assert.strictEqual(init.result.protocol_version, '1.5');
  assert.deepStrictEqual(init.result.plugin, { name: 'fixture', version: '0.1.0' });
  assert.deepStrictEqual(init.result.tasks[0], { name: 't.add', description: 'Adds' });
  assert.ok(init.result.capabilities.includes('ping_while_busy'));
  p.child.kill();
});

test('events reach onEvent in order; a throwing or rejecting handler is logged, not fatal', async () => {
  const { p } = await initialized();
  [{}, { boom: true }, { reject: true }, {}].forEach((extra, n) => p.send({
    method: 'event', params: { event: 'task.received', time: 1.5, dropped: n, task_id: `t${n}`, ...extra },
  }));
  run(p, 1, 't.events');
  const seen = (await p.response(1)).result;
  assert.deepStrictEqual(seen.map((e) => [e.task_id, e.dropped]), [['t0', 0], ['t3', 3]]);
  for (;;) {
    if (p.stderr().includes('an async handler bug')) break;
    await new Promise((resolve) => { p.child.stderr.once('data', resolve); });
  }
  assert.match(p.stderr(), /event handler failed on task\.received: Error: a handler bug/);
  p.child.kill();
});

test('a task returns its result; progress and stream come first, console.log goes to stderr', async () => {
  const { p } = await initialized();
  run(p, 1, 't.add', [2, 3]);
  assert.strictEqual((await p.response(1)).result, 5);
  run(p, 2, 't.report', [3]);
  const done = await p.response(2);
  assert.strictEqual(done.result, 'hi');
  const before = p.messages.slice(0, p.messages.indexOf(done));
  const streamed = before.filter((m) => m.method === 'task.stream').map((m) => m.params.items[0]);
  assert.deepStrictEqual(streamed, [1, 2, 3]);
  const progress = before.filter((m) => m.method === 'task.progress').map((m) => m.params);
  assert.deepStrictEqual(progress[2], { task_id: 'task-2', done: 3, total: 3, message: 'step 3' });
  assert.ok(p.messages.every((m) => m.jsonrpc === '2.0'));
  p.send({ id: 3, method: 'ping' });
  await p.response(3);
  assert.match(p.stderr(), /this goes to stderr/);
  p.child.kill();
});

test('kwargs and the request facts reach the handler', async () => {
  const { p } = await initialized();
  run(p, 1, 't.kwargs', [], { x: 1 });
  assert.deepStrictEqual((await p.response(1)).result, { kwargs: { x: 1 }, attempt: 1, id: 'task-1' });
  p.child.kill();
});

test('errors carry their type and message; TaskError its type and retry hint', async () => {
  const { p } = await initialized();
  run(p, 1, 't.fail');
  const failed = (await p.response(1)).error;
  assert.strictEqual(failed.code, -32000);
  assert.strictEqual(failed.data.type, 'RangeError');
  assert.strictEqual(failed.data.message, 'too far');
  assert.strictEqual(failed.data.retryable, false);
  assert.match(failed.data.traceback, /plugin\.js/);
  run(p, 2, 't.typed');
  const typed = (await p.response(2)).error;
  assert.strictEqual(typed.data.type, 'Busy');
  assert.strictEqual(typed.data.retryable, true);
  run(p, 3, 'no.such');
  assert.strictEqual((await p.response(3)).error.code, -32003);
  run(p, 4, 't.bigint');
  assert.strictEqual((await p.response(4)).error.data.type, 'TypeError');
  p.send({ id: 5, method: 'no.such.method' });
  assert.strictEqual((await p.response(5)).error.code, -32601);
  p.child.stdin.write('not json\n');
  assert.strictEqual((await p.until((m) => m.error && m.error.code === -32700)).id, null);
  p.child.kill();
});

test('a cancel wakes a waiting task, which ends as cancelled', async () => {
  const { p } = await initialized();
  run(p, 1, 't.wait', [60]);
  p.send({ method: 'task.cancel', params: { task_id: 'task-1', reason: 'test' } });
  const cancelled = (await p.response(1)).error;
  assert.strictEqual(cancelled.code, -32001);
  assert.strictEqual(cancelled.data.type, 'Cancelled');
  p.child.kill();
});

test('shutdown answers once running tasks end, and refuses new ones meanwhile', async () => {
  const { p } = await initialized();
  run(p, 1, 't.wait', [0.3]);
  p.send({ id: 2, method: 'shutdown' });
  run(p, 3, 't.add', [1, 1]);
  assert.strictEqual((await p.response(3)).error.code, -32002);
  const waited = await p.response(1);
  const shutdown = await p.response(2);
  assert.strictEqual(waited.result, 'waited');
  assert.ok(p.messages.indexOf(waited) < p.messages.indexOf(shutdown));
  p.send({ method: 'exit' });
  const code = await new Promise((resolve) => p.child.on('exit', resolve));
  assert.strictEqual(code, 0);
});

test('ctx.queue and ctx.request carry where the task came from (1.2), with defaults before 1.2', async () => {
  const { p } = await initialized();
  p.send({
    id: 1,
    method: 'task.run',
    params: {
      task_id: 'c1', task: 't.context', args: [], kwargs: {},
      delivery_info: { queue: 'london.highpriority#custom', exchange: '', routing_key: 'london.highpriority#custom' },
      request: { retries: 2, root_id: 'r', parent_id: 'p', hostname: 'worker@host' },
    },
  });
  const seen = (await p.response(1)).result;
  assert.strictEqual(seen.queue, 'london.highpriority#custom');
  assert.strictEqual(seen.request.retries, 2);
  assert.strictEqual(seen.request.root_id, 'r');
  assert.strictEqual(seen.request.id, 'c1');
  assert.strictEqual(seen.request.group, null);
  assert.strictEqual(seen.request.delivery_info.exchange, '');
  run(p, 2, 't.context');
  const old = (await p.response(2)).result;
  assert.strictEqual(old.queue, null);
  assert.strictEqual(old.request.retries, 0);
  p.child.kill();
});

test('the current queue name is the running task\'s, across awaits', async () => {
  const { p } = await initialized();
  p.send({ id: 1, method: 'task.run', params: { task_id: 'q1', task: 't.queue', delivery_info: { queue: 'london.highpriority#custom' } } });
  assert.deepStrictEqual((await p.response(1)).result, {
    name: 'london.highpriority#custom', site: 'london', parsed: 'london.highpriority#custom',
  });
  p.child.kill();
});

test('ctx.request.headers and ctx.serializer (1.4), with defaults before 1.4', () => {
  const headers = { jobInfoSpec: { method: 'PUT' }, girder_client_token: 'abc', id: 'not-the-task' };
  const ctx = new Context({}, {
    task_id: 'h1', task: 't.context', delivery_info: { queue: 'q', serializer: 'jsonpickle' },
    request: { retries: 1, headers },
  });
  assert.strictEqual(ctx.serializer, 'jsonpickle');
  assert.strictEqual(ctx.request.headers, headers);
  assert.strictEqual(ctx.request.id, 'h1');
  assert.strictEqual(ctx.request.retries, 1);
  const json = new Context({}, { task_id: 'h2', delivery_info: { queue: 'q', serializer: 'json' } });
  assert.strictEqual(json.serializer, 'json');
  const old = new Context({}, { task_id: 'h3', delivery_info: { queue: 'q' }, request: { retries: 0 } });
  assert.strictEqual(old.serializer, 'json');
  assert.deepStrictEqual(old.request.headers, {});
  const local = new Context({}, { task_id: 'h4' });
  assert.strictEqual(local.serializer, 'json');
  assert.deepStrictEqual(local.request.headers, {});
});

test('headers reach the handler; a jsonpickle task\'s args arrive as JSON, tags intact', async () => {
  const { p } = await initialized();
  const headers = { jobInfoSpec: { method: 'PUT' }, girder_api_url: 'http://girder/api/v1' };
  p.send({
    id: 1, method: 'task.run',
    params: { task_id: 'h1', task: 't.context', args: [], kwargs: {}, request: { headers } },
  });
  const { request } = (await p.response(1)).result;
  assert.deepStrictEqual(request.headers, headers);
  const kwargs = {
    when: { 'py/object': 'datetime.date', __reduce__: [{ 'py/type': 'datetime.date' }, ['B+QBAg==']] },
    same: { 'py/id': 1 },
  };
  p.send({
    id: 2, method: 'task.run',
    params: {
      task_id: 'h2', task: 't.kwargs', args: [], kwargs, attempt: 1,
      delivery_info: { serializer: 'jsonpickle' },
    },
  });
  assert.deepStrictEqual((await p.response(2)).result.kwargs, kwargs);
  p.child.kill();
});

/**
 * A plugin whose tasks retry (1.4), run as `node -e` with this function's source, so it may use
 * nothing but the SDK it is given.
 */
function retryPlugin({ Plugin, Retry, TaskError }) {
  const plugin = new Plugin('retry-fixture', '0.1.0');
  plugin.task('t.add', (ctx, a, b) => a + b);
  // Asks to be run again with its kwargs as the options, as they came (JSON).
  plugin.task('t.retry', (ctx, options) => {
    throw ctx.retry(options);
  });
  plugin.task('t.retry_exc', async (ctx) => {
    await new Promise((resolve) => setTimeout(resolve, 1)); // thrown after an await
    ctx.retry({ exc: new RangeError('x'), countdown: 5, maxRetries: 2 });
  });
  plugin.task('t.retry_typed', (ctx) => {
    ctx.retry({ exc: new TaskError('try later', { type: 'Busy', retryable: true }), countdown: 0.5 });
  });
  plugin.task('t.retry_eta', (ctx) => {
    ctx.retry({ eta: new Date(Date.UTC(2030, 0, 2, 3, 4, 5, 600)), maxRetries: 0 });
  });
  plugin.task('t.retry_new', () => {
    throw new Retry({ countdown: 1 });
  });
  plugin.task('t.retry_changed', () => {
    const retry = new Retry({ countdown: 1 });
    retry.countdown = NaN; // spoiled after it was checked
    throw retry;
  });
  plugin.run();
}

const RETRY_PLUGIN = ['-e', `(${retryPlugin})(require(${JSON.stringify(path.join(__dirname, '..'))}))`];

test('ctx.retry answers -32004 with countdown, maxRetries and exc as a failure\'s data (1.4)', async (t) => {
  const { p } = await initialized(RETRY_PLUGIN);
  t.after(() => p.child.kill());
  run(p, 1, 't.retry_exc');
  const retry = (await p.response(1)).error;
  assert.strictEqual(retry.code, -32004);
  assert.strictEqual(retry.message, 'retry: RangeError: x');
  const { traceback, ...exc } = retry.data.exc;
  assert.deepStrictEqual({ ...retry.data, exc }, {
    countdown: 5, max_retries: 2, exc: { type: 'RangeError', message: 'x', retryable: false },
  });
  assert.match(traceback, /^RangeError: x\n\s+at .*\[eval\]/); // where it was made
  run(p, 2, 't.retry_typed');
  const typed = (await p.response(2)).error;
  assert.strictEqual(typed.message, 'retry: Busy: try later');
  assert.deepStrictEqual([typed.data.countdown, typed.data.exc.type, typed.data.exc.retryable], [0.5, 'Busy', true]);
});

test('a bare retry has empty data; a thrown Retry works too; an eta is sent as ISO 8601', async (t) => {
  const { p } = await initialized(RETRY_PLUGIN);
  t.after(() => p.child.kill());
  run(p, 1, 't.retry');
  assert.deepStrictEqual((await p.response(1)).error, { code: -32004, message: 'retry', data: {} });
  run(p, 2, 't.retry_new');
  assert.deepStrictEqual((await p.response(2)).error.data, { countdown: 1 });
  run(p, 3, 't.retry_eta');
  assert.deepStrictEqual((await p.response(3)).error.data, { eta: '2030-01-02T03:04:05.600Z', max_retries: 0 });
  const given = [
    ['2030-01-02T03:04:05+02:00', '2030-01-02T03:04:05+02:00'],
    ['2030-01-02 03:04:05.5Z', '2030-01-02T03:04:05.5+00:00'],
    ['2030-01-02T03:04:05-0130', '2030-01-02T03:04:05-01:30'],
    ['2030-01-02T03:04:05', '2030-01-02T03:04:05+00:00'],
  ];
  for (const [n, [eta, sent]] of given.entries()) {
    run(p, 10 + n, 't.retry', [], { eta, countdown: 0, maxRetries: null });
    const answer = (await p.response(10 + n)).error;
    assert.strictEqual(answer.code, -32004);
    assert.deepStrictEqual(answer.data, { countdown: 0, eta: sent });
  }
});

test('bad retry options fail the task naming the option, and the plugin goes on', async (t) => {
  const { p } = await initialized(RETRY_PLUGIN);
  t.after(() => p.child.kill());
  const bad = [
    [{ countdown: -1 }, 'RangeError', 'countdown must be a finite number'],
    [{ countdown: 'soon' }, 'TypeError', 'countdown must be a number'],
    [{ maxRetries: -1 }, 'RangeError', 'maxRetries must be >= 0'],
    [{ maxRetries: 2.5 }, 'TypeError', 'maxRetries must be an integer'],
    [{ eta: 'tomorrow' }, 'RangeError', 'eta must be an ISO 8601 time'],
    [{ eta: '2030-02-30T00:00:00Z' }, 'RangeError', 'eta must be an ISO 8601 time'],
    [{ eta: 5 }, 'TypeError', 'eta must be a Date or an ISO 8601 string'],
    [{ exc: 'boom' }, 'TypeError', 'exc must be an Error'],
    [{ max_retries: 2 }, 'TypeError', 'unknown option max_retries'],
  ];
  for (const [n, [options, type, says]] of bad.entries()) {
    run(p, n + 1, 't.retry', [], options);
    const failed = (await p.response(n + 1)).error;
    assert.strictEqual(failed.code, -32000, JSON.stringify(options));
    assert.strictEqual(failed.data.type, type, JSON.stringify(options));
    assert.ok(failed.data.message.includes(says), failed.data.message);
    assert.ok(failed.message.includes(says), failed.message);
  }
  run(p, 98, 't.retry_changed');
  const changed = (await p.response(98)).error;
  assert.deepStrictEqual([changed.code, changed.data.type], [-32000, 'RangeError']);
  assert.match(changed.data.message, /countdown must be a finite number/);
  run(p, 99, 't.add', [2, 3]);
  assert.strictEqual((await p.response(99)).result, 5);
});
