"""An App for tests/test_apps.py: handlers that stream slowly, forever, or fail."""

from __future__ import annotations

import os
import time

import gaspar

app = gaspar.App()
pickled = gaspar.App(allow_pickle=True)


@app.handler
def echo(data: bytes) -> bytes:
    return data


@app.handler
def add(a: int, b: int = 1) -> int:
    return a + b


@app.handler
def greet(name: str, greeting: str = "hello") -> str:
    return f"{greeting} {name}"


@app.handler(name="whoami")
def pid() -> int:
    return os.getpid()


@app.handler
def count(n: int, size: int = 1, delay: float = 0.0):
    for i in range(n):
        if delay:
            time.sleep(delay)
        yield bytes([i % 256]) * size


@app.handler
def forever(size: int = 1024, marker: str = ""):
    """Items until its client leaves; then writes ``marker`` (GeneratorExit reached it)."""
    try:
        while True:
            yield b"x" * size
    finally:
        if marker:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))


@app.handler
def fail_after(n: int):
    yield from range(n)
    raise KeyError("no more")


@app.handler
def spin_for(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "spun"


@app.handler
def pause(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@app.handler
def a_set() -> set:
    return {1, 2}


@pickled.handler
def roundtrip(value):
    return value


# -- pools: an App whose "embed" handlers have a pool of their own -------------------------

pooled = gaspar.App()


def _mark(pool: str) -> None:
    where = os.environ.get("GASPAR_TEST_MARKS")
    if where:
        with open(os.path.join(where, f"{pool}-{os.getpid()}"), "w"):
            pass


@pooled.setup("embed")
def load_model() -> None:
    _mark("embed")


@pooled.setup()
def load_default() -> None:
    _mark("default")


@pooled.handler(workers=1)
def embed(seconds: float = 0.0) -> int:
    if seconds:
        time.sleep(seconds)
    return os.getpid()


@pooled.handler(pool="embed")
def embed_too() -> int:
    return os.getpid()


@pooled.handler
def quick() -> int:
    return os.getpid()


# -- memory: a handler that grows its worker ----------------------------------------------

HOARD: list[bytes] = []


@app.handler
def hoard(mib: int) -> int:
    """Keep ``mib`` MiB more in this worker (touched, so it is resident); its pid."""
    HOARD.append(b"\x01" * (mib << 20))
    return os.getpid()


# -- autoscaling: a pool of 1 to 3 workers ------------------------------------------------

scaled = gaspar.App()


@scaled.handler(pool="work")
def work(seconds: float) -> int:
    """Busy for ``seconds`` (CPU): one worker's capacity is 1/seconds calls a second."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return os.getpid()


scaled.pool("work", workers="1:3")
