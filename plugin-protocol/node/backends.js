// Queue and result backends (protocol 1.5, PROTOCOL.md §4a) for the Node.js SDK: a queue
// backend's offers, kept within the window `initialize` gave, their answers handed to each
// offer's callbacks, and `result.store` for a result backend. `index.js` owns the Plugin and
// stdio; it hands these classes the messages that concern them and they write through it.
'use strict';

const { randomUUID } = require('crypto');

const SHUTTING_DOWN = -32002;
const OFFER_WINDOW_FULL = -32005;
/** Milliseconds an offer the worker did not take (-32002, -32005) waits to be offered again. */
const REOFFER_AFTER_MS = 1000;
const OFFER_KEYS = ['task', 'args', 'kwargs', 'taskId', 'softTimeLimit', 'hardTimeLimit',
  'onOutcome', 'onProgress', 'onStream', 'onRelease'];

function describe(value) {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'bigint') return `${value}n`;
  if (Array.isArray(value)) return 'an array';
  return String(value);
}

/** A line of the SDK's own in the plugin's log. */
function log(text) {
  process.stderr.write(text.endsWith('\n') ? text : `${text}\n`);
}

/**
 * What an offer yielded by the generator sends and calls: `params` (the `task.offer` params:
 * `task_id` a fresh UUID4 unless `taskId` is given, `time_limit` only with the limits given,
 * `progress` and `stream` only when their callback is given) and the callbacks. Throws
 * TypeError for what is no offer: the plugin's bug, which ends it (see QueueBackend).
 */
function offerOf(item) {
  if (item === null || typeof item !== 'object' || Array.isArray(item)) {
    throw new TypeError(`plugin.offers yielded ${describe(item)}: yield offer objects `
      + '({ task, onOutcome, ... }), or null when nothing is ready');
  }
  const unknown = Object.keys(item).filter((key) => !OFFER_KEYS.includes(key));
  if (unknown.length) {
    throw new TypeError(`offer: unknown member ${unknown.join(', ')} (known: ${OFFER_KEYS.join(', ')})`);
  }
  if (typeof item.task !== 'string' || !item.task) {
    throw new TypeError(`offer: task must be a task name, not ${describe(item.task)}`);
  }
  if (typeof item.onOutcome !== 'function') {
    throw new TypeError(`offer of ${item.task}: onOutcome is required: the callback that records `
      + "the task's outcome and acks it in the queue");
  }
  for (const name of ['onProgress', 'onStream', 'onRelease']) {
    if (item[name] !== undefined && item[name] !== null && typeof item[name] !== 'function') {
      throw new TypeError(`offer of ${item.task}: ${name} must be a function, not ${describe(item[name])}`);
    }
  }
  const given = (value) => value !== undefined && value !== null;
  const params = {
    task_id: given(item.taskId) ? String(item.taskId) : randomUUID(),
    task: item.task,
    args: [...(item.args || [])],
    kwargs: { ...(item.kwargs || {}) },
  };
  const limits = {};
  if (given(item.softTimeLimit)) limits.soft = Number(item.softTimeLimit);
  if (given(item.hardTimeLimit)) limits.hard = Number(item.hardTimeLimit);
  if (Object.keys(limits).length) params.time_limit = limits;
  if (given(item.onProgress)) params.progress = true;
  if (given(item.onStream)) params.stream = true;
  return {
    params,
    onOutcome: item.onOutcome,
    onProgress: item.onProgress,
    onStream: item.onStream,
    onRelease: item.onRelease,
  };
}

/**
 * The queue-backend side of a plugin. After `initialized` it asks the plugin's generator for
 * the next offer only while fewer than `window` offers are unanswered and fewer than `window`
 * wait to be offered again (so a worker that takes nothing never drains the queue into the
 * plugin), and offers due re-offers before new ones. Answers go to the offer's callbacks: a
 * result to `onOutcome`; -32002 or -32005 to a second's wait (holding no place) and another
 * offer, or, while shutting down, to `onRelease`; any other error to `onRelease`, logged.
 * `offer.progress` and `offer.stream` go to `onProgress` and `onStream`. A generator that
 * throws, or yields what is no offer, ends the plugin (exit 1), for the worker to restart it.
 */
class QueueBackend {
  constructor(plugin, makeOffers, window) {
    this._plugin = plugin;
    this._makeOffers = makeOffers;
    this.window = window;
    this._nextId = 1;
    this._outstanding = new Map(); // request id -> offer: sent, not answered yet
    this._byTaskId = new Map(); // task_id -> offer, the same offers, for offer.progress/stream
    this._waiting = []; // { due, offer }, to be offered again, in due order
    this._pulled = null; // an offer from the generator, waiting for a place
    this._items = null; // the generator's iterator, once started
    this._pulling = false; // awaiting the generator's next item
    this._exhausted = false; // the generator has ended or was closed
    this._stopping = false; // shutdown: nothing more is pulled or offered
    this._callbacks = 0; // onOutcome and onRelease calls not settled yet
    this._timer = null;
  }

  /** `initialized`: starts offering, once at most, never after a shutdown. */
  start() {
    if (this._items !== null || this._stopping) return;
    try {
      const made = this._makeOffers(this.window);
      this._items = made && typeof made[Symbol.asyncIterator] === 'function'
        ? made[Symbol.asyncIterator]() : made[Symbol.iterator]();
    } catch (e) {
      return this._crash(e);
    }
    this._fill();
  }

  /** True once shutdown may be answered as far as offers go. */
  drained() {
    return this._stopping && this._exhausted && !this._pulling
      && this._outstanding.size === 0 && this._callbacks === 0;
  }

  /** `shutdown`: pulls and offers nothing more, releases the offers waiting to go again, and
   * closes the generator (its `finally` blocks run). */
  stop() {
    if (this._stopping) return;
    this._stopping = true;
    clearTimeout(this._timer);
    for (const { offer } of this._waiting.splice(0)) this._release(offer, 'shutting down');
    if (this._pulled) this._release(this._pulled, 'shutting down');
    this._pulled = null;
    if (this._items === null || this._exhausted) {
      this._exhausted = true;
      return;
    }
    // An async generator runs this after a pending next(); its value is released then.
    Promise.resolve()
      .then(() => (typeof this._items.return === 'function' ? this._items.return() : undefined))
      .catch((e) => log(`closing the plugin.offers generator failed: ${e && e.stack ? e.stack : e}`))
      .finally(() => {
        this._exhausted = true;
        this._plugin._maybeShutDown();
      });
  }

  /** Sends what the window has room for: due re-offers, then the pulled offer; then asks the
   * generator for another when a new offer could go at once. */
  _fill() {
    if (this._stopping) return;
    const now = Date.now();
    while (this._outstanding.size < this.window) {
      if (this._waiting.length && this._waiting[0].due <= now) this._send(this._waiting.shift().offer);
      else if (this._pulled) {
        const pulled = this._pulled;
        this._pulled = null;
        this._send(pulled);
      } else break;
    }
    if (!this._timer && this._waiting.length && this._waiting[0].due > now) {
      this._timer = setTimeout(() => {
        this._timer = null;
        this._fill();
      }, this._waiting[0].due - now);
    }
    const room = this._outstanding.size < this.window && this._waiting.length < this.window
      && !(this._waiting.length && this._waiting[0].due <= now);
    if (room && !this._pulled && !this._pulling && !this._exhausted) {
      this._pull().catch((e) => this._crash(e));
    }
  }

  async _pull() {
    this._pulling = true;
    let step;
    try {
      step = await this._items.next();
    } catch (e) {
      return this._crash(e);
    } finally {
      this._pulling = false;
    }
    if (step.done) {
      this._exhausted = true;
      return this._plugin._maybeShutDown();
    }
    if (step.value === null || step.value === undefined) {
      // Nothing ready: ask again once pending I/O (answers, a shutdown) had its turn.
      return setImmediate(() => this._fill());
    }
    let offer;
    try {
      offer = offerOf(step.value);
    } catch (e) {
      return this._crash(e);
    }
    if (this._stopping) {
      this._release(offer, 'shutting down');
      return this._plugin._maybeShutDown();
    }
    this._pulled = offer;
    this._fill();
  }

  _send(offer) {
    let params;
    try {
      params = JSON.stringify(offer.params);
    } catch (e) { // a BigInt, a circular structure
      log(`cannot offer task ${offer.params.task_id}: ${e.message}; released`);
      return this._release(offer, `cannot offer: ${e.message}`);
    }
    const id = this._nextId;
    this._nextId += 1;
    this._outstanding.set(id, offer);
    this._byTaskId.set(offer.params.task_id, offer);
    this._plugin._write(`{"jsonrpc":"2.0","id":${id},"method":"task.offer","params":${params}}\n`);
  }

  /** The worker's answer to one of our offers. */
  answered(msg) {
    const offer = this._outstanding.get(msg.id);
    if (!offer) return log(`an answer to no outstanding offer (id ${JSON.stringify(msg.id)}) was ignored`);
    this._outstanding.delete(msg.id);
    if (this._byTaskId.get(offer.params.task_id) === offer) this._byTaskId.delete(offer.params.task_id);
    const { error } = msg;
    if (error === null || typeof error !== 'object') {
      this._call(offer, 'onOutcome', msg.result);
    } else {
      const message = String(error.message || `offer refused (${error.code})`);
      if (error.code === SHUTTING_DOWN || error.code === OFFER_WINDOW_FULL) {
        if (this._stopping) this._release(offer, message);
        else this._waiting.push({ due: Date.now() + REOFFER_AFTER_MS, offer });
      } else {
        log(`the worker refused the offer of task ${offer.params.task_id} for good (${error.code}: ${message}): released`);
        this._release(offer, message);
      }
    }
    this._fill();
    this._plugin._maybeShutDown();
  }

  /** `offer.progress` or `offer.stream`: to the outstanding offer's callback, at once. */
  notified(method, params) {
    const offer = this._byTaskId.get(params.task_id);
    if (!offer) return; // answered meanwhile, or not ours: notifications are best effort
    const callback = method === 'offer.progress' ? 'onProgress' : 'onStream';
    if (!offer[callback]) return;
    try {
      const args = method === 'offer.progress'
        ? [params.done, params.total ?? null, params.message ?? null] : [params.items || []];
      const done = offer[callback](...args);
      if (done && typeof done.catch === 'function') done.catch((e) => this._failed(offer, callback, e));
    } catch (e) {
      this._failed(offer, callback, e);
    }
  }

  _release(offer, reason) {
    this._call(offer, 'onRelease', reason);
  }

  /** Calls `offer[callback](arg)` after the current message, counted until it settles (a
   * shutdown waits for it); a throw or rejection is logged. */
  _call(offer, callback, arg) {
    if (!offer[callback]) return;
    this._callbacks += 1;
    Promise.resolve()
      .then(() => offer[callback](arg))
      .catch((e) => this._failed(offer, callback, e))
      .finally(() => {
        this._callbacks -= 1;
        this._plugin._maybeShutDown();
      });
  }

  _failed(offer, callback, e) {
    log(`${callback} of the offer of task ${offer.params.task_id} failed: ${e && e.stack ? e.stack : e}`);
  }

  _crash(e) {
    log('the plugin.offers generator failed; the plugin exits so that the worker restarts it: '
      + `${e && e.stack ? e.stack : e}`);
    process.exit(1);
  }
}

/**
 * The result-backend side: each `result.store` runs `store(record)`, at most `limit` at once
 * (the worker's `concurrency`), the others queued; answered `{}` once it resolves, -32000 when
 * it throws or rejects (the worker stores it again later).
 */
class ResultBackend {
  constructor(plugin, store, limit) {
    this._plugin = plugin;
    this._store = store;
    this._limit = Math.max(1, limit);
    this._running = 0;
    this._queued = [];
  }

  store(id, record) {
    this._queued.push([id, record]);
    this._next();
  }

  /** True while no store runs or waits. */
  idle() {
    return this._running === 0 && this._queued.length === 0;
  }

  _next() {
    while (this._running < this._limit && this._queued.length) {
      const [id, record] = this._queued.shift();
      this._running += 1;
      Promise.resolve()
        .then(() => this._store(record))
        .then(() => this._plugin._send({ id, result: {} }), (e) => this._plugin._fail(id, e))
        .finally(() => {
          this._running -= 1;
          this._next();
          this._plugin._maybeShutDown();
        });
    }
  }
}

module.exports = { QueueBackend, ResultBackend, offerOf, REOFFER_AFTER_MS };
