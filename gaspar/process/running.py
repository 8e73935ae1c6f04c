"""How a handler is run in a worker: its result or error as a reply, the client's limits,
and a stream's items. No sockets here: the worker's loop (``gaspar.process.worker``) sends
what these return.

* :func:`call_handler` runs a bytes handler or a typed call and never raises: a result is
  ``(OK, body)``; a handler's exception an error reply (``HANDLER_ERROR``, its type, message
  and traceback); a call refused before it ran (:class:`Refused`) a ``BAD_REQUEST``.
* **The client's limits** (:func:`client_limit`, :class:`SoftLimit`): its
  ``handler_timeout`` and what is left of its deadline interrupt the handler softly
  (``SoftTimeout``, by SIGALRM); the worker lives on.
* :func:`run_stream`: a generator handler's items go out as they are made, within a window
  of credits; a stream whose client left is closed (``GeneratorExit``).
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

from gaspar.errors import SoftTimeout
from gaspar.wire.envelope import limits
from gaspar.wire.framing import Status, error_body

log = logging.getLogger("gaspar")


class SoftLimit:
    """The client's limit on one handler run, as a one-shot SIGALRM timer that raises
    :class:`SoftTimeout` in the handler. Armed only around the handler's call, so a late
    signal never lands in the worker's own loop."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = False  # the last armed limit passed: the handler was interrupted
        self.limit: tuple[float, str] = (0.0, "")
        signal.signal(signal.SIGALRM, self._fire)

    def arm(self, seconds: float, kind: str) -> None:
        self.armed, self.fired, self.limit = True, False, (seconds, kind)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6))

    def disarm(self) -> None:
        if self.armed:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _fire(self, _signum: int, _frame: Any) -> None:
        if self.armed:
            self.armed, self.fired = False, True
            raise SoftTimeout(f"{_describe(*self.limit)} passed; its client is answered as timed out")


class Refused(Exception):
    """A request the worker refuses before its handler runs (a call to an unknown handler,
    arguments that do not bind): answered ``BadRequest``, with ``kind`` as its type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


#: Items a stream may send before its client has taken any (then one more per item taken).
STREAM_WINDOW = 16
#: ...and bytes: past this many in items its client has not taken, a stream waits too (an
#: item larger than this goes alone), so large items cannot multiply the front end's memory.
STREAM_BYTES = 1 << 20


def _describe(seconds: float, kind: str) -> str:
    return f"the client's {kind} ({seconds:.3g}s)"


_OK = bytes([Status.OK])
_ERROR = bytes([Status.HANDLER_ERROR])
_TIMEOUT = bytes([Status.TIMEOUT])
_BAD = bytes([Status.BAD_REQUEST])
ITEM = bytes([Status.ITEM])


def _timeout_body(limit: tuple[float, str], what: str) -> bytes:
    """A reply saying the client's own limit passed (a WorkerTimeout that killed nothing)."""
    seconds, kind = limit
    facts = {"timeout": round(seconds, 6), "limit": kind, "killed": False, "pid": os.getpid()}
    return error_body("WorkerTimeout", f"{_describe(seconds, kind)} {what}", **facts)


def client_limit(head: bytes, waited: float) -> tuple[float, str] | None:
    """The client's limit on a request's handler from its head, ``(seconds from now, which)``
    (``handler_timeout`` or ``deadline``), or None: its ``handler_timeout``, or what is left
    of its deadline once the ``waited`` seconds since the request arrived here are taken
    off, whichever comes first."""
    found = limits(head)
    if found is None:
        return None
    soft_ms, deadline_ms = found
    best = None
    if soft_ms:
        best = (soft_ms / 1000.0, "handler_timeout")
    if deadline_ms:
        left = deadline_ms / 1000.0 - waited
        if best is None or left < best[0]:
            best = (left, "deadline")
    return best


def call_handler(
    fn: Callable[[Any], Any],
    message: Any,
    broadcast: bool = False,
    limit: tuple[float, str] | None = None,
    soft: SoftLimit | None = None,
) -> tuple[bytes, Any]:
    """Run ``fn`` on a request's ``message`` (bytes for a bytes handler: one copy of a large
    one; the frame's buffer for a typed call, decoded in place); return (status byte, body)
    and never raise. With a ``limit``, the handler is interrupted (``SoftTimeout``) when it
    passes; one that has passed already is not run at all."""
    try:
        if limit is None or soft is None:
            result = fn(message)
        elif limit[0] <= 0:
            return _TIMEOUT, _timeout_body(limit, "passed before the handler started; it was not run")
        else:
            try:
                soft.arm(*limit)
                result = fn(message)
            finally:
                soft.disarm()
        if broadcast:
            return _OK, b""
        if isinstance(result, str):
            return _OK, result.encode("utf-8")
        if isinstance(result, (bytes, bytearray, memoryview)):
            return _OK, result
        raise TypeError(f"handler returned {type(result).__name__}, expected bytes or str")
    except Refused as exc:
        return _BAD, error_body(exc.kind, exc.message)
    except Exception as exc:
        if soft is not None:
            soft.armed = False  # raised in the timer's own disarm: it has fired; never again
            if soft.fired and isinstance(exc, SoftTimeout):
                return _TIMEOUT, _timeout_body(soft.limit, "passed; the handler was interrupted, the worker lives on")
        tb = traceback.format_exc()
        return _ERROR, error_body(type(exc).__name__, describe(exc), traceback=tb)


def describe(exc: BaseException) -> str:
    """``str(exc)``, or what says it failed: a handler's exception whose ``__str__`` raises
    must be its error reply, not the end of its worker."""
    try:
        return str(exc)
    except Exception as failed:
        return f"<str() of the exception failed: {type(failed).__name__}>"


def run_stream(
    start: Callable[[Any], Any], message: Any, send_item: Callable[[bytes], None], wait: Callable[[], bool]
) -> tuple[bytes, Any]:
    """Run a streaming call: each item goes out with ``send_item`` as it is made, and
    ``wait()`` after it says whether to go on (it holds the stream while its client has
    not taken enough: the window). Returns the final reply, ``(status, body)``: OK with an
    empty body once the items end, or the error. A stream whose client left is closed
    (``GeneratorExit`` in the handler) and its reply goes nowhere."""
    items = None
    try:
        items = start(message)
        for data in items:
            send_item(data)
            if not wait():
                break
        return _OK, b""
    except Refused as exc:
        return _BAD, error_body(exc.kind, exc.message)
    except Exception as exc:
        return _ERROR, error_body(type(exc).__name__, describe(exc), traceback=traceback.format_exc())
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("Closing a stream's generator failed")


__all__ = ["Refused", "SoftLimit", "STREAM_BYTES", "STREAM_WINDOW", "call_handler", "client_limit", "run_stream"]
