'use strict';
// node-echo on the Node.js SDK: the same task as examples/raw-echo, which speaks the protocol
// by hand. The SDK handles the handshake, pings, cancellation, shutdown and stdout.
const { Plugin } = require('worker-plugin');

const plugin = new Plugin('node-echo', '1.0.0');
plugin.task('node.echo', { description: 'Streams each argument, then returns them joined' }, (ctx, ...args) => {
  for (const item of args) ctx.stream(item);
  return args.map(String).join(' ');
});
plugin.run();
