// File-action tasks (the Ngenea Hub contract) and Ngenea queue names, for the Node.js SDK.
'use strict';

const fs = require('fs');
const path = require('path');
const { AsyncLocalStorage } = require('async_hooks');

/** The Context of the task whose handler is running (set by the SDK). */
const running = new AsyncLocalStorage();

/** `processed`, `skipped` (already in the desired state), `aborted` (later tasks must not
 * process it), `failures`, `inprogress`. */
const FILE_STATES = ['processed', 'skipped', 'aborted', 'failures', 'inprogress'];

function pathObject(p) {
  if (typeof p === 'string') return { path: p };
  if (p && typeof p === 'object' && typeof p.path === 'string') return { ...p };
  throw new TypeError(`a path is a string or an object with a string \`path\`, not ${JSON.stringify(p)}`);
}

function currentContext() {
  return running.getStore() || null;
}

/** The result payload Ngenea Hub expects of a file-action task. */
class FileActionStatus {
  constructor(task, inputPaths = [], jobid = null, queue = null) {
    this.task = task;
    this.inputPaths = inputPaths.map(pathObject);
    this.jobid = jobid;
    this.queue = queue;
    this.started = new Date().toISOString().replace('Z', '+00:00');
    this.details = { failures: [], processed: [], skipped: [] };
  }

  /** From the running task: its `jobid` and `paths` kwargs and its queue. */
  static fromContext(ctx = currentContext(), task = undefined) {
    if (!ctx) throw new Error('no task is running here; pass ctx');
    return new this(task || ctx.task, ctx.kwargs.paths || [], ctx.kwargs.jobid ?? null, ctx.queue);
  }

  /** Records what happened to one file; `message` (a string or strings) says why. */
  add(state, p, message) {
    if (!FILE_STATES.includes(state)) {
      throw new RangeError(`unknown file state ${JSON.stringify(state)}; use one of ${FILE_STATES.join(', ')}`);
    }
    const entry = pathObject(p);
    if (message !== undefined && message !== null) entry.message = Array.isArray(message) ? [...message] : [String(message)];
    (this.details[state] = this.details[state] || []).push(entry);
    return entry;
  }

  /** The payload to return from the task. */
  dump() {
    const details = Object.fromEntries(Object.entries(this.details).map(([s, e]) => [s, [...e]]));
    return {
      jobid: this.jobid,
      paths: [...details.processed, ...details.skipped].map((e) => ({ path: e.path })),
      status: {
        task: this.task,
        input_paths: this.inputPaths,
        input_total: this.inputPaths.length,
        summary: Object.fromEntries(Object.entries(details).map(([s, e]) => [s, e.length])),
        details,
        started: this.started,
      },
    };
  }
}

/** A FileActionStatus that also streams added files to the caller in batches of `batchSize`
 * files or every `interval` seconds; each batch is one `task.stream` item
 * `{jobid, task, files: [{path, state, ...}]}`. `dump()` sends the rest first. */
class StreamTaskResults extends FileActionStatus {
  constructor(task, inputPaths, jobid, queue, ctx = currentContext(), { batchSize = 500, interval = 1 } = {}) {
    super(task, inputPaths, jobid, queue);
    if (!ctx) throw new Error('StreamTaskResults streams through a running task; pass ctx');
    this.ctx = ctx;
    this.batchSize = batchSize;
    this.interval = interval;
    this.batch = [];
    this.lastFlush = Date.now();
  }

  static fromContext(ctx = currentContext(), task = undefined, options = {}) {
    if (!ctx) throw new Error('no task is running here; pass ctx');
    return new this(task || ctx.task, ctx.kwargs.paths || [], ctx.kwargs.jobid ?? null, ctx.queue, ctx, options);
  }

  add(state, p, message) {
    const entry = super.add(state, p, message);
    this.batch.push({ ...entry, state });
    if (this.batch.length >= this.batchSize || Date.now() - this.lastFlush >= this.interval * 1000) this.flush();
    return entry;
  }

  flush() {
    if (this.batch.length) {
      this.ctx.stream({ jobid: this.jobid, task: this.task, files: this.batch });
      this.batch = [];
    }
    this.lastFlush = Date.now();
  }

  dump() {
    this.flush();
    return super.dump();
  }
}

/** Pages (arrays of at most `pageSize` path objects) of the files under `paths`: folders are
 * expanded recursively and lazily (one directory read at a time), symlinks are listed and
 * never followed, a folder reached twice is listed once. */
function* expandPaths(paths, pageSize = 1000) {
  if (pageSize < 1) throw new RangeError('pageSize must be at least 1');
  let page = [];
  const seen = new Set();
  for (const given of paths) {
    const { path: root, ...extra } = pathObject(given);
    // [path, isFile]: a directory listing says which entries are plain files (or symlinks,
    // listed and never followed), so only folders and unknown types cost an lstat.
    const stack = [[root, false]];
    while (stack.length) {
      const [p, isFile] = stack.pop();
      let st = null;
      if (!isFile) {
        try {
          st = fs.lstatSync(p, { bigint: true });
        } catch (e) {
          st = null;
        }
      }
      if (st && st.isDirectory()) {
        const key = `${st.dev}:${st.ino}`;
        if (!seen.has(key)) {
          seen.add(key);
          let entries = [];
          try {
            entries = fs.readdirSync(p, { withFileTypes: true });
          } catch (e) {
            entries = [];
          }
          entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
          for (let i = entries.length - 1; i >= 0; i -= 1) {
            const e = entries[i];
            stack.push([path.join(p, e.name), !e.isDirectory() && (e.isFile() || e.isSymbolicLink())]);
          }
        }
      } else {
        page.push({ ...extra, path: p });
      }
      if (page.length >= pageSize) {
        yield page;
        page = [];
      }
    }
  }
  if (page.length) yield page;
}

/** `site.queue#function` (`queue#function` without a site; no `#` without a function). */
function formatQueueName(site, queue, fn) {
  const name = site ? `${site}.${queue}` : queue;
  return fn ? `${name}#${fn}` : name;
}

/** A queue name in the Ngenea 2.4 format, e.g. `london.highpriority#custom`. */
class ParsedQueueName {
  constructor(site, queue, fn = null) {
    this.site = site || null;
    this.queue = queue;
    this.function = fn || null;
  }

  static parse(name) {
    const hash = name.indexOf('#');
    const base = hash < 0 ? name : name.slice(0, hash);
    const fn = hash < 0 ? null : name.slice(hash + 1);
    const dot = base.indexOf('.');
    return dot < 0 ? new ParsedQueueName(null, base, fn) : new ParsedQueueName(base.slice(0, dot), base.slice(dot + 1), fn);
  }

  /** The running task's queue, or null outside a task or off a queue. */
  static current() {
    const name = currentTaskQueueName();
    return name ? ParsedQueueName.parse(name) : null;
  }

  toString() {
    return formatQueueName(this.site, this.queue, this.function);
  }
}

function currentTaskQueueName() {
  const ctx = currentContext();
  return ctx ? ctx.queue : null;
}

function currentSite() {
  const parsed = ParsedQueueName.current();
  return parsed ? parsed.site : null;
}

module.exports = {
  running,
  currentContext,
  FILE_STATES,
  FileActionStatus,
  StreamTaskResults,
  expandPaths,
  formatQueueName,
  ParsedQueueName,
  currentTaskQueueName,
  currentSite,
};
