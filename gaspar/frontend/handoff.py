"""Hand calls from other threads, and signals, to the producer's hub thread.

One pipe wakes the hub: Python's signal wakeup fd writes each signal's number into it, and
:meth:`Control.call` writes a zero byte after queueing a call. The signal handlers do
nothing else (gunicorn's rule: a handler only queues the signal); the hub reads the pipe
and runs the queued work in its own thread. The previous handlers are restored on detach.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import eventlet
import eventlet.hubs

from gaspar.frontend.hub import watch_fd

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class _Call:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class Control:
    def __init__(self) -> None:
        self._calls: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._r = self._w = -1
        self._listener = None
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup = -1
        self._on_signal: Callable[[int], None] = lambda sig: None

    def attach(self, install_signals: bool, on_signal: Callable[[int], None]) -> None:
        """Start taking calls (and signals); runs in the hub thread."""
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        hub = eventlet.hubs.get_hub()
        self._listener = watch_fd(hub, self._r, self._readable)
        self._on_signal = on_signal
        if install_signals:
            for sig in SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, _queued)
            self._old_wakeup = signal.set_wakeup_fd(self._w)
        with self._lock:
            self._thread = threading.current_thread()
        self._wake()  # calls queued before we attached

    def detach(self) -> None:
        with self._lock:
            self._thread = None
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_handlers.clear()
        if self._listener is not None:
            eventlet.hubs.get_hub().remove(self._listener)
            self._listener = None
        self._run_calls()  # nothing waits on a hub that is gone
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def call(self, fn: Callable[[], Any], wait: bool = True, timeout: float = 30.0) -> Any:
        """Run ``fn`` in the hub thread; with ``wait``, return its result (or raise its error)."""
        with self._lock:
            attached = self._thread is not None
            here = self._thread is threading.current_thread()
            if attached and not here:
                item = _Call(fn)
                self._calls.append(item)
        if not attached or here:
            return fn()
        self._wake()
        if not wait:
            return None
        if not item.done.wait(timeout):
            raise TimeoutError("the producer's hub did not answer")
        if item.error is not None:
            raise item.error
        return item.result

    def _wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake is pending anyway) or closed

    def _readable(self, _fd: int) -> None:
        # runs in the hub's own greenlet, which must not block: hand the work to a green thread
        try:
            data = os.read(self._r, 4096)
        except BlockingIOError:
            data = b""
        eventlet.spawn_n(self._handle, data)

    def _handle(self, data: bytes) -> None:
        for byte in data:
            if byte:
                self._on_signal(byte)
        self._run_calls()

    def _run_calls(self) -> None:
        while self._calls:
            item = self._calls.popleft()
            try:
                item.result = item.fn()
            except BaseException as exc:  # handed back to the caller's thread
                item.error = exc
            item.done.set()


def _queued(signum: int, frame: Any) -> None:
    """The signal's number is already in the wakeup pipe; the hub handles it."""
