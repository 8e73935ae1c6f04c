"""What the baseline servers share: the command line, loading the handler, the framing."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import struct
import sys
from collections.abc import Callable

BACKLOG = 2048  # the same accept queue as gaspar's default
HEADER = struct.Struct("!I")
EXTENDED = 0x80000000


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--handler", default="bench.handlers:echo", help="module:callable, bytes -> bytes")
    p.add_argument("--uvloop", action="store_true", help="asyncio only: use uvloop if it is installed")
    return p.parse_args()


def load_handler(spec: str) -> Callable[[bytes], bytes]:
    """Import ``module:callable``; the repository root is put on sys.path for ``bench.*``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--handler must be module:callable, not {spec!r}")
    return getattr(importlib.import_module(module), name)


def body_length(header: bytes) -> int:
    """The length from a plain request's header; extended requests are not supported here."""
    (word,) = HEADER.unpack(header)
    if word & EXTENDED:
        raise ValueError("extended requests are gaspar's own; the baselines speak the plain protocol")
    return word


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes from a blocking (or green) socket; EOFError if it closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("connection closed mid-request")
        got += k
    return bytes(buf)


def abort(sock: socket.socket) -> None:
    """Close with a TCP reset: how the plain protocol reports an error."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
