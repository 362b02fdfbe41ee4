'use strict';
/**
 * Warren runner for Node.js (runner protocol 1, see docs/runners.md). One file, no npm:
 * copy it next to your task code and
 *
 *     const warren = require('./warren.js');
 *     warren.serve({
 *       send_mail: async (args, ctx) => { ... },  // return anything JSON.stringify can encode
 *     });
 *
 * then run it in a pool: `warren-worker --exec 'node tasks.js' --exec-functions send_mail`.
 *
 * - A thrown error (or a rejected promise) fails the task and is retried (while attempts
 *   remain). Throw warren.Permanent for a failure another attempt cannot fix, or
 *   new warren.TaskError(message, { kind, retryable }) to choose the error kind the caller
 *   sees (e.g. 'invalid_args').
 * - ctx.id, ctx.function, ctx.attempt, ctx.maxAttempts, ctx.redelivered, ctx.deadline (ms since
 *   the epoch, or null) and ctx.remaining() (seconds left, or null) describe the task.
 * - The protocol runs on private descriptors that child processes do not inherit: stdin reads
 *   /dev/null, and stdout (console.log, process.stdout) goes to stderr, which the worker logs.
 *   (Run by hand, with stdin or stdout not a pipe, the protocol stays on stdin and stdout.)
 * Tasks run one at a time, as the protocol requires.
 */

const fs = require('fs');
const net = require('net');
const readline = require('readline');

const PROTOCOL = 1;

/** A task failure with the error kind and retry advice the caller sees. */
class TaskError extends Error {
  constructor(message, { kind = 'handler_failed', retryable = true } = {}) {
    super(message);
    this.kind = kind;
    this.retryable = retryable;
  }
}

/** A failure that another attempt cannot fix: the task is dead-lettered at once. */
class Permanent extends TaskError {
  constructor(message, kind = 'handler_failed') {
    super(message, { kind, retryable: false });
  }
}

/** The protocol's descriptors once serve() has started: [input, output]. */
let proto = null;

/**
 * Moves the protocol off fds 0 and 1 when both are pipes, as under the worker: opens each pipe
 * again through /proc (a descriptor of its own, blocking whatever libuv does to fd 1, and
 * close-on-exec, so child processes never get it), then points fd 0 at /dev/null and fd 1 at
 * stderr (the lowest free descriptor is reused). Returns null, leaving fds 0 and 1 alone, when
 * they are not pipes (a file, a terminal or a socket, as when a runner is tried by hand) or
 * /proc cannot reopen them.
 */
function privateProtocol() {
  const { O_RDONLY, O_WRONLY, O_APPEND } = fs.constants;
  let input;
  let output;
  try {
    if (!fs.fstatSync(0).isFIFO() || !fs.fstatSync(1).isFIFO()) return null;
    input = fs.openSync('/proc/self/fd/0', O_RDONLY);
    output = fs.openSync('/proc/self/fd/1', O_WRONLY | O_APPEND);
  } catch {
    if (input !== undefined) fs.closeSync(input);
    return null;
  }
  fs.closeSync(0);
  fs.openSync('/dev/null', O_RDONLY);
  fs.closeSync(1);
  fs.openSync('/proc/self/fd/2', O_WRONLY | O_APPEND);
  return [input, output];
}

/** Writes every byte of `text` to the protocol, however many each write takes. */
function writeAll(text) {
  const bytes = Buffer.from(text, 'utf8');
  let at = 0;
  while (at < bytes.length) {
    try {
      at += fs.writeSync(proto[1], bytes, at, bytes.length - at);
    } catch (e) {
      // A non-blocking pipe that is full: wait for the worker to read, then go on.
      if (e.code !== 'EAGAIN') throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
}

function write(frame) {
  // Synchronous: a frame is out before the next task starts, even if the process dies then.
  writeAll(JSON.stringify(frame) + '\n');
}

function error(id, kind, message, retryable) {
  write({ type: 'error', id, error: { kind, message, retryable } });
}

/** Serves tasks from the worker until it closes the protocol's input. */
async function serve(handlers) {
  const own = privateProtocol();
  // Without descriptors of its own, the protocol stays on fds 0 and 1.
  proto = own || [0, 1];
  // Task code's console output goes to the log, never into the protocol.
  console.log = console.error;
  console.info = console.error;
  console.debug = console.error;
  write({
    type: 'ready',
    protocol: PROTOCOL,
    functions: Object.keys(handlers),
    runtime: 'node ' + process.version,
  });
  // A pipe handle on the event loop, not an fs stream: a read blocked in the thread pool would
  // hold up process.exit() until the worker writes again.
  const input = own ? new net.Socket({ fd: own[0], readable: true, writable: false }) : process.stdin;
  const lines = readline.createInterface({ input, crlfDelay: Infinity });
  for await (const raw of lines) {
    const line = raw.trim();
    if (line === '') continue;
    let task;
    try {
      task = JSON.parse(line);
    } catch {
      continue;
    }
    if (task === null || typeof task !== 'object' || task.type !== 'task') continue;
    const id = String(task.id ?? '');
    const ctx = {
      id,
      function: String(task.function ?? ''),
      attempt: Number(task.attempt ?? 1),
      maxAttempts: Number(task.max_attempts ?? 1),
      redelivered: Boolean(task.redelivered),
      deadline: task.deadline ?? null,
      remaining() {
        return this.deadline === null ? null : this.deadline / 1000 - Date.now() / 1000;
      },
      // Reports how far the task has got, to the caller waiting for it: `fraction` (0 to 1) or
      // `percent` (0 to 100), `message` (a string, at most 1 KiB), `detail` (any JSON, at most
      // 4 KiB); other keys are ignored. Each call writes one line; the worker sends the caller
      // at most four updates a second (the latest wins) and the last one before the result.
      progress(progress) {
        write({ ...progress, type: 'progress', id });
      },
    };
    try {
      const handler = Object.prototype.hasOwnProperty.call(handlers, ctx.function)
        ? handlers[ctx.function]
        : null;
      if (handler === null) {
        throw new Permanent(`this runner has no handler for ${ctx.function}`, 'unknown_function');
      }
      const result = await handler(task.args ?? null, ctx);
      let line;
      try {
        line = JSON.stringify({ type: 'result', id, result: result === undefined ? null : result });
      } catch (e) {
        throw new Permanent(`the result cannot be encoded as JSON: ${e.message}`);
      }
      writeAll(line + '\n');
    } catch (e) {
      if (e instanceof TaskError) {
        error(id, e.kind, e.message, e.retryable);
      } else {
        console.error(e);
        const name = e && e.constructor ? e.constructor.name : 'Error';
        error(id, 'handler_failed', `${name}: ${e && e.message !== undefined ? e.message : e}`, true);
      }
    }
  }
}

module.exports = { serve, TaskError, Permanent, PROTOCOL };
