"""Warren runner for Python (runner protocol 1, see docs/runners.md).

One file, standard library only: copy it next to your task code and

    import warren

    def send_mail(args, ctx):
        ...  # return anything json.dumps can encode

    warren.serve({"send_mail": send_mail})

then run it in a pool: `warren-worker --exec 'python3 tasks.py' --exec-functions send_mail`.

- A raised exception fails the task and is retried (while attempts remain). Raise
  warren.Permanent for a failure another attempt cannot fix, or warren.TaskError(message,
  kind=..., retryable=...) to choose the error kind the caller sees (e.g. "invalid_args").
- ctx.id, ctx.function, ctx.attempt, ctx.max_attempts, ctx.redelivered, ctx.deadline (ms since
  the epoch, or None) and ctx.remaining() (seconds left, or None) describe the task.
- The protocol runs on private descriptors that subprocesses do not inherit: stdin reads
  /dev/null, and stdout (print(), os.write(1, ...), a subprocess's output) goes to stderr, which
  the worker writes to its log.
"""

import json
import os
import sys
import time
import traceback

PROTOCOL = 1


class TaskError(Exception):
    """A task failure with the error kind and retry advice the caller sees."""

    def __init__(self, message, kind="handler_failed", retryable=True):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


class Permanent(TaskError):
    """A failure that another attempt cannot fix: the task is dead-lettered at once."""

    def __init__(self, message, kind="handler_failed"):
        super().__init__(message, kind, False)


class Context:
    """What a handler may want to know about its task."""

    def __init__(self, task, write):
        self.id = str(task.get("id", ""))
        self.function = str(task.get("function", ""))
        self.attempt = int(task.get("attempt") or 1)
        self.max_attempts = int(task.get("max_attempts") or 1)
        self.redelivered = bool(task.get("redelivered", False))
        self.deadline = task.get("deadline")
        self._write = write

    def remaining(self):
        """Seconds until the caller's deadline, or None when it set none."""
        return None if self.deadline is None else self.deadline / 1000 - time.time()

    def progress(self, progress):
        """Reports how far the task has got, to the caller waiting for it: a dict with
        `fraction` (0 to 1) or `percent` (0 to 100), `message` (a str, at most 1 KiB), `detail`
        (any JSON, at most 4 KiB); other keys are ignored. Each call writes one line; the
        worker sends the caller at most four updates a second (the latest wins) and the last
        one before the result."""
        self._write(dict(progress, type="progress", id=self.id))


def _private_protocol():
    """Moves the protocol off fds 0 and 1, onto descriptors that subprocesses do not inherit
    (os.dup's are non-inheritable), and points fd 0 at /dev/null and fd 1 at stderr: a
    subprocess can neither read task lines nor write into the protocol, nor hold its pipes."""
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8", errors="replace")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return proto_in, proto_out


def serve(handlers):
    """Serves tasks from the worker until it closes the protocol's input."""
    proto_in, out = _private_protocol()
    # Task code's print() goes to the log, never into the protocol.
    sys.stdout = sys.stderr

    def write(frame):
        out.write(json.dumps(frame, ensure_ascii=False, allow_nan=False, default=str) + "\n")
        out.flush()

    def error(task_id, kind, message, retryable):
        write({"type": "error", "id": task_id,
               "error": {"kind": kind, "message": message, "retryable": retryable}})

    write({"type": "ready", "protocol": PROTOCOL, "functions": list(handlers),
           "runtime": "python " + sys.version.split()[0]})
    for line in proto_in:
        line = line.strip()
        if not line:
            continue
        try:
            task = json.loads(line)
        except ValueError:
            continue
        if not isinstance(task, dict) or task.get("type") != "task":
            continue  # a frame type of a later protocol version
        task_id = str(task.get("id", ""))
        handler = handlers.get(task.get("function"))
        try:
            if handler is None:
                raise Permanent("this runner has no handler for %s" % task.get("function"),
                                "unknown_function")
            result = handler(task.get("args"), Context(task, write))
            try:
                # NaN and Infinity are not JSON: the worker would take the line for garbage.
                encoded = json.dumps({"type": "result", "id": task_id, "result": result},
                                     ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise Permanent("the result cannot be encoded as JSON: %s" % e)
            out.write(encoded + "\n")
            out.flush()
        except TaskError as e:
            error(task_id, e.kind, str(e), e.retryable)
        except Exception as e:  # noqa: BLE001 - any failure of task code is the task's failure
            traceback.print_exc()
            error(task_id, "handler_failed", "%s: %s" % (type(e).__name__, e), True)
