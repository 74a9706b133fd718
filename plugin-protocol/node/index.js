// Node.js SDK for `worker` plugins (protocol 1.5). No dependencies.
//
//   const { Plugin } = require('worker-plugin');
//   const plugin = new Plugin('my-plugin', '1.0.0');
//   plugin.task('my.add', { description: 'Adds two numbers' }, async (ctx, a, b) => {
//     ctx.progress(1, 1);
//     return a + b;
//   });
//   plugin.run();
//
// Handlers receive a Context first, then the task's args (kwargs are `ctx.kwargs`, and are
// also passed as a last argument when the task has any). A handler may be async; tasks run
// concurrently on the event loop. The SDK keeps stdout for the protocol: console.log and any
// process.stdout.write land on stderr (the worker's log) instead of corrupting it.
//
// A handler asks to be run again later with `ctx.retry({ exc, countdown, eta, maxRetries })`,
// as a Celery task calls `self.retry(...)`: it throws `Retry`, which the SDK answers with error
// -32004 (see `Retry`).
//
// A task whose Celery message was encoded by jsonpickle (Girder Worker's `girder_io`;
// `ctx.serializer === 'jsonpickle'`) gets its args and kwargs as the JSON they came as:
// jsonpickle's tags (`py/object`, `py/reduce`, `py/id`, ...) intact, tuples made arrays by the
// worker. This SDK decodes nothing (the Python SDK does, when jsonpickle is installed).
//
// Queue and result backends (1.5): `plugin.offers(async function* (window) { ... })` yields
// the tasks of the plugin's own queue as offers, `plugin.stores(async (record) => ...)` stores
// final states (see `offers` and `stores`, and backends.js).
'use strict';

const readline = require('readline');
const { types } = require('util');
const files = require('./files');
const { QueueBackend, ResultBackend } = require('./backends');

const PROTOCOL_VERSION = '1.5';
const PARSE_ERROR = -32700;
const METHOD_NOT_FOUND = -32601;
const INVALID_REQUEST = -32600;
const TASK_FAILED = -32000;
const TASK_CANCELLED = -32001;
const SHUTTING_DOWN = -32002;
const UNKNOWN_TASK = -32003;
const TASK_RETRY = -32004;

/** Throw (or let ctx.checkCancelled throw) to end a task that was asked to stop. */
class Cancelled extends Error {
  constructor(message = 'task cancelled') {
    super(message);
    this.name = 'Cancelled';
  }
}

/** An error with an explicit type name and retry hint, for callers that want them. */
class TaskError extends Error {
  constructor(message, { type, retryable = false } = {}) {
    super(message);
    this.name = type || 'TaskError';
    this.retryable = retryable;
  }
}

/**
 * Ends a task asking the worker to run it again later, like Celery's `Retry`; `ctx.retry(...)`
 * throws it. The SDK answers the task with error -32004 (PROTOCOL.md §4): `exc` (an Error, or
 * absent) is reported as a task error's data (type, message, traceback, retryable); `countdown`
 * (seconds, a finite number >= 0) or `eta` (a Date, or an ISO 8601 string; no offset means UTC)
 * says when, `countdown` winning when both are given, neither meaning 180 s; `maxRetries` (an
 * integer >= 0, default 3) is how many retries the task may have in all. The options are
 * checked here: a bad one throws TypeError or RangeError instead, which fails the task as any
 * error does.
 */
class Retry extends Error {
  constructor(options = {}) {
    super(retryMessage(retryOptions(options).exc));
    this.name = 'Retry';
    this.exc = options.exc;
    this.countdown = options.countdown;
    this.eta = options.eta;
    this.maxRetries = options.maxRetries;
  }

  /** The message and `data` of the task's -32004 answer. Checked again: the handler may have
   * changed the properties since. */
  _answer() {
    const { exc, countdown, eta, maxRetries } = retryOptions(this);
    const data = {};
    if (countdown !== undefined) data.countdown = countdown;
    if (eta !== undefined) data.eta = eta;
    if (maxRetries !== undefined) data.max_retries = maxRetries;
    if (exc !== undefined) data.exc = errorData(exc);
    return [retryMessage(exc), data];
  }
}

const RETRY_OPTIONS = ['exc', 'countdown', 'eta', 'maxRetries'];
/** An ISO 8601 time: date, time, fraction, offset sign, hours, minutes (no offset: UTC). */
const ISO_TIME = /^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2}):?(\d{2}))?$/;

/** The options of a retry, checked (null counts as absent): the `eta` as the RFC 3339 string
 * the worker reads. Throws TypeError or RangeError naming the option that is wrong. */
function retryOptions(options) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError(`ctx.retry: options must be an object, not ${describe(options)}`);
  }
  if (!(options instanceof Retry)) {
    const unknown = Object.keys(options).filter((key) => !RETRY_OPTIONS.includes(key));
    if (unknown.length) {
      throw new TypeError(`ctx.retry: unknown option ${unknown.join(', ')} (known: ${RETRY_OPTIONS.join(', ')})`);
    }
  }
  const given = (value) => (value === null ? undefined : value);
  const exc = given(options.exc);
  const countdown = given(options.countdown);
  const maxRetries = given(options.maxRetries);
  if (exc !== undefined && !(exc instanceof Error || types.isNativeError(exc))) {
    throw new TypeError(`ctx.retry: exc must be an Error, not ${describe(exc)}`);
  }
  if (countdown !== undefined) {
    if (typeof countdown !== 'number') {
      throw new TypeError(`ctx.retry: countdown must be a number of seconds, not ${describe(countdown)}`);
    }
    if (!Number.isFinite(countdown) || countdown < 0) {
      throw new RangeError(`ctx.retry: countdown must be a finite number of seconds >= 0, not ${countdown}`);
    }
  }
  if (maxRetries !== undefined) {
    if (typeof maxRetries !== 'number' || !Number.isInteger(maxRetries)) {
      throw new TypeError(`ctx.retry: maxRetries must be an integer, not ${describe(maxRetries)}`);
    }
    if (maxRetries < 0) throw new RangeError(`ctx.retry: maxRetries must be >= 0, not ${maxRetries}`);
  }
  return { exc, countdown, eta: isoTime(given(options.eta)), maxRetries };
}

/** `eta` as the RFC 3339 string the worker reads: a Date in UTC; a string checked, its offset
 * kept (none meaning UTC), written out in full (`T`, and `+hh:mm` for `Z`, `+hhmm` or none). */
function isoTime(eta) {
  if (eta === undefined) return undefined;
  if (eta instanceof Date) {
    if (Number.isNaN(eta.getTime())) throw new RangeError('ctx.retry: eta is an invalid Date');
    return eta.toISOString();
  }
  if (typeof eta !== 'string') {
    throw new TypeError(`ctx.retry: eta must be a Date or an ISO 8601 string, not ${describe(eta)}`);
  }
  const match = ISO_TIME.exec(eta);
  if (!match || !isRealTime(match)) {
    throw new RangeError(
      `ctx.retry: eta must be an ISO 8601 time such as 2030-01-02T03:04:05+00:00, not ${describe(eta)}`);
  }
  const [, date, clock, fraction = '', sign = '+', hours = '00', minutes = '00'] = match;
  return `${date}T${clock}${fraction}${sign}${hours}:${minutes}`;
}

/** Whether an ISO_TIME match names a time that exists: Date.UTC rolls 2030-02-30 over to
 * March, so a field that comes back changed was out of range. */
function isRealTime([, date, clock, , , hours = '0', minutes = '0']) {
  const [y, mo, d, h, mi, sec] = [...date.split('-'), ...clock.split(':')].map(Number);
  const back = new Date(Date.UTC(y, mo - 1, d, h, mi));
  return sec <= 59 && Number(hours) <= 23 && Number(minutes) <= 59
    && back.getUTCFullYear() === y && back.getUTCMonth() === mo - 1 && back.getUTCDate() === d
    && back.getUTCHours() === h && back.getUTCMinutes() === mi;
}

function describe(value) {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'bigint') return `${value}n`;
  return String(value);
}

function retryMessage(exc) {
  return exc === undefined ? 'retry' : `retry: ${errorMessage(exc)}`;
}

/** The message of a task error answer for `err`. */
function errorMessage(err) {
  return `${err.name}: ${err.message}`;
}

/** The `data` of a task error answer (PROTOCOL.md §4) for `err`: of a -32000 failure, and the
 * `exc` of a -32004 retry. */
function errorData(err) {
  return { type: err.name, message: err.message, traceback: err.stack, retryable: Boolean(err.retryable) };
}

/** What a running task can see and do besides returning. */
class Context {
  constructor(plugin, params) {
    this._plugin = plugin;
    this.taskId = params.task_id;
    this.task = params.task;
    this.attempt = params.attempt || 1;
    this.kwargs = params.kwargs || {};
    /** `queue`, `exchange`, `routing_key` (all null for a task from the control socket). */
    this.deliveryInfo = { queue: null, exchange: null, routing_key: null, ...(params.delivery_info || {}) };
    const request = params.request || {};
    const headers = request.headers && typeof request.headers === 'object' && !Array.isArray(request.headers)
      ? request.headers : {};
    /** Celery's request facts: `id`, `retries`, `eta`, `expires`, `parent_id`, `root_id`,
     * `group`, `hostname` (the worker's node name), `delivery_info`, and `headers`: the
     * message's application headers (e.g. Girder's `jobInfoSpec`; `{}` when none), as JSON. */
    this.request = {
      retries: 0, eta: null, expires: null, parent_id: null, root_id: null, group: null, hostname: null,
      ...request,
      id: params.task_id,
      delivery_info: this.deliveryInfo,
      headers,
    };
    this._cancelled = false;
    this._wakers = new Set();
  }

  /** The queue the task was consumed from; null when it came from the control socket. */
  get queue() {
    return this.deliveryInfo.queue;
  }

  /** How the task's Celery message body was encoded: 'json', or 'jsonpickle' (Girder Worker's
   * `girder_io`), whose args arrive with jsonpickle's tags intact: this SDK decodes nothing. */
  get serializer() {
    return this.deliveryInfo.serializer || 'json';
  }

  /** The [settings] table of the plugin's manifest. */
  get settings() {
    return this._plugin.settings;
  }

  /** True once the worker asked this task to stop (cancel or soft time limit). */
  get cancelled() {
    return this._cancelled;
  }

  checkCancelled() {
    if (this._cancelled) throw new Cancelled();
  }

  /** Waits up to `seconds`, rejecting with Cancelled as soon as the task is cancelled. */
  wait(seconds) {
    this.checkCancelled();
    return new Promise((resolve, reject) => {
      const wake = () => {
        clearTimeout(timer);
        reject(new Cancelled());
      };
      const timer = setTimeout(() => {
        this._wakers.delete(wake);
        resolve();
      }, seconds * 1000);
      this._wakers.add(wake);
    });
  }

  progress(done, total, message) {
    const params = { task_id: this.taskId, done: Math.trunc(done) };
    if (total !== undefined && total !== null) params.total = Math.trunc(total);
    if (message !== undefined && message !== null) params.message = String(message);
    this._plugin._send({ method: 'task.progress', params });
  }

  /** Sends partial results; the caller gets them in order, before the final result. */
  stream(...items) {
    this._plugin._send({ method: 'task.stream', params: { task_id: this.taskId, items } });
  }

  log(message, level = 'info', fields = {}) {
    const params = { level, message: String(message), fields: { ...fields, task_id: this.taskId } };
    this._plugin._send({ method: 'log', params });
  }

  /**
   * Ends the task asking the worker to run it again later, as Celery's `self.retry(...)` does:
   * throws Retry (see it for the options), so `throw ctx.retry(...)` works too. A Celery task
   * below its `maxRetries` is published again (same id, `retries` + 1); past it, or from the
   * control socket, the task fails with `exc`.
   */
  retry(options = {}) {
    throw new Retry(options);
  }

  _cancel() {
    this._cancelled = true;
    for (const wake of this._wakers) wake();
    this._wakers.clear();
  }
}

class Plugin {
  constructor(name, version) {
    this.name = name;
    this.version = version;
    this.settings = {};
    this._tasks = new Map();
    this._running = new Map();
    this._initialized = false;
    this._shuttingDown = null;
    this._write = null;
    this._onEvent = null;
    this._offersFn = null;
    this._offers = null; // the QueueBackend, once initialize made this plugin one
    this._storeFn = null;
    this._stores = null; // the ResultBackend, once initialized
  }

  /**
   * Makes the plugin a queue backend (protocol 1.5, `provides = ["queue_backend"]` in
   * plugin.toml): `fn(window)`, an async (or plain) generator function, is called once after
   * the worker's `initialized`, when its `initialize` carried a `queue_backend` window. It
   * yields offers, `{ task, args, kwargs, taskId, softTimeLimit, hardTimeLimit, onOutcome,
   * onProgress, onStream, onRelease }` (`onOutcome` required), or null when nothing is ready
   * (after waiting a little: the SDK asks again at once). The SDK asks for the next one only
   * while fewer than `window` offers are unanswered; at shutdown it stops asking and closes the
   * generator. `onOutcome(outcome)` gets the task's final state (`task_id`, `state`, `result`
   * or `error`): record it and ack the task now. `onRelease(reason)`: the offer was given up
   * (refused for good, or the plugin is shutting down): do not ack it. `onProgress(done,
   * total, message)` and `onStream(items)` get the running task's progress and stream items.
   * A generator that throws ends the plugin, for the worker to restart it.
   */
  offers(fn) {
    this._offersFn = fn;
    return this;
  }

  /**
   * Makes the plugin a result backend (protocol 1.5, `provides = ["result_backend"]`):
   * `fn(record)` (may be async) gets each `result.store` request's params (`task_id`, `task`,
   * `state`, `result` or `error`, `args`, `kwargs`, `submitter`, `attempts`, `started`,
   * `finished`), at most `concurrency` at once, and returns once it is stored (an upsert by
   * `task_id`: a record may come twice). Throwing makes the worker store it again later.
   */
  stores(fn) {
    this._storeFn = fn;
    return this;
  }

  /**
   * Handles the worker's `event` notifications, sent when plugin.toml subscribes
   * (`events = ["task.*", ...]`): `handler(event)` gets `event`, `time`, `dropped` and the
   * kind's fields, in order. A handler that returns a promise is not awaited (events keep
   * coming); an exception or rejection is logged, never fatal.
   */
  onEvent(handler) {
    this._onEvent = handler;
    return this;
  }

  _event(params) {
    if (!this._onEvent) return;
    const report = (e) => console.error(`event handler failed on ${params.event}: ${e && e.stack ? e.stack : e}`);
    try {
      const done = this._onEvent(params);
      if (done && typeof done.catch === 'function') done.catch(report);
    } catch (e) {
      report(e);
    }
  }

  /** Registers `handler` under `name`; `options.description` is shown by `plugins inspect`. */
  task(name, options, handler) {
    if (typeof options === 'function') [options, handler] = [{}, options];
    this._tasks.set(name, { handler, description: (options && options.description) || null });
    return this;
  }

  _send(message) {
    this._write(JSON.stringify({ jsonrpc: '2.0', ...message }) + '\n');
  }

  _error(id, code, message, data) {
    const error = { code, message };
    if (data !== undefined) error.data = data;
    this._send({ id, error });
  }

  _initialize(id, params) {
    this.settings = params.settings || {};
    this._initialized = true;
    this._offers = this._queueBackend(params.queue_backend);
    if (this._storeFn) {
      const concurrency = (params.limits && params.limits.concurrency) || 1;
      this._stores = new ResultBackend(this, this._storeFn, concurrency);
    }
    const tasks = [...this._tasks].map(([name, t]) => (t.description ? { name, description: t.description } : { name }));
    this._send({
      id,
      result: {
        protocol_version: PROTOCOL_VERSION,
        plugin: { name: this.name, version: this.version },
        tasks,
        // Requests are read while tasks run, so pings are answered while busy.
        capabilities: ['cancel', 'progress', 'stream', 'ping_while_busy'],
      },
    });
  }

  /** The queue-backend side, when the plugin has `offers` and initialize made it a queue
   * backend (`queue_backend.window`); else null. */
  _queueBackend(init) {
    if (!this._offersFn) return null;
    if (init === null || typeof init !== 'object') {
      console.error('plugin.offers is registered but the worker did not make this plugin a queue backend '
        + '(no queue_backend in initialize): add `provides = ["queue_backend"]` to plugin.toml; nothing is offered');
      return null;
    }
    return new QueueBackend(this, this._offersFn, Math.max(1, Math.trunc(Number(init.window)) || 16));
  }

  /** `result.store`: run by the ResultBackend; accepted while shutting down too, since the
   * worker stores an offered task's result before it answers the offer. */
  _store(id, params) {
    if (!this._storeFn) return this._error(id, METHOD_NOT_FOUND, 'unknown method result.store');
    if (!this._initialized) return this._error(id, INVALID_REQUEST, 'result.store before initialize');
    return this._stores.store(id, params);
  }

  async _run(id, params) {
    if (!this._initialized) return this._error(id, INVALID_REQUEST, 'task.run before initialize');
    if (this._shuttingDown !== null) return this._error(id, SHUTTING_DOWN, 'plugin is shutting down');
    const task = this._tasks.get(params.task);
    if (!task) return this._error(id, UNKNOWN_TASK, `unknown task ${params.task}`);
    const ctx = new Context(this, params);
    this._running.set(ctx.taskId, ctx);
    try {
      const args = params.args || [];
      const kwargs = params.kwargs || {};
      const result = await files.running.run(ctx, () =>
        task.handler(ctx, ...args, ...(Object.keys(kwargs).length ? [kwargs] : [])));
      let line;
      try {
        line = JSON.stringify(result === undefined ? null : result);
      } catch (e) {
        return this._error(id, TASK_FAILED, 'result is not JSON-serializable', {
          type: 'TypeError', message: `result is not JSON-serializable: ${e.message}`, retryable: false,
        });
      }
      this._send({ id, result: JSON.parse(line) });
    } catch (e) {
      if (e instanceof Retry) {
        try {
          this._error(id, TASK_RETRY, ...e._answer());
        } catch (changed) { // changed since it was checked, or its exc will not encode
          this._fail(id, changed);
        }
      } else if (e instanceof Cancelled) {
        this._error(id, TASK_CANCELLED, 'task cancelled', { type: 'Cancelled', message: e.message, retryable: false });
      } else {
        this._fail(id, e);
      }
    } finally {
      this._running.delete(ctx.taskId);
      this._maybeShutDown();
    }
  }

  /** Answers task `id` as failed (-32000) with `e`, whatever was thrown. */
  _fail(id, e) {
    const err = e instanceof Error ? e : new Error(String(e));
    this._error(id, TASK_FAILED, errorMessage(err), errorData(err));
  }

  _maybeShutDown() {
    if (this._shuttingDown !== null && this._running.size === 0
        && (!this._offers || this._offers.drained()) && (!this._stores || this._stores.idle())) {
      const id = this._shuttingDown;
      this._shuttingDown = undefined;
      if (id !== undefined) this._send({ id, result: null });
    }
  }

  _dispatch(msg) {
    const { id, method, params = {} } = msg;
    if (method === undefined) {
      // A response: only a queue backend asks the worker anything (task.offer).
      if (this._offers) this._offers.answered(msg);
      return;
    }
    if (id === undefined || id === null) {
      if (method === 'task.cancel') {
        const ctx = this._running.get(params.task_id);
        if (ctx) ctx._cancel();
      } else if (method === 'event') {
        this._event(params);
      } else if (method === 'initialized') {
        if (this._offers) this._offers.start();
      } else if (method === 'offer.progress' || method === 'offer.stream') {
        if (this._offers) this._offers.notified(method, params);
      } else if (method === 'exit') {
        process.exit(0);
      }
      return;
    }
    if (method === 'initialize') this._initialize(id, params);
    else if (method === 'task.run') this._run(id, params);
    else if (method === 'ping') this._send({ id, result: {} });
    else if (method === 'result.store') this._store(id, params);
    else if (method === 'shutdown') {
      this._shuttingDown = id;
      if (this._offers) this._offers.stop();
      this._maybeShutDown();
    } else this._error(id, METHOD_NOT_FOUND, `unknown method ${method}`);
  }

  /** Serves the protocol until the worker says `exit` or closes stdin. */
  run() {
    // Pipes are written synchronously on Linux, so the protocol keeps its order; everything
    // else that writes to stdout goes to stderr.
    const stdout = process.stdout;
    this._write = stdout.write.bind(stdout);
    const toStderr = process.stderr.write.bind(process.stderr);
    Object.defineProperty(process, 'stdout', { value: process.stderr, configurable: true });
    stdout.write = toStderr;
    console.log = console.error;
    console.info = console.error;
    readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
      .on('line', (line) => {
        if (!line.trim()) return;
        let msg;
        try {
          msg = JSON.parse(line);
          if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) throw new Error('not an object');
        } catch (e) {
          return this._error(null, PARSE_ERROR, `cannot parse request: ${e.message}`);
        }
        this._dispatch(msg);
      })
      .on('close', () => process.exit(0));
  }
}

module.exports = {
  Plugin, Context, Cancelled, TaskError, Retry, PROTOCOL_VERSION,
  FileActionStatus: files.FileActionStatus,
  StreamTaskResults: files.StreamTaskResults,
  expandPaths: files.expandPaths,
  formatQueueName: files.formatQueueName,
  ParsedQueueName: files.ParsedQueueName,
  currentTaskQueueName: files.currentTaskQueueName,
  currentSite: files.currentSite,
  FILE_STATES: files.FILE_STATES,
};
