"""The app of issue 16, three handlers served by one daemon: ``gaspar serve examples.apps:app``.

* ``thumbnail``: bytes in, bytes out (a "resize": every n-th byte, to stay dependency-free);
* ``embed``: typed arguments and result, in a pool of its own of one worker, whose setup
  hook loads the "model" once in that worker only (a real one would be gigabytes);
* ``frames``: a generator: its items stream back to the client as they are made.

Call them from any client::

    from gaspar.client import Client
    c = Client("127.0.0.1:8000")
    c.call("thumbnail", image, width=64)        # -> bytes
    c.call("embed", ["a text", "another"])      # -> [[...], [...]]
    for frame in c.stream("frames", video, size=1024):
        ...

or ``await aio.Client(addr).call(...)``, ``async for x in aio.Client(addr).stream(...)``,
and ``gaspar.Executor(addr).submit(embed, ["a text"])``. An agent on another host can serve
the embed pool: ``gaspar worker examples.apps:app --pool embed=1 --connect tcp://FRONT:PORT``.
"""

from __future__ import annotations

import os

import gaspar

app = gaspar.App()

#: The "model": loaded by the embed pool's setup hook, in its worker only.
MODEL: dict[str, float] = {}


@app.setup("embed")
def load_model() -> None:
    """Once in each worker of the embed pool, after the fork (not in the front end)."""
    MODEL.update({chr(c): (c % 7) / 7 for c in range(32, 127)})
    where = os.environ.get("GASPAR_EXAMPLE_MARKS")  # for the tests: which processes loaded it
    if where:
        open(os.path.join(where, str(os.getpid())), "w").close()


@app.handler
def thumbnail(image: bytes, width: int = 128) -> bytes:
    """Every n-th byte, so that the result is ``width`` bytes at most."""
    step = max(1, -(-len(image) // width))
    return image[::step][:width]


@app.handler(workers=1)
def embed(texts: list[str]) -> list[list[float]]:
    """A vector per text: three figures from the loaded model."""
    if not MODEL:
        raise RuntimeError("the model is not loaded in this worker")
    out = []
    for text in texts:
        weights = [MODEL.get(ch, 0.0) for ch in text] or [0.0]
        out.append([len(text), sum(weights) / len(weights), float(os.getpid())])
    return out


@app.handler
def frames(video: bytes, size: int = 1024):
    """The video in chunks of ``size`` bytes, one at a time."""
    for start in range(0, len(video), size):
        yield video[start : start + size]
