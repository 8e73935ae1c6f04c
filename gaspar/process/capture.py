"""What workers print, as log records: ``capture_output``.

**Capture** (``capture_output``). What a worker writes to its file descriptors 1 and 2 —
``print()``, a C extension's ``write(2, ...)``, the traceback Python prints on its way out —
becomes one log record per line, tagged with the worker's number and pid::

    worker ──fd 1──▶ pipe ──▶ fork server: OutputCapture ──▶ logger "gaspar.worker" (INFO)
           ──fd 2──▶ pipe ──▶     (its own poll loop)     ──▶ logger "gaspar.worker" (WARNING)

The fork server makes the pipes before each fork (it is the workers' parent, and it has no
hub that must never block), reads them in the same loop that forks and reaps, and logs the
lines itself to the daemon's standard error, which it shares with the front end. The front
end does not see them at all.

Honest limits. Each ready pipe gets one read of ``READ_CHUNK`` bytes per turn of the fork
server's loop, after its forks and reaps, and a line longer than ``MAX_LINE`` is cut into
pieces: memory is bounded per worker (``MAX_LINE`` plus a chunk), and each flooding worker
delays a fork or a reap by one chunk's worth of logging at most. A worker that writes
faster than the log can take fills its pipe and blocks in ``write`` (back-pressure on that
worker alone; nothing is dropped); a handler blocked there may run into its ``timeout``.
The fork server's records go to standard error like the front end's: if nobody reads it,
both block alike. A pipe's read end is closed when its worker is reaped, after what is left
in it is logged, so a grandchild that still holds the write end then gets ``EPIPE``. The
fork server's own pid is in the ``[pid]`` of the text format; the worker's is in the message
(and in ``pid`` with ``--log-format json``).

In a worker, logging handlers that wrote to fd 1 or 2 keep writing to the daemon's real
streams (through duplicates of the old descriptors), so a worker's own log records stay
records, formatted once, and are not captured as lines.
"""

from __future__ import annotations

import logging
import os
import selectors
import sys
from typing import Any, TextIO

#: A captured line longer than this (bytes) is logged in pieces of at most this size.
MAX_LINE = 16 * 1024

#: Bytes read from one worker's pipe per turn of the fork server's loop: what a flooding
#: worker can delay a fork or a reap by (logging 4 KiB takes a few ms for lines of tens of
#: bytes, some 50 ms if every line is one character).
READ_CHUNK = 4 * 1024


# -- capture: the pure part ------------------------------------------------------------------------


class LineSplitter:
    """Bytes in, lines out (without their ``\\n``); never holds more than ``limit`` bytes.

    A line longer than ``limit`` comes out in pieces of ``limit`` bytes (cut before a UTF-8
    continuation byte, so a character is not split when it can be helped).
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        if limit < 4:
            raise ValueError("limit must be at least 4 bytes")
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf, limit = self.buf, self.limit
        buf += data
        lines, start = [], 0
        while True:
            nl = buf.find(b"\n", start, start + limit + 1)
            if nl >= 0:
                lines.append(bytes(buf[start:nl]))
                start = nl + 1
            elif len(buf) - start > limit:
                cut = start + limit
                while cut > start + limit - 3 and buf[cut] & 0xC0 == 0x80:
                    cut -= 1
                lines.append(bytes(buf[start:cut]))
                start = cut
            else:
                break
        del buf[:start]
        return lines

    def flush(self) -> list[bytes]:
        """What is left, an unfinished last line (at end of stream)."""
        rest = bytes(self.buf)
        self.buf.clear()
        return [rest] if rest else []


# -- capture: the fork server's side ---------------------------------------------------------------

WORKER_LOG = logging.getLogger("gaspar.worker")
_LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING}


class _Stream:
    __slots__ = ("number", "pid", "name", "splitter")

    def __init__(self, number: int, pid: int, name: str) -> None:
        self.number, self.pid, self.name = number, pid, name
        self.splitter = LineSplitter()


class OutputCapture:
    """The fork server's end of every worker's stdout and stderr pipes.

    ``pipes()`` before a fork; ``child(pipes)`` in the worker; ``attach(pipes, number, pid)``
    in the fork server after the fork (or ``abandon(pipes)`` if the fork failed). The read
    ends are registered on the fork server's selector with :meth:`read` as their data.
    ``close(pid)`` once the worker is reaped: log what is left, close its read ends.
    """

    def __init__(self, selector: selectors.BaseSelector, logger: logging.Logger = WORKER_LOG) -> None:
        self.selector = selector
        self.log = logger
        self.streams: dict[int, _Stream] = {}  # read fd -> its stream
        self.by_pid: dict[int, list[int]] = {}

    def pipes(self) -> tuple[int, int, int, int]:
        """``(out_r, out_w, err_r, err_w)``, made before a fork."""
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError:
            os.close(out_r)
            os.close(out_w)
            raise
        return out_r, out_w, err_r, err_w

    def abandon(self, pipes: tuple[int, int, int, int]) -> None:
        for fd in pipes:
            os.close(fd)

    def attach(self, pipes: tuple[int, int, int, int], number: int, pid: int) -> None:
        out_r, out_w, err_r, err_w = pipes
        os.close(out_w)
        os.close(err_w)
        for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
            os.set_blocking(fd, False)
            self.streams[fd] = _Stream(number, pid, name)
            self.selector.register(fd, selectors.EVENT_READ, self.read)
        self.by_pid[pid] = [out_r, err_r]

    def child(self, pipes: tuple[int, int, int, int]) -> None:
        """In the new worker: let go of every read end, then make the pipes fds 1 and 2."""
        out_r, out_w, err_r, err_w = pipes
        for fd in (*self.streams, out_r, err_r):
            os.close(fd)
        self.streams.clear()
        self.by_pid.clear()
        redirect_output(out_w, err_w)

    def read(self, fd: int) -> None:
        """One bounded read from a worker's pipe; log its complete lines."""
        stream = self.streams.get(fd)
        if stream is None:  # closed earlier in this turn of the loop
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._emit(stream, stream.splitter.feed(data))
        else:  # every writer is gone
            self._emit(stream, stream.splitter.flush())
            self._forget(fd)

    def close(self, pid: int, most: int = 128 * 1024) -> None:
        """The worker ``pid`` was reaped: log what its pipes still hold (``most`` bytes at
        most each, against a grandchild that still writes), then close them."""
        for fd in self.by_pid.pop(pid, []):
            stream = self.streams.get(fd)
            if stream is None:
                continue
            left = most
            while left > 0:
                try:
                    data = os.read(fd, min(READ_CHUNK, left))
                except OSError:  # BlockingIOError included: drained
                    break
                if not data:
                    break
                left -= len(data)
                self._emit(stream, stream.splitter.feed(data))
            self._emit(stream, stream.splitter.flush())
            self._forget(fd)

    def close_all(self) -> None:
        for pid in list(self.by_pid):
            self.close(pid)

    def _forget(self, fd: int) -> None:
        stream = self.streams.pop(fd)
        fds = self.by_pid.get(stream.pid)
        if fds is not None and fd in fds:
            fds.remove(fd)
        self.selector.unregister(fd)
        os.close(fd)

    def _emit(self, stream: _Stream, lines: list[bytes]) -> None:
        level = _LEVELS[stream.name]
        if not lines or not self.log.isEnabledFor(level):
            return
        extra = {"worker": stream.number, "pid": stream.pid, "stream": stream.name}
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            if text:
                self.log.log(level, "[worker %s pid:%s] %s", stream.number, stream.pid, text, extra=extra)


# -- capture: the worker's side --------------------------------------------------------------------


def redirect_output(stdout_fd: int, stderr_fd: int) -> None:
    """In a worker after the fork: fds 1 and 2 become ``stdout_fd`` and ``stderr_fd``
    (which are then closed), ``sys.stdout`` and ``sys.stderr`` write through them a line at
    a time, and logging handlers that wrote to fd 1 or 2 keep the daemon's real streams."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _keep_log_streams()
    for new, fd, name in ((stdout_fd, 1, "stdout"), (stderr_fd, 2, "stderr")):
        os.dup2(new, fd)
        os.close(new)
        stream = getattr(sys, name)
        if _fileno(stream) == fd and hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
        else:  # replaced by something that does not write to the fd (a test runner's capture)
            setattr(sys, name, open(fd, "w", buffering=1, errors="backslashreplace", closefd=False))


def _keep_log_streams() -> None:
    """Point the handlers that write to fd 1 or 2 at duplicates of those fds, made now."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    kept: dict[int, TextIO] = {}
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue
            fd = _fileno(handler.stream)
            if fd not in (1, 2):
                continue
            if fd not in kept:
                old = handler.stream
                encoding = getattr(old, "encoding", None) or "utf-8"
                errors = getattr(old, "errors", None) or "backslashreplace"
                kept[fd] = open(os.dup(fd), "w", buffering=1, encoding=encoding, errors=errors)
            handler.setStream(kept[fd])


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except Exception:
        return None


__all__ = ["LineSplitter", "OutputCapture", "redirect_output", "MAX_LINE", "READ_CHUNK"]
