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
def pause(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@app.handler
def a_set() -> set:
    return {1, 2}


@pickled.handler
def roundtrip(value):
    return value
