"""An asyncio client for gaspar.

* :func:`request`: one request on a new connection, like :func:`gaspar.client.request`.
* :class:`Client`: one persistent connection that carries every concurrent request of the
  application at once (the KEEPALIVE extension, pipelined): each request gets a tag, a
  reader task matches replies to their futures by tag, whatever order they finish in.
  A lost connection fails the requests on it (``ConnectionLost``) and the next request
  opens a new one.

Framing is :mod:`gaspar.framing`'s; errors are :mod:`gaspar.errors`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any

from .client import parse_address
from .errors import ConnectFailed, ConnectionLost, GasparError, RequestTimeout, error_from_reply
from .framing import REPLY_HEADER, Status, extended_header, parse_reply_header

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


async def request(
    address: str | tuple[str, int], message: bytes, timeout: float | None = None, handler_timeout: float | None = None
) -> bytes:
    """Send one request on a new connection and return the reply's bytes."""
    addr = parse_address(address)

    async def go() -> bytes:
        reader, writer = await _open(addr)
        try:
            writer.write(extended_header(len(message), timeout=handler_timeout) + bytes(message))
            await writer.drain()
            _, status, body = await _read_reply(reader)
            return _result(status, body)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"no reply from {addr[0]}:{addr[1]} within {timeout}s") from None


class Client:
    """One persistent, pipelined connection shared by every task of the application."""

    def __init__(self, address: str | tuple[str, int], timeout: float | None = None) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self._tags = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await _open(self.address)
                self._reader_task = asyncio.ensure_future(self._read_loop(reader))
            return self._writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                tag, status, body = await _read_reply(reader)
                future = self._waiting.pop(tag, None)
                if future is not None and not future.done():
                    future.set_result((status, body))
        except (GasparError, asyncio.CancelledError) as exc:
            lost = exc if isinstance(exc, GasparError) else ConnectionLost("client closed")
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(lost)
            if self._writer is not None:
                self._writer.close()
            self._writer = None

    async def request(
        self, message: bytes, timeout: float | None = None, handler_timeout: float | None = None
    ) -> bytes:
        """Send one request on the shared connection and await its reply's bytes."""
        timeout = self.timeout if timeout is None else timeout
        tag = next(self._tags) & 0xFFFFFFFF
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def go() -> bytes:
            writer = await self._connection()
            self._waiting[tag] = future
            writer.write(extended_header(len(message), tag=tag, keepalive=True, timeout=handler_timeout) + message)
            await writer.drain()
            status, body = await future
            return _result(status, body)

        try:
            return await asyncio.wait_for(go(), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no reply within {timeout}s") from None
        finally:
            self._waiting.pop(tag, None)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader_task = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
