// Queue and result backends (protocol 1.5) in the Node.js SDK: fixtures/backend.js driven over
// its real stdin/stdout, the test acting as the worker.
'use strict';
const { test } = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const path = require('node:path');
const readline = require('node:readline');
const { offerOf } = require('../backends');

const BACKEND = path.join(__dirname, '..', 'fixtures', 'backend.js');
const TIMEOUT_MS = 10000;

// PROTOCOL.md's `result.store` example.
const RECORD = {
  task_id: 'jobs-42', task: 'fibonacci', state: 'SUCCESS', result: 121393, args: [26], kwargs: {},
  submitter: 'queue backend pg-queue', attempts: 1, started: 1764140000.25, finished: 1764140000.5,
};

/** The fixture backend as a child process, killed when `t` ends, and its messages as they come. */
function start(t, env = process.env) {
  const child = spawn(process.execPath, [BACKEND], { stdio: ['pipe', 'pipe', 'pipe'], env });
  t.after(() => child.kill());
  const messages = [];
  const waiters = new Set();
  let stderr = '';
  const wake = () => waiters.forEach((w) => w());
  child.stderr.on('data', (d) => {
    stderr += d;
    wake();
  });
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    messages.push(JSON.parse(line));
    wake();
  });
  const exited = new Promise((resolve) => child.on('exit', (code) => {
    resolve(code);
    wake();
  }));
  /** Waits until `check()` returns something; fails after TIMEOUT_MS naming `what`. */
  const until = (what, check) => new Promise((resolve, reject) => {
    const waiter = () => {
      const found = check();
      if (found === undefined || found === false) return;
      waiters.delete(waiter);
      clearTimeout(timer);
      resolve(found);
    };
    const timer = setTimeout(() => {
      waiters.delete(waiter);
      reject(new Error(`no ${what} within ${TIMEOUT_MS} ms; got ${JSON.stringify(messages)}\nstderr: ${stderr}`));
    }, TIMEOUT_MS);
    waiters.add(waiter);
    waiter();
  });
  const send = (msg) => child.stdin.write(`${JSON.stringify({ jsonrpc: '2.0', ...msg })}\n`);
  return {
    child, messages, send, until, exited,
    stderr: () => stderr,
    message: (what, pred) => until(what, () => messages.find(pred)),
    response: (id) => until(`response to ${id}`, () => messages.find((m) => m.id === id && !m.method)),
    waitForStderr: (text) => until(`"${text}" on stderr`, () => stderr.includes(text)),
  };
}

/** The backend, initialized (a queue backend with `window`, when given) and told `initialized`. */
async function backend(t, { window, settings = {}, concurrency = 4, env } = {}) {
  const p = start(t, env);
  const params = { protocol_version: '1.5', settings, limits: { concurrency } };
  if (window !== undefined) params.queue_backend = { window };
  p.send({ id: 0, method: 'initialize', params });
  const init = await p.response(0);
  p.send({ method: 'initialized', params: {} });
  return { p, init };
}

const isOffer = (m) => m.method === 'task.offer';
const offersIn = (messages) => messages.filter(isOffer);
const reportsIn = (messages, kind) => messages
  .filter((m) => m.method === 'log' && m.params.fields.seen === kind).map((m) => m.params.fields);

/** The first `task.offer` not in `taken` (request ids), now taken. */
async function nextOffer(p, taken) {
  const offer = await p.message('task.offer', (m) => isOffer(m) && !taken.has(m.id));
  taken.add(offer.id);
  return offer;
}

/** The fixture's first report of `kind` whose fields include `match`. */
function seen(p, kind, match = {}) {
  return p.until(`"${kind}" report`, () => reportsIn(p.messages, kind)
    .find((f) => Object.entries(match).every(([k, v]) => JSON.stringify(f[k]) === JSON.stringify(v))));
}

/** Answers `offer` as the worker does once its task succeeded; returns the outcome. */
function succeed(p, offer) {
  const [n] = offer.params.args;
  const outcome = { task_id: offer.params.task_id, state: 'SUCCESS', result: n + n };
  p.send({ id: offer.id, result: outcome });
  return outcome;
}

/** Pings and waits for the answer: what the plugin did before reading it is on the pipe. */
async function barrier(p, id) {
  p.send({ id, method: 'ping' });
  await p.response(id);
}

test('an offer gets a uuid4 task id by default and sends only what was given', () => {
  const { params } = offerOf({ task: 't.add', onOutcome() {} });
  assert.match(params.task_id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notStrictEqual(offerOf({ task: 't.add', onOutcome() {} }).params.task_id, params.task_id);
  delete params.task_id;
  assert.deepStrictEqual(params, { task: 't.add', args: [], kwargs: {} });
  const given = offerOf({
    task: 't.add', args: [1, 2], kwargs: { x: 1 }, taskId: 'jobs-1', softTimeLimit: 30,
    onOutcome() {}, onProgress() {}, onStream() {},
  });
  assert.deepStrictEqual(given.params, {
    task_id: 'jobs-1', task: 't.add', args: [1, 2], kwargs: { x: 1 },
    time_limit: { soft: 30 }, progress: true, stream: true,
  });
  assert.throws(() => offerOf({ task: 't.add', taskId: 'jobs-1' }), /onOutcome is required/);
  assert.throws(() => offerOf({ task: 't.add', task_id: 'x', onOutcome() {} }), /unknown member task_id/);
  assert.throws(() => offerOf(42), /yield offer objects/);
});

test('a backend alone declares no tasks, speaks 1.5, and its generator gets the window', async (t) => {
  const { p, init } = await backend(t, { window: 3 });
  assert.strictEqual(init.result.protocol_version, '1.5');
  assert.deepStrictEqual(init.result.tasks, []);
  assert.strictEqual((await seen(p, 'started')).window, 3);
});

test('the window keeps exactly `window` offers unanswered', async (t) => {
  const { p } = await backend(t, { window: 2 });
  const taken = new Set();
  const unanswered = [await nextOffer(p, taken), await nextOffer(p, taken)];
  assert.deepStrictEqual(unanswered.map((o) => o.params), [
    { task_id: 'job-1', task: 't.add', args: [1, 1], kwargs: {}, time_limit: { hard: 60 }, progress: true, stream: true },
    { task_id: 'job-2', task: 't.add', args: [2, 2], kwargs: {} },
  ]);
  // The generator runs on the event loop: by the time a ping is answered, it would have been
  // asked for a third job had the window room.
  await barrier(p, 50);
  assert.deepStrictEqual(reportsIn(p.messages, 'pulled').map((r) => r.n), [1, 2]);
  for (let answered = 1; answered <= 6; answered += 1) {
    const outcome = succeed(p, unanswered.shift());
    unanswered.push(await nextOffer(p, taken));
    assert.strictEqual(offersIn(p.messages).length, answered + 2);
    assert.deepStrictEqual((await seen(p, 'outcome', { task_id: outcome.task_id })).outcome, outcome);
  }
  assert.deepStrictEqual(unanswered.map((o) => o.params.task_id), ['job-7', 'job-8']);
  await barrier(p, 51);
  assert.strictEqual(offersIn(p.messages).length, 8);
});

test('a failure reaches onOutcome as the worker sent it', async (t) => {
  const { p } = await backend(t, { window: 1 });
  const offer = await nextOffer(p, new Set());
  const outcome = {
    task_id: 'job-1', state: 'FAILURE', error: {
      kind: 'raised', type: 'ValueError', module: 'builtins', message: 'n must be >= 0',
      traceback: 'Traceback (most recent call last): ...',
    },
  };
  p.send({ id: offer.id, result: outcome });
  assert.deepStrictEqual((await seen(p, 'outcome', { task_id: 'job-1' })).outcome, outcome);
});

test('an offer not taken is offered again a second later, before any new one', async (t) => {
  const { p } = await backend(t, { window: 1 });
  const taken = new Set();
  let offer = await nextOffer(p, taken);
  for (const code of [-32002, -32005]) {
    const refusedAt = Date.now();
    p.send({ id: offer.id, error: { code, message: 'not run; offer it again', data: { task_id: 'job-1', kind: 'test' } } });
    const again = await nextOffer(p, taken);
    assert.deepStrictEqual(again.params, offer.params);
    // A lower bound on the SDK's own delay: a slow machine only makes it longer.
    assert.ok(Date.now() - refusedAt >= 900, `${Date.now() - refusedAt} ms`);
    offer = again;
  }
  const outcome = succeed(p, offer);
  assert.deepStrictEqual((await seen(p, 'outcome', { task_id: 'job-1' })).outcome, outcome);
  assert.strictEqual((await nextOffer(p, taken)).params.task_id, 'job-2');
  // While job-1 waited it held no place, yet the generator was not asked for job-2: with
  // window 1, one offer waiting is as many as the SDK keeps out of the queue.
  const pulled2 = p.messages.findIndex((m) => reportsIn([m], 'pulled').some((r) => r.n === 2));
  assert.ok(pulled2 > p.messages.indexOf(offer));
  assert.deepStrictEqual(reportsIn(p.messages, 'release'), []);
});

test('an offer waiting to go again holds no window place', async (t) => {
  const { p } = await backend(t, { window: 2 });
  const taken = new Set();
  const first = await nextOffer(p, taken);
  await nextOffer(p, taken);
  const refusedAt = Date.now();
  p.send({ id: first.id, error: { code: -32002, message: 'the plugin serving t.add is restarting' } });
  // Job 3 goes at once; job 1 waits its second (and then for a place).
  const third = await nextOffer(p, taken);
  assert.strictEqual(third.params.task_id, 'job-3');
  assert.ok(Date.now() - refusedAt < 900, 'before job 1 was due');
});

test('an offer refused for good is released and dropped', async (t) => {
  const { p } = await backend(t, { window: 1 });
  const taken = new Set();
  const offer = await nextOffer(p, taken);
  p.send({ id: offer.id, error: { code: -32602, message: 'time_limit.hard must be > 0' } });
  assert.strictEqual((await seen(p, 'release', { task_id: 'job-1' })).reason, 'time_limit.hard must be > 0');
  assert.strictEqual((await nextOffer(p, taken)).params.task_id, 'job-2');
  await p.waitForStderr('refused the offer of task job-1 for good');
  assert.deepStrictEqual(offersIn(p.messages).map((o) => o.params.task_id), ['job-1', 'job-2']);
});

test('progress and stream reach the offer that asked for them', async (t) => {
  const { p } = await backend(t, { window: 2 });
  const taken = new Set();
  await nextOffer(p, taken);
  await nextOffer(p, taken);
  for (const [method, params] of [
    ['offer.progress', { task_id: 'job-1', done: 3, total: 10, message: 'fetched' }],
    ['offer.progress', { task_id: 'job-2', done: 1 }], // it did not ask
    ['offer.progress', { task_id: 'job-99', done: 1 }], // not outstanding
    ['offer.stream', { task_id: 'job-1', items: [{ row: 1 }] }],
    ['offer.progress', { task_id: 'job-1', done: 4 }],
  ]) p.send({ method, params });
  await barrier(p, 50);
  const got = [...reportsIn(p.messages, 'progress'), ...reportsIn(p.messages, 'stream')]
    .map((r) => [r.task_id, r.update, r.items]);
  assert.deepStrictEqual(got, [
    ['job-1', [3, 10, 'fetched'], undefined], ['job-1', [4, null, null], undefined],
    ['job-1', undefined, [{ row: 1 }]],
  ]);
});

test('a failing onOutcome is logged and the backend carries on', async (t) => {
  const { p } = await backend(t, { window: 1, settings: { fail_acks: true } });
  const taken = new Set();
  succeed(p, await nextOffer(p, taken));
  assert.strictEqual((await nextOffer(p, taken)).params.task_id, 'job-2');
  await p.waitForStderr('onOutcome of the offer of task job-1 failed: Error: ack of job-1 failed');
});

test('without queue_backend in initialize nothing is offered, and the log says why', async (t) => {
  const { p } = await backend(t);
  await p.waitForStderr('add `provides = ["queue_backend"]` to plugin.toml');
  await barrier(p, 50);
  assert.deepStrictEqual(offersIn(p.messages), []);
  assert.deepStrictEqual(reportsIn(p.messages, 'started'), []);
});

test('a generator yielding what is no offer ends the plugin, for the worker to restart it', async (t) => {
  const { p } = await backend(t, { window: 1, settings: { garbage: true } });
  assert.strictEqual(await p.exited, 1);
  assert.match(p.stderr(), /plugin\.offers generator failed.*yielded 42/);
});

test('shutdown answers once every offer is answered and its callback ran; stores go on', async (t) => {
  const { p } = await backend(t, { window: 2 });
  const taken = new Set();
  const first = await nextOffer(p, taken);
  const second = await nextOffer(p, taken);
  p.send({ id: 100, method: 'shutdown' });
  // Stores go on meanwhile: the worker stores an offered task's result before answering.
  p.send({ id: 101, method: 'result.store', params: { ...RECORD, task_id: 'job-1' } });
  assert.deepStrictEqual((await p.response(101)).result, {});
  await barrier(p, 102);
  assert.ok(!p.messages.some((m) => m.id === 100), 'two offers unanswered: no answer yet');
  const outcome = succeed(p, first);
  const stopping = 'not run: the worker is stopping; offer task job-2 again later';
  p.send({ id: second.id, error: { code: -32002, message: stopping } });
  const done = await p.response(100);
  assert.strictEqual(done.result, null);
  const before = p.messages.slice(0, p.messages.indexOf(done));
  assert.deepStrictEqual(reportsIn(before, 'outcome').map((r) => r.outcome), [outcome]);
  assert.deepStrictEqual(reportsIn(before, 'release').map((r) => [r.task_id, r.reason]), [['job-2', stopping]]);
  assert.deepStrictEqual(reportsIn(before, 'closed').map((r) => r.pulled), [2]);
  assert.strictEqual(offersIn(p.messages).length, 2);
  p.send({ method: 'exit' });
  assert.strictEqual(await p.exited, 0);
});

test('shutdown releases an offer waiting to be offered again', async (t) => {
  const { p } = await backend(t, { window: 1 });
  const offer = await nextOffer(p, new Set());
  // One write: the shutdown is read long before the refused offer's second is up.
  p.child.stdin.write(`{"jsonrpc":"2.0","id":${offer.id},"error":{"code":-32002,"message":"not run"}}\n`
    + '{"jsonrpc":"2.0","id":100,"method":"shutdown"}\n');
  const done = await p.response(100);
  const before = p.messages.slice(0, p.messages.indexOf(done));
  assert.deepStrictEqual(reportsIn(before, 'release').map((r) => [r.task_id, r.reason]), [['job-1', 'shutting down']]);
  assert.deepStrictEqual(reportsIn(before, 'closed').map((r) => r.pulled), [1]);
  assert.strictEqual(offersIn(p.messages).length, 1);
});

test('a stored result is answered with an empty object', async (t) => {
  const { p } = await backend(t);
  p.send({ id: 9, method: 'result.store', params: RECORD });
  const done = await p.response(9);
  assert.deepStrictEqual(done.result, {});
  const stored = p.messages.findIndex((m) => reportsIn([m], 'stored').length);
  assert.deepStrictEqual(p.messages[stored].params.fields.record, RECORD);
  assert.ok(stored < p.messages.indexOf(done));
});

test('a store that throws is answered with an error, so the worker retries', async (t) => {
  const { p } = await backend(t);
  p.send({ id: 9, method: 'result.store', params: { ...RECORD, task_id: 'fail-1' } });
  const { error } = await p.response(9);
  assert.strictEqual(error.code, -32000);
  assert.strictEqual(error.message, 'ConnectionError: database down');
  assert.strictEqual(error.data.type, 'ConnectionError');
  assert.deepStrictEqual(reportsIn(p.messages, 'stored'), []);
});

test('stores run concurrently', async (t) => {
  const { p } = await backend(t, { concurrency: 2 });
  for (const id of [1, 2]) { // each waits for the other
    p.send({ id, method: 'result.store', params: { ...RECORD, task_id: `jobs-${id}`, kwargs: { meet: true } } });
  }
  assert.deepStrictEqual([(await p.response(1)).result, (await p.response(2)).result], [{}, {}]);
});

test('no more stores run at once than the worker\'s concurrency', async (t) => {
  const { p } = await backend(t, { concurrency: 1 });
  p.send({ id: 1, method: 'result.store', params: { ...RECORD, task_id: 'jobs-1', kwargs: { hold: true } } });
  p.send({ id: 2, method: 'result.store', params: { ...RECORD, task_id: 'jobs-2' } });
  await barrier(p, 50);
  assert.deepStrictEqual(reportsIn(p.messages, 'stored'), [], 'jobs-2 waits for jobs-1');
  p.send({ method: 'event', params: { event: 'release', time: 1, dropped: 0 } });
  const [first, second] = [await p.response(1), await p.response(2)];
  assert.ok(p.messages.indexOf(first) < p.messages.indexOf(second));
  assert.deepStrictEqual(reportsIn(p.messages, 'stored').map((r) => r.record.task_id), ['jobs-1', 'jobs-2']);
});

test('without a store handler result.store is method not found', async (t) => {
  const { p } = await backend(t, { env: { ...process.env, FIXTURE_NO_STORE: '1' } });
  p.send({ id: 9, method: 'result.store', params: RECORD });
  assert.strictEqual((await p.response(9)).error.code, -32601);
});
