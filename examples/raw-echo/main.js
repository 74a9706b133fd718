// A plugin in plain Node.js with no SDK: newline-delimited JSON-RPC 2.0 on stdin/stdout, as
// PROTOCOL.md 1.0 defines it. It documents the wire; for real plugins use an SDK.
'use strict';
const readline = require('readline');

const send = (msg) => process.stdout.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n');
// Logs go to stderr; stdout belongs to the protocol.
const log = (...args) => console.error(...args);

const tasks = {
  'raw.echo': (id, { task_id, args }) => {
    args.forEach((item) => send({ method: 'task.stream', params: { task_id, items: [item] } }));
    send({ id, result: args.map(String).join(' ') });
  },
};

let inFlight = 0;
let shutdownId = null;

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    return send({ id: null, error: { code: -32700, message: `cannot parse: ${e.message}` } });
  }
  const { id, method, params = {} } = msg;
  if (method === 'initialize') {
    send({
      id,
      result: {
        protocol_version: '1.0',
        plugin: { name: 'raw-echo', version: '1.0.0' },
        tasks: [{ name: 'raw.echo', description: 'Streams each argument, then returns them joined' }],
      },
    });
  } else if (method === 'task.run') {
    const run = tasks[params.task];
    if (!run) return send({ id, error: { code: -32003, message: `unknown task ${params.task}` } });
    inFlight += 1;
    try {
      run(id, params);
    } catch (e) {
      send({ id, error: { code: -32000, message: e.message, data: { type: e.name, message: e.message, traceback: e.stack } } });
    }
    inFlight -= 1;
    if (shutdownId !== null && inFlight === 0) send({ id: shutdownId, result: null });
  } else if (method === 'ping') {
    send({ id, result: {} });
  } else if (method === 'shutdown') {
    shutdownId = id;
    if (inFlight === 0) send({ id, result: null });
  } else if (method === 'exit') {
    process.exit(0);
  } else if (id !== undefined && id !== null) {
    send({ id, error: { code: -32601, message: `unknown method ${method}` } });
  } else if (method !== 'initialized' && method !== 'task.cancel') {
    log(`ignoring notification ${method}`);
  }
});
