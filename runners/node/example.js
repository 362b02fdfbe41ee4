'use strict';
// An example task file for a Node pool:
//   warren-worker --exec 'node runners/node/example.js' --exec-functions slugify,fetch_status
//   warren call slugify '{"text": "Hello, World"}'
const warren = require('./warren.js');

warren.serve({
  slugify: (args) => {
    const slug = String((args && args.text) || '')
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, '-')
      .replace(/^-+|-+$/g, '');
    if (slug === '') throw new warren.Permanent('nothing to slugify', 'invalid_args');
    return slug;
  },
  // Async handlers are awaited; a rejected promise is a retryable failure.
  fetch_status: async (args, ctx) => {
    const remaining = ctx.remaining();
    const signal = remaining === null ? undefined : AbortSignal.timeout(Math.max(1, remaining * 1000));
    const response = await fetch(args.url, { method: 'HEAD', signal });
    return { status: response.status, attempt: ctx.attempt };
  },
});
