# Task code of the Python pool test (tests/e2e/pools.rs).
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "runners", "python"))
import warren  # noqa: E402


def add(args, ctx):
    return {"sum": args["a"] + args["b"], "pid": os.getpid()}


def boom(args, ctx):
    print("about to fail")
    if args.get("permanent"):
        raise warren.Permanent("boom for good", "invalid_args")
    raise RuntimeError("boom")


def context(args, ctx):
    return {"id": ctx.id, "function": ctx.function, "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts, "has_deadline": ctx.deadline is not None}


def nan(args, ctx):
    return {"value": float("nan"), "pid": os.getpid()}


def env(args, ctx):
    return {name: os.environ.get(name) for name in args["names"]}


def spawn_sleep(args, ctx):
    """Starts `sleep 600` with this process's fds 0, 1 and 2; returns its pid or, with `hang`,
    writes it to `pidfile` and never returns."""
    child = subprocess.Popen(["sleep", "600"])
    if args.get("pidfile"):
        with open(args["pidfile"], "w") as f:
            f.write(str(child.pid))
    while args.get("hang"):
        time.sleep(1)
    return child.pid


def die(args, ctx):
    os._exit(3)


def read_stdin(args, ctx):
    """Says it has `started`; once `go` exists, runs `cat` with this process's stdin for a
    second; returns the bytes it read and whether `go` was seen."""
    open(args["started"], "w").close()
    go = False
    for _ in range(1000):
        go = os.path.exists(args["go"])
        if go:
            break
        time.sleep(0.01)
    read = subprocess.run(["timeout", "1", "cat"], stdout=subprocess.PIPE).stdout
    return {"read": len(read), "go": go}


# The protocol's output pipe, kept before serve() moves the protocol off fd 1: what a runner
# without the helper would hand its subprocesses.
PROTOCOL_OUT = os.dup(1)


def spawn_holder(args, ctx):
    """Starts `sleep 600` holding the protocol's output pipe open; returns its pid."""
    return subprocess.Popen(["sleep", "600"], pass_fds=[PROTOCOL_OUT]).pid


def answer_and_exit(args, ctx):
    """Starts `sleep 600` holding the protocol's output pipe (its pid to `pidfile`), writes this
    task's result itself, then exits at once."""
    child = subprocess.Popen(["sleep", "600"], pass_fds=[PROTOCOL_OUT])
    with open(args["pidfile"], "w") as f:
        f.write(str(child.pid))
    frame = {"type": "result", "id": ctx.id, "result": "answered"}
    os.write(PROTOCOL_OUT, (json.dumps(frame) + "\n").encode())
    os._exit(0)


def children(args, ctx):
    """The pids of this process's children."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open("/proc/self/task/%s/children" % task) as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def big(args, ctx):
    return "x" * args["n"]


def progress(args, ctx):
    """Reports `steps` updates (a fraction, a message, a detail), then answers with `steps`."""
    steps = args["steps"]
    for i in range(1, steps + 1):
        ctx.progress({"fraction": i / steps, "message": "step %d" % i, "detail": {"step": i}})
    return steps


warren.serve({"add": add, "boom": boom, "context": context, "nan": nan, "env": env,
              "spawn_sleep": spawn_sleep, "die": die, "read_stdin": read_stdin, "big": big,
              "spawn_holder": spawn_holder, "answer_and_exit": answer_and_exit,
              "children": children, "progress": progress})
