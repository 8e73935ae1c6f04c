"""An app of three handlers, served by one daemon: ``gaspar serve examples.apps:app``.

* ``thumbnail``: bytes in, bytes out (a "resize": every n-th byte, to stay dependency-free);
* ``stats``: typed arguments and a typed result (a list of numbers in, a dict out);
* ``frames``: a generator: its items stream back to the client as they are made.

Call them from any client::

    from gaspar.client import Client
    c = Client("127.0.0.1:8000")
    c.call("thumbnail", image, width=64)        # -> bytes
    c.call("stats", [1, 2, 3])                  # -> {"n": 3, "mean": 2.0, ...}
    for frame in c.stream("frames", video, size=1024):
        ...

or ``await aio.Client(addr).call(...)``, ``async for x in aio.Client(addr).stream(...)``,
and ``gaspar.Executor(addr).submit(stats, [1, 2, 3])``.
"""

from __future__ import annotations

import os
import statistics

import gaspar

app = gaspar.App()

#: The pids of this process's setup hook runs (one per worker that ran it).
LOADED: list[int] = []


@app.setup()
def load() -> None:
    """Once in each worker, after the fork (a model would be loaded here)."""
    LOADED.append(os.getpid())


@app.handler
def thumbnail(image: bytes, width: int = 128) -> bytes:
    """Every n-th byte, so that the result is ``width`` bytes at most."""
    step = max(1, -(-len(image) // width))
    return image[::step][:width]


@app.handler
def stats(values: list[float]) -> dict[str, float]:
    """Figures of a list of numbers."""
    if not values:
        raise ValueError("stats of nothing")
    return {"n": len(values), "mean": statistics.fmean(values), "max": max(values), "pid": os.getpid()}


@app.handler
def frames(video: bytes, size: int = 1024):
    """The video in chunks of ``size`` bytes, one at a time."""
    for start in range(0, len(video), size):
        yield video[start : start + size]
