'use strict';
// Task code of the Node pool test (tests/e2e/pools.rs).
const warren = require('../../runners/node/warren.js');

warren.serve({
  add: (args) => ({ sum: args.a + args.b, pid: process.pid }),
  boom: async (args) => {
    console.log('about to fail');
    if (args && args.permanent) throw new warren.Permanent('boom for good', 'invalid_args');
    throw new Error('boom');
  },
  context: (args, ctx) => ({
    id: ctx.id,
    function: ctx.function,
    attempt: ctx.attempt,
    max_attempts: ctx.maxAttempts,
    has_deadline: ctx.deadline !== null,
  }),
});
