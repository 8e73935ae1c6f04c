"""Talking to a gaspar server from Python, with plain ``socket``.

Because it uses only the standard ``socket`` module, eventlet's or gevent's monkey
patching makes every call here green: N requests from N green threads wait concurrently.

* :func:`request` sends one request on a new connection and returns the reply's bytes.
  It asks for an extended (framed) reply, so an error arrives as a typed exception with the
  server's message, never as data.
* :class:`Client` keeps persistent connections (the KEEPALIVE extension) and reuses them;
  :meth:`Client.pipeline` sends many requests on one connection at once.
* :func:`pack` is gaspar 1.0's: the 4-byte length, then the message.

**Timeouts and deadlines.** Every call has a timeout (``DEFAULT_TIMEOUT``, 60 s, unless
given; ``None`` waits for ever), and sends what is left of it to the server as the
request's deadline: a request the server could not start in time is dropped there, never
run for nobody.

**Retries.** A request the server shed under overload (:class:`~gaspar.errors.Overloaded`,
``started`` false: the handler never ran) is retried once, after the server's
``retry_after_ms`` with jitter, if the timeout leaves room and while retries stay under
10% of this client's requests (:class:`gaspar.retry.RetryBudget`); otherwise it raises.
``retry=False`` turns this off.

Low-level socket errors are translated in one place, :func:`_translate`.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from gaspar.errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    GasparError,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    error_from_reply,
)
from gaspar.retry import RetryBudget, backoff
from gaspar.wire import calls
from gaspar.wire.framing import REPLY_HEADER, Status, extended_header, pack, parse_reply_header

__all__ = ["pack", "request", "Client", "parse_address", "DEFAULT_TIMEOUT"]

#: Seconds a call waits for its reply when no timeout is given.
DEFAULT_TIMEOUT = 60.0


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

    def remaining(self) -> float | None:
        """Seconds left (0 when past), None without a timeout; never raises."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())


class _SharedBudget:
    """A RetryBudget shared by threads (and green threads)."""

    def __init__(self) -> None:
        self._budget = RetryBudget()
        self._lock = threading.Lock()

    def on_request(self) -> None:
        with self._lock:
            self._budget.on_request()

    def retry_delay(self, exc: Overloaded, deadline: _Deadline) -> float | None:
        """Seconds to wait before retrying a shed request, or None: do not retry."""
        retry_after = exc.retry_after_ms / 1000.0 if exc.retry_after_ms else None
        delay = backoff(retry_after, deadline.remaining())
        if delay is None or exc.started:
            return None
        with self._lock:
            return delay if self._budget.try_retry() else None


_budget = _SharedBudget()  # for request(): one per process


def as_bytes(message: bytes | str) -> bytes:
    """A request's bytes: a ``str`` is sent UTF-8 encoded, anything else goes through
    ``bytes()`` (bytes, bytearray, memoryview)."""
    return message.encode() if isinstance(message, str) else bytes(message)


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


def _recv_body(sock: socket.socket, n: int, deadline: _Deadline) -> bytes:
    """A reply's body. A large one is read in pieces joined at the end: zeroing a buffer of
    its size first (hundreds of MB) would stop reading for a second, and a front end short
    of memory resets a client that leaves its reply unread that long."""
    if n <= 1 << 20:
        return bytes(_recv_exact(sock, n, deadline))
    chunks, got = [], 0
    while got < n:
        sock.settimeout(deadline.left())
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionLost(f"reply cut short: {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket, deadline: _Deadline) -> tuple[int, int, bytes]:
    """One framed reply: (tag, status, body)."""
    length, tag, status = parse_reply_header(_recv_exact(sock, REPLY_HEADER.size, deadline))
    body = _recv_body(sock, length, deadline) if length else b""
    return tag, status, body


def _read_reply(sock: socket.socket, deadline: _Deadline) -> tuple[int, bytes]:
    """One framed reply: (tag, body); raises the server's error for an error status."""
    tag, status, body = _read_frame(sock, deadline)
    if status != Status.OK:
        raise error_from_reply(status, body)
    return tag, body


def request(
    address: str | tuple[str, int],
    message: bytes | str,
    timeout: float | None = DEFAULT_TIMEOUT,
    handler_timeout: float | None = None,
    stats: bool = False,
    *,
    deadline: bool = True,
    retry: bool = True,
) -> bytes:
    """Send one request and return the reply's bytes.

    ``timeout`` bounds the whole call (connect, send, reply) on this side; past it,
    :class:`~gaspar.errors.RequestTimeout`. With ``deadline`` (the default) what is left of
    it travels with the request, so the server drops it rather than run it too late.
    ``handler_timeout`` asks the server to run the handler for at most that long instead of
    its own ``timeout`` setting. ``stats`` asks for the server's counters (JSON) instead of
    running the handler. ``retry``: retry once a request shed under overload (see above).
    A ``str`` message is sent UTF-8 encoded.
    """
    addr = parse_address(address)
    message = as_bytes(message)
    limit = _Deadline(timeout)
    _budget.on_request()
    try:
        return _request_once(addr, message, limit, handler_timeout, stats, deadline)
    except Overloaded as exc:
        delay = _budget.retry_delay(exc, limit) if retry else None
        if delay is None:
            raise
    time.sleep(delay)  # green under eventlet's or gevent's monkey patching
    return _request_once(addr, message, limit, handler_timeout, stats, deadline)


def _request_once(
    addr: tuple[str, int], message: bytes, limit: _Deadline, handler_timeout: float | None, stats: bool, deadline: bool
) -> bytes:
    with _translate(addr, limit):
        sock = _connect(addr, limit)
        try:
            sock.settimeout(limit.left())
            left = limit.remaining() if deadline else None
            head = extended_header(len(message), timeout=handler_timeout, stats=stats, deadline=left)
            sock.sendall(head + message)
            return _read_reply(sock, limit)[1]
        finally:
            sock.close()


class Client:
    """Persistent connections to one server, reused across requests; safe to share
    between green threads (and OS threads): each request borrows a connection of its own.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        timeout: float | None = DEFAULT_TIMEOUT,
        max_idle: int = 16,
        *,
        deadline: bool = True,
        retry: bool = True,
    ) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self.max_idle = max_idle
        self.deadline = deadline  # send what is left of the timeout as the deadline
        self.retry = retry
        self._budget = _SharedBudget()
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._tags = itertools.count(1)
        self._closed = False

    def request(
        self, message: bytes | str, timeout: float | None = None, handler_timeout: float | None = None
    ) -> bytes:
        """Send one request on a pooled connection and return the reply's bytes; a request
        shed under overload is retried once (see the module docstring). After
        :meth:`close`, raises :class:`~gaspar.errors.ClientClosed`."""
        return self._once((as_bytes(message),), timeout, handler_timeout, call=False)

    def call(
        self,
        name: str,
        /,
        *args: Any,
        timeout: float | None = None,
        handler_timeout: float | None = None,
        codec: str = "msgpack",
        **kwargs: Any,
    ) -> Any:
        """Call the handler ``name`` of the server's :class:`gaspar.App` with these
        arguments and return its decoded result (``codec``: ``msgpack``, or ``pickle`` if
        the App allows it). Errors as for :meth:`request`, and
        :class:`~gaspar.errors.NoSuchHandler` or :class:`~gaspar.errors.BadRequest` for a
        name or arguments the server refused before running anything."""
        reply = self._once(calls.call_parts(name, args, kwargs, codec), timeout, handler_timeout, call=True)
        return calls.decode_result(codec, reply)

    def stream(
        self, name: str, /, *args: Any, timeout: float | None = None, codec: str = "msgpack", **kwargs: Any
    ) -> Iterator[Any]:
        """Call a generator handler and iterate its items as they arrive. ``timeout``
        bounds the wait for each item (not the whole stream). The stream has a connection
        of its own; leaving the loop early closes it, which ends the generator in its
        worker (``GeneratorExit``) and frees the worker."""
        body = calls.encode_call(name, args, kwargs, codec)
        wait = self.timeout if timeout is None else timeout
        limit = _Deadline(wait)
        sock, reused = self._borrow(limit)
        done = False
        try:
            with _translate(self.address, limit):
                payload = extended_header(len(body), keepalive=True, stream=True) + body
                sock, (_, status, data) = self._exchange(sock, reused, payload, limit, _read_frame)
            while True:
                if status == Status.ITEM:
                    yield calls.decode_result(codec, data)
                    limit = _Deadline(wait)  # each item has the whole timeout
                    with _translate(self.address, limit):
                        _, status, data = _read_frame(sock, limit)
                    continue
                done = True
                if status != Status.OK:
                    raise error_from_reply(status, data)
                return
        finally:
            self._give_back(sock, done)  # a stream left early: its connection is closed

    def _once(self, body: tuple[bytes, ...], timeout: float | None, handler_timeout: float | None, call: bool) -> bytes:
        """One request or call, retried once if shed (see the module docstring)."""
        limit = _Deadline(self.timeout if timeout is None else timeout)
        self._budget.on_request()
        try:
            return self._pipeline([body], limit, handler_timeout, call)[0]
        except Overloaded as exc:
            delay = self._budget.retry_delay(exc, limit) if self.retry else None
            if delay is None:
                raise
        time.sleep(delay)
        return self._pipeline([body], limit, handler_timeout, call)[0]

    def pipeline(
        self, messages: Iterable[bytes | str], timeout: float | None = None, handler_timeout: float | None = None
    ) -> list[bytes]:
        """Send every message on one connection before reading, and return the replies in
        the messages' order. The server runs them concurrently, on as many workers as are
        idle. An error reply raises (the other replies are lost with it); nothing is retried."""
        messages = [(as_bytes(m),) for m in messages]
        if not messages:
            return []
        return self._pipeline(messages, _Deadline(self.timeout if timeout is None else timeout), handler_timeout)

    def _pipeline(
        self, messages: list[tuple[bytes, ...]], deadline: _Deadline, handler_timeout: float | None, call: bool = False
    ) -> list[bytes]:
        """Each message's body in parts, all written behind their headers in one join."""
        sock, reused = self._borrow(deadline)
        tags = [next(self._tags) & 0xFFFFFFFF for _ in messages]
        left = deadline.remaining() if self.deadline else None
        chunks: list[bytes] = []
        for tag, parts in zip(tags, messages, strict=True):
            size = sum(map(len, parts))
            head = extended_header(size, tag=tag, keepalive=True, timeout=handler_timeout, deadline=left, call=call)
            chunks += (head, *parts)
        payload = b"".join(chunks)
        replies: dict[int, bytes] = {}
        ok = False
        try:
            with _translate(self.address, deadline):
                sock, first = self._exchange(sock, reused, payload, deadline, _read_reply)
                replies.update([first])
                while len(replies) < len(tags):
                    replies.update([_read_reply(sock, deadline)])
            ok = True
        finally:
            self._give_back(sock, ok)
        try:
            return [replies[t] for t in tags]
        except KeyError:
            raise ProtocolError("a reply's tag matched no request") from None

    def _exchange(
        self, sock: socket.socket, reused: bool, payload: bytes, deadline: _Deadline, read: Callable[..., Any]
    ) -> tuple[socket.socket, Any]:
        """Send ``payload`` and ``read`` the first answer; returns the socket it went on. A
        pooled connection the server closed while idle (``idle_timeout``, a restart) is
        replaced once: the server never read the request, so nothing ran."""
        try:
            sock.settimeout(deadline.left())
            sock.sendall(payload)
            return sock, read(sock, deadline)
        except ConnectionError:
            if not reused:
                raise
        sock.close()
        fresh = _connect(self.address, deadline)
        try:
            fresh.settimeout(deadline.left())
            fresh.sendall(payload)
            return fresh, read(fresh, deadline)
        except BaseException:
            fresh.close()
            raise

    def _borrow(self, deadline: _Deadline) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._closed:
                raise ClientClosed("this Client is closed; make a new one")
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
