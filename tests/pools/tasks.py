# Task code of the Python pool test (tests/e2e/pools.rs).
import os
import sys

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


def big(args, ctx):
    return "x" * args["bytes"]


warren.serve({"add": add, "boom": boom, "context": context, "nan": nan, "big": big})
