"""An example task file for a Python pool:

    warren-worker --exec 'python3 runners/python/example.py' --exec-functions slugify,word_count
    warren call slugify '{"text": "Hello, World"}'
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import warren  # noqa: E402


def slugify(args, ctx):
    slug = re.sub(r"[^a-z0-9]+", "-", str(args.get("text", "")).lower()).strip("-")
    if not slug:
        raise warren.Permanent("nothing to slugify", "invalid_args")
    return slug


def word_count(args, ctx):
    print("counting words for task %s (attempt %d)" % (ctx.id, ctx.attempt))
    return {"words": len(str(args.get("text", "")).split())}


warren.serve({"slugify": slugify, "word_count": word_count})
