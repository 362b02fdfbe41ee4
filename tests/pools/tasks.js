'use strict';
// Task code of the Node pool test (tests/e2e/pools.rs).
const fs = require('fs');
const { spawn, spawnSync } = require('child_process');
const warren = require('../../runners/node/warren.js');

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

warren.serve({
  add: (args) => ({ sum: args.a + args.b, pid: process.pid }),
  boom: async (args) => {
    console.log('about to fail');
    if (args && args.permanent) throw new warren.Permanent('boom for good', 'invalid_args');
    throw new Error('boom');
  },
  env: (args) => Object.fromEntries(args.names.map((n) => [n, process.env[n] ?? null])),
  // Starts `sleep 600` with this process's fds 0, 1 and 2; returns its pid or, with `hang`,
  // writes it to `pidfile` and never returns.
  spawn_sleep: (args) => {
    const child = spawn('sleep', ['600'], { stdio: 'inherit' });
    if (args.pidfile) fs.writeFileSync(args.pidfile, String(child.pid));
    return args.hang ? new Promise(() => {}) : child.pid;
  },
  die: () => process.exit(3),
  // Says it has `started`; once `go` exists, runs `cat` with this process's stdin for a second;
  // returns the bytes it read and whether `go` was seen.
  read_stdin: async (args) => {
    fs.writeFileSync(args.started, '');
    let go = false;
    for (let i = 0; i < 1000 && !(go = fs.existsSync(args.go)); i++) await pause(10);
    const cat = spawnSync('timeout', ['1', 'cat'], { stdio: ['inherit', 'pipe', 'inherit'] });
    return { read: cat.stdout.length, go };
  },
  // What a library does at require time (kleur, yargs): it sets O_NONBLOCK on fd 1.
  big: (args) => {
    void process.stdout.isTTY;
    return 'x'.repeat(args.n);
  },
  // Reports `steps` updates (a fraction and a message), then answers with `steps`.
  progress: (args, ctx) => {
    for (let i = 1; i <= args.steps; i++) ctx.progress({ fraction: i / args.steps, message: `step ${i}` });
    return args.steps;
  },
  context: (args, ctx) => ({
    id: ctx.id,
    function: ctx.function,
    attempt: ctx.attempt,
    max_attempts: ctx.maxAttempts,
    has_deadline: ctx.deadline !== null,
  }),
});
