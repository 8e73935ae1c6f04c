"""The front end's I/O loop: one epoll inside the eventlet hub, and the acceptor.

The hot path does not use a green thread per connection. :class:`IOLoop` is a
``select.epoll`` whose own file descriptor is registered once with the eventlet hub; when it
is readable, one callback handles every ready socket in a batch: accept, read, submit,
write, close, all non-blocking. :class:`Acceptor` takes connections in batches of
:data:`ACCEPT_BATCH` while the listening socket is readable, and resets one past
``max_connections`` at once. Everything here runs in the hub's own greenlet, so nothing here
may block or switch.

**Descriptors.** ``max_connections`` is lowered, with a warning at the start, to what the
process's fd limit leaves (less :data:`FD_MARGIN` for 0MQ, the workers' pipes, lingering and
metrics sockets), so a flood of connections is reset at accept like any past the limit. If
descriptors run out anyway (another part of the process, a lower limit set later), the
acceptor spends a spare descriptor it keeps to accept and reset one connection after another
(as libuv and nginx do) instead of leaving their clients hanging in the kernel's backlog.

**Held accepts.** While every worker is busy and requests already wait (``saturated``), a
new connection's request could only join the queue. The acceptor then stops watching the
listening socket and takes new connections at the start of each round of the loop instead
(a reply from a worker starts one), or after :data:`HOLD` at the latest: a wake-up of the
front end a connection fewer, which at 1 ms handlers is about a tenth of its CPU a request.
A connection waits in the kernel's backlog no longer than that; once a worker is idle, or
nothing waits, the socket is watched again.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

from gaspar.core.admission import ByteBudget
from gaspar.frontend.connection import Connection
from gaspar.frontend.contract import FrontEnd
from gaspar.frontend.linger import Lingering, linger_reset

log = logging.getLogger("gaspar")

ACCEPT_BATCH = 128
#: Linux's ``struct tcp_info`` up to ``tcpi_sacked``: for a listening socket, ``tcpi_unacked``
#: is its accept queue's length now and ``tcpi_sacked`` the queue's limit.
_TCP_INFO = struct.Struct("8B6I")
#: The longest a new connection waits in the backlog while accepts are held (seconds).
HOLD = 0.002
#: Descriptors kept for everything but client connections: 0MQ's sockets and pipes, the
#: workers' and fork server's pipes, lingering and metrics sockets, log files.
FD_MARGIN = 256


def fd_room(max_connections: int, margin: int = FD_MARGIN) -> int:
    """How many client connections the fd limit leaves room for, at most ``max_connections``
    (the soft limit less the descriptors open now and ``margin``; at least 16)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError):
        return max_connections
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = max(16, soft - in_use - margin)
    if room < max_connections:
        log.warning(
            "The fd limit (%s) leaves room for %s client connections, fewer than max_connections (%s): "
            "new connections past %s are reset. Raise it (ulimit -n, systemd's LimitNOFILE=) to serve more.",
            soft,
            room,
            max_connections,
            room,
        )
    return min(room, max_connections)


class IOLoop:
    """One epoll, registered in the eventlet hub; runs ``fd -> callback(events)``."""

    def __init__(self, hub: Any, after_round: Callable[[], None]) -> None:
        self.epoll = select.epoll()
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.after_round = after_round
        self.busy = False  # in a round: after_round will run
        self.hub = hub
        self.acceptor: Acceptor | None = None  # set by the Acceptor: it may hold its accepts
        self._listener = watch_fd(hub, self.epoll.fileno(), self._ready)
        self.lingering = Lingering(self)  # sockets closing after a refused request

    def register(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self.callbacks[fd] = callback
        self.epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Drop a callback whose fd is being closed (the close removes it from the epoll)."""
        self.callbacks.pop(fd, None)

    def unregister(self, fd: int) -> None:
        if self.callbacks.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def _ready(self, _fd: int) -> None:
        self.busy = True
        acceptor = self.acceptor
        if acceptor is not None and acceptor.held:
            acceptor.on_events(0)  # first: their requests may go out in this round
        for fd, events in self.epoll.poll(0, 1024):
            callback = self.callbacks.get(fd)
            if callback is not None:
                try:
                    callback(events)
                except Exception:
                    log.exception("Error on fd %s; carrying on", fd)
                    abort = getattr(getattr(callback, "__self__", None), "abort", None)
                    if abort is not None:
                        abort()  # a connection in an unknown state: reset, never hang
        self.busy = False
        self.after_round()
        if acceptor is not None:
            acceptor.follow()

    def close(self) -> None:
        self.lingering.close_all()
        if self._listener is not None:
            self.hub.remove(self._listener)
            self._listener = None
        self.epoll.close()


class Acceptor:
    """Accepts connections in batches while the listening socket is readable."""

    def __init__(self, sock: socket.socket, loop: IOLoop, front: FrontEnd) -> None:
        self.sock, self.loop, self.front = sock, loop, front
        self.family = int(sock.family)
        sock.setblocking(False)
        loop.register(sock.fileno(), select.EPOLLIN, self.on_events)
        self.max_connections = fd_room(front.settings.max_connections)
        self.paused = False  # out of descriptors, and no spare one to answer with
        self._spare = _spare_fd()  # spent to accept and reset a connection when none is left
        self.held = False  # saturated: accepting at the start of each round (see above)
        loop.acceptor = self

    def on_events(self, _events: int) -> int:
        """Accept up to a batch; return how many were accepted."""
        for n in range(ACCEPT_BATCH):
            try:
                fd, _ = self.sock._accept()  # socket.accept() minus its enum conversions
                # the C socket type: socket.socket's Python __init__ and close() cost more
                # than they give a connection that only sends, receives and closes
                sock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            except BlockingIOError:
                return n
            except OSError as exc:  # EMFILE and friends
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare >= 0:
                    if self._reset_one():
                        continue
                    return n  # nothing was waiting (the kernel says EMFILE before it looks)
                self.front.log_refusal("accept() failed: %s; pausing for 0.1 s", exc)
                self.pause(0.1)  # instead of spinning
                return n
            if len(self.front.connections) >= self.max_connections:
                self.refuse(sock, "max_connections (%s) reached; resetting new connections", self.max_connections)
                continue
            Connection(sock, self.front).start()
        return ACCEPT_BATCH

    def backlog(self) -> tuple[int, int] | None:
        """``(waiting, limit)``: connections the kernel has completed that wait in the
        listening socket's accept queue, and the queue's limit (``backlog``). None where
        the kernel does not say (not Linux) or the socket is closed.

        The queue the overload control does not see: a connection waits there before its
        request is read. It stays near 0 while the front end keeps up; when the front end
        itself is the bottleneck (handlers of microseconds, tens of thousands of new
        connections a second), clients wait there, and once it is full the kernel drops
        their SYNs (a client's connect then takes a second or more)."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except (OSError, AttributeError):
            return None
        if len(info) < _TCP_INFO.size:
            return None
        fields = _TCP_INFO.unpack(info)
        return fields[12], fields[13]

    def refuse(self, sock: _socket.socket, why: str, *args: Any) -> None:
        """Reset a connection as soon as it is accepted (past ``max_connections``, or out of
        descriptors), counted and logged (rate-limited) with ``why``."""
        self.front.counters.refused_connections += 1
        linger_reset(sock)
        sock.close()
        self.front.log_refusal(why, *args)

    def _reset_one(self) -> bool:
        """Out of descriptors: free the spare, accept and reset one connection with it, take
        the spare again. False when nothing was waiting."""
        os.close(self._spare)
        try:
            fd, _ = self.sock._accept()
        except OSError:
            self._spare = _spare_fd()
            return False
        sock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        self.refuse(sock, "Out of file descriptors; resetting new connections (raise the fd limit)")
        self._spare = _spare_fd()  # its descriptor again
        return True

    def accept_all(self) -> None:
        """Take every connection waiting in the kernel's backlog."""
        while self.sock.fileno() >= 0 and self.on_events(0) == ACCEPT_BATCH:
            pass

    def pause(self, seconds: float) -> None:
        if not self.paused:
            self.paused = True
            self.loop.modify(self.sock.fileno(), 0)
            self.loop.hub.schedule_call_global(seconds, self.resume)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._watch()

    def follow(self) -> None:
        """After a round of the loop: hold accepts while the front end is saturated, watch
        the listening socket again once it is not."""
        if self.front.saturated():
            if not self.held and not self.paused and self.sock.fileno() >= 0:
                self.held = True
                self.loop.modify(self.sock.fileno(), 0)
                self.loop.hub.schedule_call_global(HOLD, self.release)
        elif self.held:
            self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self._watch()

    def _watch(self) -> None:
        """Watch the listening socket again, unless accepts are still paused or held."""
        if not self.paused and not self.held and self.sock.fileno() >= 0:
            self.loop.modify(self.sock.fileno(), select.EPOLLIN)

    def close(self) -> None:
        self.held = False  # nothing to take at the start of a round any more
        if self.sock.fileno() >= 0:
            self.loop.unregister(self.sock.fileno())
            self.sock.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1


def _spare_fd() -> int:
    """A descriptor kept to be given up when none is left (-1 if none could be had)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class Waker:
    """Connections waiting for the byte budget that may read now (``ByteBudget.ready``):
    resumed soon, in order, outside the caller (which is freeing bytes, maybe mid-delivery)."""

    def __init__(self, budget: ByteBudget, hub: Any) -> None:
        self.budget, self.hub = budget, hub
        self.waking: set[Connection] = set()
        self.scheduled = False

    def wake(self, conns: list[Connection]) -> None:
        if conns:
            self.waking.update(conns)
            if not self.scheduled:
                self.scheduled = True
                self.hub.schedule_call_global(0, self._resume)

    def _resume(self) -> None:
        self.scheduled = False
        for conn in self.budget.ready():
            if conn in self.waking:
                conn.resume()
        self.waking.clear()


def watch_fd(hub: Any, fd: int, callback: Callable[[int], None]) -> Any:
    """Have eventlet's hub call ``callback(fd)`` whenever ``fd`` is readable; returns the
    listener, for ``hub.remove``. The callback runs in the hub's greenlet: it must not block."""
    return hub.add(hub.READ, fd, callback, _ignore, _noop)


def _ignore(*_args: Any) -> None:
    pass


def _noop() -> None:
    pass


__all__ = ["Acceptor", "Waker", "IOLoop", "watch_fd", "ACCEPT_BATCH", "HOLD"]
