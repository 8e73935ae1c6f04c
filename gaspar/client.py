"""Talking to a gaspar server from Python, with plain ``socket``.

Because it uses only the standard ``socket`` module, eventlet's or gevent's monkey
patching makes every call here green: N requests from N green threads wait concurrently.

* :func:`request` sends one request on a new connection and returns the reply's bytes.
  It asks for an extended (framed) reply, so an error arrives as a typed exception with the
  server's message, never as data.
* :class:`Client` keeps persistent connections (the KEEPALIVE extension) and reuses them;
  :meth:`Client.pipeline` sends many requests on one connection at once.
* :func:`pack` is gaspar 1.0's: the 4-byte length, then the message.

Low-level socket errors are translated in one place, :func:`_translate`.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import ConnectFailed, ConnectionLost, GasparError, ProtocolError, RequestTimeout, error_from_reply
from .framing import REPLY_HEADER, Status, extended_header, pack, parse_reply_header

__all__ = ["pack", "request", "Client", "parse_address"]


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) or a ``(host, port)`` tuple."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"HOST:PORT with a port from 0 to 65535, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout

    def left(self) -> float | None:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"no reply within {self.timeout}s")
        return left


@contextmanager
def _translate(address: tuple[str, int], deadline: _Deadline) -> Iterator[None]:
    """Socket errors become gaspar's, with the address and the cause chained."""
    try:
        yield
    except GasparError:
        raise  # already ours (a WorkerTimeout is a TimeoutError too: keep it)
    except TimeoutError as exc:
        raise RequestTimeout(f"no reply from {address[0]}:{address[1]} within {deadline.timeout}s") from exc
    except (ConnectionRefusedError, socket.gaierror) as exc:
        raise ConnectFailed(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
    except ConnectionError as exc:
        if isinstance(exc, (ConnectFailed, ConnectionLost)):
            raise
        raise ConnectionLost(f"connection to {address[0]}:{address[1]} lost: {exc}") from exc
    except OSError as exc:
        raise ConnectFailed(f"cannot reach {address[0]}:{address[1]}: {exc}") from exc


def _connect(address: tuple[str, int], deadline: _Deadline) -> socket.socket:
    sock = socket.create_connection(address, timeout=deadline.left())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int, deadline: _Deadline) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        sock.settimeout(deadline.left())
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            raise ConnectionLost(f"reply cut short: {got} of {n} bytes")
        got += k
    return buf


def _read_reply(sock: socket.socket, deadline: _Deadline) -> tuple[int, bytes]:
    """One framed reply: (tag, body); raises the server's error for an error status."""
    length, tag, status = parse_reply_header(_recv_exact(sock, REPLY_HEADER.size, deadline))
    body = bytes(_recv_exact(sock, length, deadline)) if length else b""
    if status != Status.OK:
        raise error_from_reply(status, body)
    return tag, body


def request(
    address: str | tuple[str, int],
    message: bytes,
    timeout: float | None = None,
    handler_timeout: float | None = None,
    stats: bool = False,
) -> bytes:
    """Send one request and return the reply's bytes.

    ``timeout`` bounds the whole call (connect, send, reply) on this side; past it,
    :class:`~gaspar.errors.RequestTimeout`. ``handler_timeout`` asks the server to run the
    handler for at most that long instead of its own ``timeout`` setting. ``stats`` asks for
    the server's counters (JSON) instead of running the handler.
    """
    addr = parse_address(address)
    deadline = _Deadline(timeout)
    with _translate(addr, deadline):
        sock = _connect(addr, deadline)
        try:
            sock.settimeout(deadline.left())
            head = extended_header(len(message), timeout=handler_timeout, stats=stats)
            sock.sendall(head + bytes(message))
            return _read_reply(sock, deadline)[1]
        finally:
            sock.close()


class Client:
    """Persistent connections to one server, reused across requests; safe to share
    between green threads (and OS threads): each request borrows a connection of its own.
    """

    def __init__(self, address: str | tuple[str, int], timeout: float | None = None, max_idle: int = 16) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._tags = itertools.count(1)
        self._closed = False

    def request(self, message: bytes, timeout: float | None = None, handler_timeout: float | None = None) -> bytes:
        """Send one request on a pooled connection and return the reply's bytes."""
        return self.pipeline([message], timeout=timeout, handler_timeout=handler_timeout)[0]

    def pipeline(
        self, messages: Iterable[bytes], timeout: float | None = None, handler_timeout: float | None = None
    ) -> list[bytes]:
        """Send every message on one connection before reading, and return the replies in
        the messages' order. The server runs them concurrently, on as many workers as are
        idle. An error reply raises (the other replies are lost with it)."""
        messages = [bytes(m) for m in messages]
        if not messages:
            return []
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        sock, reused = self._borrow(deadline)
        tags = [next(self._tags) & 0xFFFFFFFF for _ in messages]
        payload = b"".join(
            extended_header(len(m), tag=t, keepalive=True, timeout=handler_timeout) + m
            for t, m in zip(tags, messages, strict=True)
        )
        replies: dict[int, bytes] = {}
        ok = False
        try:
            with _translate(self.address, deadline):
                try:
                    sock.settimeout(deadline.left())
                    sock.sendall(payload)
                    replies.update([_read_reply(sock, deadline)])
                except ConnectionError:
                    if not reused:
                        raise
                    # the server closed an idle pooled connection: nothing ran; go again once
                    sock.close()
                    sock, reused = _connect(self.address, deadline), False
                    sock.settimeout(deadline.left())
                    sock.sendall(payload)
                    replies.update([_read_reply(sock, deadline)])
                while len(replies) < len(tags):
                    replies.update([_read_reply(sock, deadline)])
            ok = True
        finally:
            self._give_back(sock, ok)
        try:
            return [replies[t] for t in tags]
        except KeyError:
            raise ProtocolError("a reply's tag matched no request") from None

    def _borrow(self, deadline: _Deadline) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        with _translate(self.address, deadline):
            return _connect(self.address, deadline), False

    def _give_back(self, sock: socket.socket, ok: bool) -> None:
        with self._lock:
            if ok and not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
