"""An asyncio client for gaspar.

* :func:`request`: one request on a new connection, like :func:`gaspar.client.request`.
* :class:`Client`: one persistent connection that carries every concurrent request of the
  application at once (the KEEPALIVE extension, pipelined): each request gets a tag, a
  reader task matches replies to their futures by tag, whatever order they finish in.
  A lost connection fails the requests on it (``ConnectionLost``) and the next request
  opens a new one.

Both send what is left of their timeout (``DEFAULT_TIMEOUT``, 60 s, unless given) as the
request's deadline, and retry once a request shed under overload, within a retry budget,
as :mod:`gaspar.client` does.

Framing is :mod:`gaspar.wire.framing`'s; errors are :mod:`gaspar.errors`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gaspar.client import DEFAULT_TIMEOUT, as_bytes, parse_address
from gaspar.errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    GasparError,
    Overloaded,
    RequestTimeout,
    error_from_reply,
)
from gaspar.retry import RetryBudget, backoff
from gaspar.wire import calls
from gaspar.wire.framing import REPLY_HEADER, Status, extended_header, parse_reply_header

__all__ = ["request", "Client"]


async def _open(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    try:
        head = await reader.readexactly(REPLY_HEADER.size)
        length, tag, status = parse_reply_header(head)
        body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ConnectionLost(f"reply cut short: {exc}") from exc
    return tag, status, body


def _result(status: int, body: bytes) -> bytes:
    if status != Status.OK:
        raise error_from_reply(status, body)
    return body


_budget = RetryBudget()  # for request(): one per process (asyncio is one thread)


if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[bytes], seconds: float | None) -> bytes:
        """``awaitable`` in this task, cancelled past ``seconds`` (asyncio.TimeoutError):
        one timer, where ``wait_for`` makes a task, a future and a timer for every request
        (about a fifth of a small call's CPU in the client)."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10 has no asyncio.timeout

    async def _within(awaitable: Awaitable[bytes], seconds: float | None) -> bytes:
        return await asyncio.wait_for(awaitable, seconds)


async def _with_retry(
    send: Callable[[float | None], Awaitable[bytes]], timeout: float | None, budget: RetryBudget, retry: bool
) -> bytes:
    """``send(seconds_left)`` once, and once more if the server shed it and the budget and
    the time left allow; raises ``RequestTimeout`` when ``timeout`` runs out."""
    end = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if end is None else end - time.monotonic()

    async def attempt() -> bytes:
        remaining = left()
        if remaining is not None and remaining <= 0:
            raise RequestTimeout(f"no reply within {timeout}s")
        try:
            return await _within(send(remaining), remaining)
        except GasparError:
            raise  # the server's answer: a WorkerTimeout is a TimeoutError too, keep it
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no reply within {timeout}s") from None

    budget.on_request()
    try:
        return await attempt()
    except Overloaded as exc:
        retry_after = exc.retry_after_ms / 1000.0 if exc.retry_after_ms else None
        delay = backoff(retry_after, left()) if retry and not exc.started else None
        if delay is None or not budget.try_retry():
            raise
    await asyncio.sleep(delay)
    return await attempt()


async def request(
    address: str | tuple[str, int],
    message: bytes | str,
    timeout: float | None = DEFAULT_TIMEOUT,
    handler_timeout: float | None = None,
    *,
    deadline: bool = True,
    retry: bool = True,
) -> bytes:
    """Send one request on a new connection and return the reply's bytes (a ``str`` is
    sent UTF-8 encoded)."""
    addr = parse_address(address)
    message = as_bytes(message)

    async def go(left: float | None) -> bytes:
        reader, writer = await _open(addr)
        try:
            head = extended_header(len(message), timeout=handler_timeout, deadline=left if deadline else None)
            writer.write(head + message)
            await writer.drain()
            _, status, body = await _read_reply(reader)
            return _result(status, body)
        finally:
            writer.close()

    return await _with_retry(go, timeout, _budget, retry)


class _Conn:
    """The shared connection: its writer, the requests waiting on it, and whether it has
    answered anything since it was last idle (``quiet``: if it then fails, the server
    closed it while idle, and nothing sent on it ran)."""

    __slots__ = ("writer", "task", "waiting", "quiet")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.task = writer, None
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.quiet = True


class _Stale(Exception):
    """The shared connection was found closed by the server while it was idle."""

    def __init__(self, conn: _Conn) -> None:
        super().__init__("stale")
        self.conn = conn


class Client:
    """One persistent, pipelined connection shared by every task of the application."""

    def __init__(
        self,
        address: str | tuple[str, int],
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        deadline: bool = True,
        retry: bool = True,
    ) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self.deadline = deadline
        self.retry = retry
        self._budget = RetryBudget()
        self._tags = itertools.count(1)
        self._conn: _Conn | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def _connection(self) -> tuple[_Conn, bool]:
        """The shared connection, and whether it was open already (reused)."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._closed:
                raise ClientClosed("this Client is closed; make a new one")
            if self._conn is None or self._conn.writer.is_closing():
                reader, writer = await _open(self.address)
                conn = self._conn = _Conn(writer)
                conn.task = asyncio.ensure_future(self._read_loop(reader, conn))
                return conn, False
            return self._conn, True

    async def _read_loop(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        try:
            while True:
                tag, status, body = await _read_reply(reader)
                conn.quiet = False
                future = conn.waiting.pop(tag, None)
                if future is not None and not future.done():
                    future.set_result((status, body))
        except (GasparError, asyncio.CancelledError) as exc:
            lost = exc if isinstance(exc, GasparError) else ConnectionLost("client closed")
            waiting, conn.waiting = conn.waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(lost)
            conn.writer.close()
            if self._conn is conn:
                self._conn = None

    async def request(
        self, message: bytes | str, timeout: float | None = None, handler_timeout: float | None = None
    ) -> bytes:
        """Send one request on the shared connection and await its reply's bytes."""
        return await self._send((as_bytes(message),), timeout, handler_timeout, call=False)

    async def call(
        self,
        name: str,
        /,
        *args: Any,
        timeout: float | None = None,
        handler_timeout: float | None = None,
        codec: str = "msgpack",
        **kwargs: Any,
    ) -> Any:
        """Call the handler ``name`` of the server's :class:`gaspar.App` and await its
        decoded result (as :meth:`gaspar.client.Client.call`)."""
        reply = await self._send(calls.call_parts(name, args, kwargs, codec), timeout, handler_timeout, call=True)
        return calls.decode_result(codec, reply)

    async def stream(
        self, name: str, /, *args: Any, timeout: float | None = None, codec: str = "msgpack", **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Call a generator handler and iterate its items as they arrive (``async for``).
        ``timeout`` bounds the wait for each item. The stream has a connection of its own;
        leaving the loop early closes it, which ends the generator in its worker."""
        if self._closed:
            raise ClientClosed("this Client is closed; make a new one")
        body = calls.encode_call(name, args, kwargs, codec)
        wait = self.timeout if timeout is None else timeout
        reader, writer = await _open(self.address)
        try:
            writer.write(extended_header(len(body), keepalive=True, stream=True) + body)
            await writer.drain()
            while True:
                try:
                    _, status, data = await asyncio.wait_for(_read_reply(reader), wait)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"no item within {wait}s") from None
                if status == Status.ITEM:
                    yield calls.decode_result(codec, data)
                    continue
                _result(status, data)
                return
        finally:
            writer.close()

    async def _send(
        self, parts: tuple[bytes, ...], timeout: float | None, handler_timeout: float | None, call: bool
    ) -> bytes:
        """One request (its body in ``parts``, written behind its header in one go)."""
        size = sum(map(len, parts))
        timeout = self.timeout if timeout is None else timeout

        async def once(left: float | None) -> bytes:
            tag = next(self._tags) & 0xFFFFFFFF
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            conn, reused = await self._connection()
            if not conn.waiting:  # idle until now: nothing answered since
                conn.quiet = True
            conn.waiting[tag] = future
            try:
                sent_deadline = left if self.deadline else None
                head = extended_header(
                    size, tag=tag, keepalive=True, timeout=handler_timeout, deadline=sent_deadline, call=call
                )
                try:
                    conn.writer.writelines((head, *parts))
                    await conn.writer.drain()
                    status, body = await future
                except (ConnectionLost, ConnectionError) as exc:
                    if reused and conn.quiet:  # the server closed it while idle (idle_timeout, a restart): nothing ran
                        raise _Stale(conn) from exc
                    if isinstance(exc, GasparError):
                        raise
                    raise ConnectionLost(f"connection to {self.address[0]}:{self.address[1]} lost: {exc}") from exc
                return _result(status, body)
            finally:
                conn.waiting.pop(tag, None)

        async def go(left: float | None) -> bytes:
            try:
                return await once(left)
            except _Stale as stale:  # once more, on a fresh connection
                stale.conn.writer.close()
                if self._conn is stale.conn:
                    self._conn = None
                return await once(left)

        return await _with_retry(go, timeout, self._budget, self.retry)

    async def close(self) -> None:
        """Close the connection; a request after this raises :class:`~gaspar.errors.ClientClosed`."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.task is not None:
                conn.task.cancel()
                try:
                    await conn.task
                except asyncio.CancelledError:
                    pass
            conn.writer.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
