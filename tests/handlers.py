"""Handlers used by the tests, importable by ``gaspar serve handlers:NAME`` (tests/ is on
PYTHONPATH for CLI servers) and by the in-process tests."""

from __future__ import annotations

import os
import sys
import time

import gaspar


def echo(message: bytes) -> bytes:
    return message


def upper_str(message: bytes) -> str:
    return message.decode("utf-8").upper()


def returns_int(message: bytes) -> int:
    return 42


def boom(message: bytes) -> bytes:
    if message.startswith(b"boom"):
        raise ValueError(f"bad input {message!r}")
    return message


def raise_text(message: bytes) -> bytes:
    """Raises ValueError with the request's text as its message, as it came (newlines and all)."""
    raise ValueError(message.decode("utf-8", "replace"))


def sleepy(message: bytes) -> bytes:
    """The payload is seconds to sleep (ASCII); replies with the payload."""
    time.sleep(float(message or b"0"))
    return message


def big(message: bytes) -> bytes:
    """b'big N' (N in ASCII): a reply of N bytes; anything else echoes."""
    return b"r" * int(message[4:]) if message.startswith(b"big ") else message


def die(message: bytes) -> bytes:
    """b'die' ends the worker process with os._exit(7); anything else echoes."""
    if message == b"die":
        os._exit(7)
    return message


def pid(message: bytes) -> bytes:
    return str(os.getpid()).encode()


class Stateful(gaspar.Consumer):
    """A subclassed consumer with state set by a broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.table = b"initial"

    def handle(self, message: bytes) -> bytes:
        return self.table + b":" + message

    def on_broadcast(self, message: bytes) -> None:
        self.table = message


def faulty(message: bytes) -> bytes:
    """A fault on demand, for the supervision tests; otherwise sleep and reply with the pid.

    b'segfault' dereferences NULL (b'segfault-traced' too, its stack logged), b'exit' calls
    os._exit(7), b'sys.exit' sys.exit(5), b'kbint' raises KeyboardInterrupt,
    b'sigkill' kills its own process (what the OOM killer does), b'abort' calls
    abort(); anything else is seconds to sleep (ASCII), and the reply is ``b'<pid>:<message>'``.
    """
    if message in (b"segfault", b"abort"):
        import faulthandler

        faulthandler.disable()  # a real crash, without a traceback dump in the test's output
    if message in (b"segfault", b"segfault-traced"):  # -traced: the worker's faulthandler logs it
        import ctypes

        ctypes.string_at(0)
    elif message == b"exit":
        os._exit(7)
    elif message == b"sys.exit":
        sys.exit(5)
    elif message == b"kbint":
        raise KeyboardInterrupt("from the handler")
    elif message == b"sigkill":
        os.kill(os.getpid(), 9)
    elif message == b"abort":
        os.abort()
    time.sleep(float(message or b"0"))
    return b"%d:%s" % (os.getpid(), message)


def describe(message: bytes) -> bytes:
    """Fails unless the handler is given real bytes, whatever the size."""
    assert type(message) is bytes, type(message)
    return b"%s:%d:%s" % (type(message).__name__.encode(), len(message), message[:4])


def record(message: bytes) -> bytes:
    """b'PATH SECONDS TAG': append TAG to the file PATH as the handler starts (proof that
    the request reached a handler), sleep SECONDS, reply TAG."""
    path, seconds, tag = message.split(b" ", 2)
    with open(path, "ab") as f:
        f.write(tag + b"\n")
    time.sleep(float(seconds))
    return tag


def spin_ms(message: bytes) -> bytes:
    """Busy-loop for int(message) milliseconds of CPU; reply with the request."""
    end = time.perf_counter() + int(message or b"0") / 1000.0
    while time.perf_counter() < end:
        pass
    return message


def measure(message: bytes) -> bytes:
    """Sleep 50 ms, reply with the body's length and its first 8 bytes: big bodies in,
    small replies out."""
    time.sleep(0.05)
    return b"%d:%s" % (len(message), message[:8])


def mixed(message: bytes) -> bytes:
    """b'boom...' raises ValueError; b'sleep S' sleeps S seconds; anything else echoes."""
    if message.startswith(b"boom"):
        raise ValueError("boom")
    if message.startswith(b"sleep "):
        time.sleep(float(message[6:]))
    return message


def chatty(message: bytes) -> bytes:
    """Writes b'out M' with print() (not flushed), b'err M' to sys.stderr, b'fd1 M' straight to
    fd 1 (as a C extension would) and logs b'logged M'; b'thread...' also lets a thread die
    of an uncaught exception (Python prints its traceback). Replies with the worker's pid."""
    import logging
    import sys
    import threading

    text = message.decode()
    print("out", text)
    sys.stderr.write(f"err {text}\n")
    os.write(1, f"fd1 {text}\n".encode())
    logging.getLogger("handlers").warning("logged %s", text)
    if text.startswith("thread"):

        def fail() -> None:
            raise RuntimeError(f"uncaught in a thread: {text}")

        t = threading.Thread(target=fail, name="doomed")
        t.start()
        t.join()
    return str(os.getpid()).encode()


def flood(message: bytes) -> bytes:
    """b'SECONDS SIZE': print lines of SIZE bytes ('x'...) for SECONDS (one at least);
    replies with b'<pid> <lines written>'."""
    import sys

    seconds, size = message.split()
    line, end, n = "x" * int(size) + "\n", time.monotonic() + float(seconds), 0
    while True:
        sys.stdout.write(line)
        n += 1
        if time.monotonic() >= end:
            break
    sys.stdout.flush()
    return b"%d %d" % (os.getpid(), n)


def where(message: bytes) -> bytes:
    """``PID:message``, so a test can tell which process ran a request and check that each
    reply belongs to its own request. ``sleep:S:...`` sleeps S seconds first, ``spin:S:...``
    computes for S seconds (holding the GIL); ``die`` ends the process (os._exit(7))."""
    if message == b"die":
        os._exit(7)
    if message.startswith(b"sleep:"):
        time.sleep(float(message.split(b":")[1]))
    elif message.startswith(b"spin:"):  # pure Python: holds the GIL all along
        end = time.monotonic() + float(message.split(b":")[1])
        while time.monotonic() < end:
            pass
    return b"%d:%s" % (os.getpid(), message)


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")


def unprintable(message: bytes) -> bytes:
    """Raises an exception whose ``__str__`` raises; b'pid' answers the worker's pid."""
    if message == b"pid":
        return b"%d" % os.getpid()
    raise _Unprintable()
