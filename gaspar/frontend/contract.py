"""What a client connection and the acceptor need of the front end, written down.

The Producer is the one front end; :class:`FrontEnd` says which of its parts a
:class:`gaspar.frontend.connection.Connection` and the acceptor (``hub.py``) use, so that
neither imports the Producer, and the connection does not import the loop that calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gaspar.core.admission import ByteBudget
from gaspar.frontend.outcomes import Outcomes
from gaspar.wire.framing import Request


@dataclass
class ConnectionCounters:
    """What the connections count, for ``gaspar stats``' counters."""

    abandoned: int = 0  # clients that left while a request of theirs waited
    refused_connections: int = 0  # past max_connections
    idle_resets: int = 0  # stalled past idle_timeout: a request half sent, replies unread, no memory
    slow_requests: int = 0  # requests arriving slower than body_min_rate
    replies_cut: int = 0  # replies or stream items not written whole: their connection ended first
    reply_bytes_cut: int = 0  # their bytes left unwritten

    def cut(self, replies: int, unsent: int) -> None:
        self.replies_cut += replies
        self.reply_bytes_cut += unsent


class Loop(Protocol):
    """The I/O loop, as a connection sees it (``gaspar.frontend.hub.IOLoop``)."""

    hub: Any  # eventlet's
    lingering: Any  # gaspar.frontend.linger.Lingering: sockets closing after a refused request

    def register(self, fd: int, events: int, callback: Callable[[int], None]) -> None: ...

    def forget(self, fd: int) -> None: ...


class FrontEnd(Protocol):
    """The front end's settings, loop and books, how requests end (``outcomes``), and seven
    verbs. ``conn`` below is a ``Connection``."""

    settings: Any  # max_message_size, max_pipeline, abort_on_close, max_connections, body_*
    ioloop: Loop
    connections: set[Any]  # the open ones
    budget: ByteBudget  # max_buffered_bytes
    outcomes: Outcomes  # bad requests, clients gone, the access log
    counters: ConnectionCounters

    def log_refusal(self, message: str, *args: Any) -> None:
        """Log why a request or a connection was refused or reset, rate-limited (a flood of
        bad requests must not become a flood of log lines)."""

    def saturated(self) -> bool:
        """Every worker is busy and requests already wait: a new request would only queue."""

    def submit(self, conn: Any, request: Request) -> None:
        """A whole request was read: queue it for a worker (``conn.deliver`` answers it)."""

    def settle(self) -> None:
        """Requests were cancelled: revoke those handed ahead to a worker."""

    def credit(self, streams: list[Any]) -> None:
        """Items of these streams (``Pending``) were written: their workers may send more."""

    def hold(self, conn: Any, on: bool) -> None:
        """``conn`` stopped (``on``) or resumed reading its replies (over ``MAX_UNSENT``
        unsent): none more of its requests goes to a worker meanwhile."""

    def wake_starved(self, conns: list[Any]) -> None:
        """Budget bytes were freed: read these connections again, in turn."""

    def write_soon(self, conn: Any) -> None:
        """Replies were delivered to ``conn``: ``conn.write()`` at the end of the 0MQ round
        that delivered them (at once outside a round)."""
