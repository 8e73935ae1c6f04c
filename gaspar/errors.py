"""The errors gaspar raises, as one tree.

Every error a caller can see derives from :class:`GasparError`, and each one says whose
fault it was::

    GasparError
    ├── RemoteError                  the server answered, with an error status
    │   ├── HandlerError             the handler raised (.remote_type, .remote_message)
    │   ├── WorkerDied               the worker exited mid-request (.pid, .exitcode, .signal)
    │   │   └── WorkerLost           its host went silent (a remote agent: crash, partition,
    │   │                            freeze); the request may have run (.agent, .host)
    │   ├── WorkerTimeout            the handler ran past its timeout; the worker was killed
    │   │                            (also a TimeoutError)
    │   ├── BadRequest               the server refused the request (too large, malformed)
    │   │   └── NoSuchHandler        a typed call named a handler the App does not have
    │   └── ServerUnavailable        the server did not run the request: it is stopping...
    │       └── Overloaded           ...or it shed the request under overload (.reason,
    │                                .queued_ms, .retry_after_ms, .started: always False)
    ├── ConnectFailed                no connection (refused, unreachable); a ConnectionError
    ├── ConnectionLost               the connection broke before a whole reply: reset by the
    │                                server (how a plain reply reports an error) or cut short;
    │                                a ConnectionError
    ├── RequestTimeout               the client's own timeout ran out; a TimeoutError
    ├── ProtocolError                bytes that do not follow the wire protocol; a ValueError
    ├── ClientClosed                 a request on a client after its close(); a RuntimeError
    └── SoftTimeout                  raised *inside a handler*, in its worker, when its
                                     client's limit passes (handler_timeout, deadline); a
                                     TimeoutError

A remote error's facts travel as a JSON object (``type``, ``message`` and, by kind, ``pid``,
``exitcode``, ``signal``, ``timeout``; a handler error's ``traceback`` only when the server's
``error_detail`` is ``traceback``); :func:`error_from_reply` turns a status and that object
into the matching exception in one place. ``str()`` of one is its message, after the remote
type only when that names another class: ``ValueError: bad input`` for a HandlerError, but
``agent a1 ... was lost`` for a WorkerLost, never ``WorkerLost: ...`` twice in a traceback.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "GasparError",
    "RemoteError",
    "HandlerError",
    "WorkerDied",
    "WorkerLost",
    "WorkerTimeout",
    "BadRequest",
    "ServerUnavailable",
    "Overloaded",
    "ConnectFailed",
    "ConnectionLost",
    "RequestTimeout",
    "ProtocolError",
    "ClientClosed",
    "SoftTimeout",
    "error_from_reply",
]


class GasparError(Exception):
    """Base of every error gaspar raises."""


class RemoteError(GasparError):
    """The server replied with an error status; ``facts`` holds what it said."""

    status = -1

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.facts: dict[str, Any] = dict(facts or {})
        self.remote_type: str = self.facts.get("type", type(self).__name__)
        self.remote_message: str = self.facts.get("message", message)


class HandlerError(RemoteError):
    """The handler raised; ``remote_type`` and ``remote_message`` name its exception, and
    ``remote_traceback`` is its traceback when the server sends it (``error_detail =
    traceback``, for development), else None."""

    status = 1

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message, facts)
        self.remote_traceback: str | None = self.facts.get("traceback")


class WorkerTimeout(RemoteError, TimeoutError):
    """The handler ran past the request's timeout; the worker was killed and replaced."""

    status = 2


class WorkerDied(RemoteError):
    """The worker process exited while it handled this request; a new one took its place."""

    status = 3

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message, facts)
        self.pid: int | None = self.facts.get("pid")
        self.exitcode: int | None = self.facts.get("exitcode")
        self.signal: int | None = self.facts.get("signal")


class WorkerLost(WorkerDied):
    """The agent running the request on another host went silent past its liveness limit
    (it crashed, froze, or the network between was cut). Unlike a local death, nobody saw
    the handler end: the request may have run, in part or whole. ``agent`` and ``host``
    name where it was; ``pid`` is the worker's pid on that host."""

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message, facts)
        self.agent: str | None = self.facts.get("agent")
        self.host: str | None = self.facts.get("host")


class BadRequest(RemoteError):
    """The server refused the request without running it (too large, malformed)."""

    status = 4


class NoSuchHandler(BadRequest):
    """A typed call named a handler the server's :class:`gaspar.App` does not have (or the
    server runs a plain bytes handler, not an App)."""


class ServerUnavailable(RemoteError):
    """The server is stopping; the request was not run, or its result was dropped."""

    status = 5


class Overloaded(ServerUnavailable):
    """The server shed the request under overload, before the handler ran: a retry is safe.

    ``reason``: ``queue_delay`` (a standing queue: it waited past the target),
    ``queue_timeout``, ``queue_full`` (``max_queued``) or ``deadline`` (the client's own
    deadline could not be met). ``retry_after_ms`` is the server's estimate of when a retry
    would be served; ``started`` is always False.
    """

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message, facts)
        self.reason: str | None = self.facts.get("reason")
        self.queued_ms: float | None = self.facts.get("queued_ms")
        self.retry_after_ms: float | None = self.facts.get("retry_after_ms")
        self.started: bool = bool(self.facts.get("started", False))


class ConnectFailed(GasparError, ConnectionError):
    """No connection to the server could be made."""


class ConnectionLost(GasparError, ConnectionError):
    """The connection broke before a whole reply arrived."""


class RequestTimeout(GasparError, TimeoutError):
    """The client's own timeout ran out before the reply arrived."""


class ProtocolError(GasparError, ValueError):
    """Bytes that do not follow gaspar's wire protocol."""


class ClientClosed(GasparError, RuntimeError):
    """A request on a client after its ``close()``: a mistake in the caller, never retried
    (a closed client does not quietly open new connections)."""


class SoftTimeout(GasparError, TimeoutError):
    """Raised inside a handler, in its worker, when the client's own limit on the request
    passes (its ``handler_timeout``, or its deadline): the client has been answered already
    and nobody will read the result. Clean up and return (or let it propagate); the worker
    lives on. Like Celery's ``SoftTimeLimitExceeded``, it arrives as a signal (SIGALRM),
    between two bytecodes or in a blocking call: a handler stuck inside C code sees it only
    when it returns to Python, and the operator's ``timeout`` kills it if it never does."""


_BY_STATUS: dict[int, type[RemoteError]] = {
    cls.status: cls for cls in (HandlerError, WorkerTimeout, WorkerDied, BadRequest, ServerUnavailable)
}


def _subclasses(cls: type[RemoteError]) -> list[type[RemoteError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def error_class(status: int, kind: str) -> type[RemoteError]:
    """The one table of error replies. A status names a class (each has ``status``; the
    server sends ``cls.status`` and ``cls.__name__`` as the body's ``type``), and a kind that
    names a subclass of it refines it (``Overloaded`` under ``ServerUnavailable``,
    ``WorkerLost`` under ``WorkerDied``). Any other kind is the remote exception's own type
    (a handler's ``ValueError``), kept as ``remote_type``."""
    base = _BY_STATUS.get(status)
    if base is None:  # a status this client does not know
        return RemoteError
    for cls in _subclasses(base):
        if cls.__name__ == kind:
            return cls
    return base


def error_from_reply(status: int, body: bytes) -> RemoteError:
    """Build the exception for an error reply's status and JSON body."""
    try:
        facts = json.loads(bytes(body).decode("utf-8"))
        if not isinstance(facts, dict):
            raise ValueError("not an object")
    except ValueError:
        facts = {"type": "Unknown", "message": bytes(body).decode("utf-8", "replace")}
    kind = facts.get("type", _BY_STATUS.get(status, RemoteError).__name__)
    cls = error_class(status, kind)
    text = facts.get("message", "")
    if kind == cls.__name__:  # the type is in the traceback already: "gaspar.errors.WorkerLost: ..."
        return cls(text or kind, facts)
    return cls(f"{kind}: {text}" if text else kind, facts)  # another class: "ValueError: boom"
