"""How a client connection's socket is closed: with a reset, or lingering until its client
has stopped sending.

**A reset** (:func:`linger_reset`) when a client must never take the close for a clean, empty
reply: a plain (gaspar 1.0) client learns of an error that way.

**Lingering** (:class:`Lingering`) when a request was refused from its header alone (over
``max_message_size``, an unknown flag) while its client may still be sending the body. Closing
a socket with unread bytes makes the kernel reset it and drop what it had not sent yet, the
refusal included: a client that sent a 100 KB body over the limit saw ``ConnectionLost``
instead of the ``BadRequest`` it is owed. So the socket's write side is shut (the refusal, then
the FIN), and what still arrives is read and dropped until the client closes its side, or
:data:`LINGER` seconds pass, or as many bytes as the refused request declared (and a little
more) were dropped; then it is closed. As nginx's ``lingering_close`` and Apache's lingering
close do, for the same reason.

What a hostile client can hold this way is bounded: :data:`MAX_LINGERING` sockets at once
(past that, a socket is closed at once, a reset as before), each for :data:`LINGER` seconds at
most, read into one shared scratch buffer (no memory per socket).
"""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

#: The longest a socket lingers (seconds).
LINGER = 2.0
#: At most this many sockets linger at once.
MAX_LINGERING = 64
#: Dropped past the refused request's declared length before the socket is closed anyway.
SLACK = 64 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
_SCRATCH = memoryview(bytearray(64 * 1024))  # what is read is dropped: one buffer for all


def linger_reset(sock: socket.socket) -> None:
    """Make the coming close a reset (SO_LINGER 0): never taken for a clean (empty) reply."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # the socket is already broken: closing it is all there is to do


class Lingering:
    """The sockets lingering, on the front end's I/O loop (``gaspar.frontend.hub.IOLoop``)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.socks: dict[int, tuple[socket.socket, Any, list[int]]] = {}  # fd -> sock, timer, [bytes left]

    def __len__(self) -> int:
        return len(self.socks)

    def close(self, sock: socket.socket, declared: int) -> None:
        """Close ``sock`` once its client has sent the rest of a refused request of
        ``declared`` bytes (or stopped sending, or closed its side), within LINGER seconds.
        The socket's fd is registered in the loop's epoll (a connection's)."""
        fd = sock.fileno()
        if len(self.socks) >= MAX_LINGERING or fd < 0:
            sock.close()
            return
        try:
            sock.shutdown(socket.SHUT_WR)  # what was written goes out, then the FIN
            self.loop.modify(fd, _EVENTS)  # level-triggered reads from now on
        except OSError:
            sock.close()  # the client is gone already
            return
        timer = self.loop.hub.schedule_call_global(LINGER, self._end, fd)
        self.socks[fd] = (sock, timer, [declared + SLACK])
        self.loop.callbacks[fd] = lambda _events: self._drop(fd)
        self._drop(fd)  # what is there already

    def _drop(self, fd: int) -> None:
        entry = self.socks.get(fd)
        if entry is None:
            return
        sock, _, left = entry
        while True:
            try:
                n = sock.recv_into(_SCRATCH)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                n = 0  # reset by the client: nothing more to wait for
            left[0] -= n
            if n == 0 or left[0] <= 0:
                self._end(fd)
                return

    def _end(self, fd: int) -> None:
        entry = self.socks.pop(fd, None)
        if entry is None:
            return
        sock, timer, _ = entry
        timer.cancel()
        self.loop.forget(fd)  # the close drops it from the epoll
        sock.close()

    def close_all(self) -> None:
        """The front end stops: close every lingering socket now."""
        for fd in list(self.socks):
            self._end(fd)
