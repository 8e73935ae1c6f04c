"""The handlers every server in the benchmark runs: plain functions, bytes -> bytes."""

from __future__ import annotations

import hashlib
import time

SHA_BLOCK = bytes(range(64))


def echo(msg: bytes) -> bytes:
    """Return the request unchanged."""
    return msg


def spin(msg: bytes) -> bytes:
    """Busy-loop for ``int(msg)`` microseconds of wall time; return the request."""
    end = time.perf_counter() + int(bytes(msg)) / 1e6
    while time.perf_counter() < end:
        pass
    return msg


def sha(msg: bytes) -> bytes:
    """The sha256 of a 64-byte block fed ``int(msg)`` times, chained: as hex digest bytes."""
    h = hashlib.sha256()
    for _ in range(int(bytes(msg))):
        h.update(SHA_BLOCK)
    return h.hexdigest().encode("ascii")
