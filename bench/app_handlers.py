"""The App bench/apps.py serves: a no-op typed handler, a 1 ms CPU one, a generator, and a
pool that sizes itself. Not in bench/handlers.py: that module must import with any gaspar."""

from __future__ import annotations

import os
import time

import gaspar


def echo_bytes(message: bytes) -> bytes:
    """The raw 1.0 handler, for the overhead row's other side."""
    return message


app = gaspar.App(default=echo_bytes)


@app.handler
def echo(data: bytes) -> bytes:
    """The no-op typed call (beside the raw bytes echo)."""
    return data


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@app.handler
def score(doc: dict) -> dict:
    """A dict in, a dict out, 1 ms of CPU: the typed handler of the comparison."""
    _spin(0.001)
    return {"id": doc.get("id"), "words": len(str(doc.get("text", "")).split()), "pid": os.getpid()}


@app.handler
def items(n: int, size: int = 1024):
    """``n`` items of ``size`` bytes, as fast as they are taken."""
    chunk = b"x" * size
    for _ in range(n):
        yield chunk


@app.handler(pool="work")
def work(seconds: float) -> int:
    _spin(seconds)
    return os.getpid()


app.pool("work", workers="1:3")


# -- gunicorn's dirty arbiter, the same handler (bench/apps.py's comparison) ----------------

try:
    from gunicorn.dirty import DirtyApp
except ImportError:  # gunicorn without dirty arbiters: that row reports n/a
    DirtyApp = object


class ScoreDirtyApp(DirtyApp):
    """``score`` as a dirty arbiter's action (its arguments and result travel as JSON)."""

    def score(self, doc: dict) -> dict:
        return score(doc)


def wsgi(environ, start_response):  # gunicorn needs an app to serve beside its dirty arbiter
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
