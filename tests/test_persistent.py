"""Persistent, pipelined connections: gaspar.client.Client and gaspar.aio."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import handlers
import pytest
from conftest import wait_for

import gaspar
from gaspar import aio, client
from gaspar.wire.framing import extended_header, parse_reply_header


def test_client_reuses_one_connection(serve):
    s = serve(handlers.echo)
    with client.Client(s.addr, timeout=10) as c:
        for i in range(50):
            assert c.request(b"%d" % i) == b"%d" % i
        assert len(c._idle) == 1
        assert s.producer.stats()["connections"] == 1


def test_a_closed_client_says_so_instead_of_reopening(serve):
    s = serve(handlers.echo)
    c = client.Client(s.addr, timeout=10)
    assert c.request(b"x") == b"x"
    c.close()
    for call in (lambda: c.request(b"y"), lambda: c.pipeline([b"a", b"b"])):
        with pytest.raises(gaspar.ClientClosed, match="closed"):
            call()
    assert s.producer.stats()["connections"] == 0 or not c._idle  # nothing was opened again

    async def main():
        a = aio.Client(s.addr, timeout=10)
        assert await a.request(b"z") == b"z"
        await a.close()
        with pytest.raises(gaspar.ClientClosed):
            await a.request(b"again")
        assert a._conn is None

    asyncio.run(main())


def test_pipelined_replies_match_their_requests(serve):
    s = serve(handlers.sleepy, processes=3)
    with client.Client(s.addr, timeout=10) as c:
        # the first takes longest: replies come back out of order, tags put them right
        messages = [b"0.3", b"0.1", b"0", b"0.2", b"0.05"]
        start = time.monotonic()
        assert c.pipeline(messages) == messages
        assert time.monotonic() - start < 1.5  # run side by side on 3 workers, not one by one


def test_raw_pipelining_on_one_socket(serve):
    s = serve(handlers.echo)
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"".join(extended_header(3, tag=t, keepalive=True) + b"m%02d" % t for t in range(20)))
        got = {}
        for _ in range(20):
            length, tag, status = parse_reply_header(sock.recv(9, socket.MSG_WAITALL))
            got[tag] = sock.recv(length, socket.MSG_WAITALL)
            assert status == 0
        assert got == {t: b"m%02d" % t for t in range(20)}
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # the server closes once it has answered everything


def test_a_refused_header_is_answered_with_its_own_tag(serve):
    """A pipelining client whose request has an unknown flag (or STREAM without CALL) gets
    status 4 under that request's tag, after the replies to the requests before it, and
    then the connection ends."""
    s = serve(handlers.echo)
    host, port = s.addr.rsplit(":", 1)
    for flags, why in ((0x20, b"unknown request flags 0x20"), (0x10, b"STREAM flag needs the CALL flag")):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            bad = struct.pack("!IIII", 0x80000000 | 3, flags | 0x1, 0, 7) + b"bad"
            sock.sendall(extended_header(2, tag=1, keepalive=True) + b"ok" + bad)
            got = {}
            for _ in range(2):
                length, tag, status = parse_reply_header(recv_exactly(sock, 9))
                got[tag] = (status, recv_exactly(sock, length))
            assert got[1] == (0, b"ok")
            assert got[7][0] == 4 and why in got[7][1] and b"ProtocolError" in got[7][1], got
            assert sock.recv(10) == b""  # and the server closed it
    assert wait_for(lambda: s.producer.stats()["pending"] == 0, 5)


def test_error_reply_on_a_persistent_connection_keeps_it_usable(serve):
    s = serve(handlers.boom)
    with client.Client(s.addr, timeout=10) as c:
        with pytest.raises(gaspar.HandlerError):
            c.request(b"boom")
        assert c.request(b"after") == b"after"


def test_client_reconnects_when_the_server_closed_an_idle_connection(serve):
    s = serve(handlers.echo, idle_timeout=0.3)
    with client.Client(s.addr, timeout=10) as c:
        assert c.request(b"a") == b"a"
        time.sleep(0.8)  # the server closes the idle pooled connection
        assert c.request(b"b") == b"b"


def test_aio_client_reconnects_when_the_server_closed_its_idle_connection(serve):
    """QA: with the event loop blocked past idle_timeout (what gaspar is for), the next
    request on the shared connection raised ConnectionLost, or a bare ConnectionResetError;
    nothing ran, so it goes again on a fresh connection, as the sync client's does."""
    s = serve(handlers.echo, idle_timeout=0.3)

    async def main():
        async with aio.Client(s.addr, timeout=10) as c:
            assert await c.request(b"a") == b"a"
            for _ in range(3):
                time.sleep(0.8)  # the loop is blocked; the server closes the idle connection
                assert await asyncio.gather(*(c.request(b"%d" % i) for i in range(3))) == [b"0", b"1", b"2"]

    asyncio.run(main())


def test_aio_request_and_client(serve):
    s = serve(handlers.sleepy, processes=4)

    async def main():
        assert await aio.request(s.addr, b"0", timeout=10) == b"0"
        async with aio.Client(s.addr, timeout=10) as c:
            start = time.monotonic()
            replies = await asyncio.gather(*(c.request(b"0.3") for _ in range(4)))
            elapsed = time.monotonic() - start
            assert replies == [b"0.3"] * 4
            assert elapsed < 1.0  # pipelined on one connection, run on 4 workers at once
            with pytest.raises(gaspar.RequestTimeout):
                await c.request(b"1", timeout=0.2)

    asyncio.run(main())
    assert s.producer.stats()["counters"]["completed"] >= 5


def test_aio_timeouts_and_cancels_are_told_apart(serve):
    """A request's own timeout is RequestTimeout; the caller cancelling its task (or its own
    asyncio.wait_for running out) is a CancelledError or TimeoutError, never mistaken for
    ours; either way the shared connection serves the next request."""
    s = serve(handlers.sleepy, processes=2)

    async def main():
        async with aio.Client(s.addr, timeout=10) as c:
            with pytest.raises(gaspar.RequestTimeout):
                await c.request(b"1", timeout=0.2)
            task = asyncio.ensure_future(c.request(b"1"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(asyncio.TimeoutError) as info:
                await asyncio.wait_for(c.request(b"1"), 0.2)
            assert not isinstance(info.value, gaspar.RequestTimeout)
            assert await c.request(b"0") == b"0"
            assert not c._conn.waiting  # nothing left behind by the ones that ended early

    asyncio.run(main())


def test_aio_errors(serve):
    s = serve(handlers.boom)

    async def main():
        with pytest.raises(gaspar.HandlerError, match="bad input"):
            await aio.request(s.addr, b"boom", timeout=10)
        async with aio.Client(s.addr, timeout=10) as c:
            with pytest.raises(gaspar.HandlerError):
                await c.request(b"boom")
            assert await c.request(b"ok") == b"ok"
        port = __import__("conftest").free_port()
        with pytest.raises(gaspar.ConnectFailed):
            await aio.request(f"127.0.0.1:{port}", b"x", timeout=5)

    asyncio.run(main())


def test_pipeline_back_pressure_still_answers_everything(serve):
    s = serve(handlers.echo, max_pipeline=2)
    with client.Client(s.addr, timeout=20) as c:
        messages = [b"p%d" % i + b"x" * (i * 997 % 5000) for i in range(300)]
        assert c.pipeline(messages) == messages
    assert s.producer.stats()["pending"] == 0


def test_stats_over_the_wire(serve):
    s = serve(handlers.echo)
    s.request(b"one")
    stats = __import__("json").loads(client.request(s.addr, b"", timeout=10, stats=True))
    assert stats["counters"]["completed"] >= 1
    assert sorted(w["pid"] for w in stats["workers"]) == s.pids()


def test_many_pipelining_connections_get_every_reply_right(serve):
    """Sixteen connections pipelining forty requests each keep requests handed ahead to both
    workers, so replies are taken in runs and each worker's freed requests go out as one
    0MQ message (gaspar.frontend.router): every reply still matches its request, bodies of
    every size included (over 64 KiB: sent without a copy)."""
    s = serve(handlers.echo, processes=2)
    host, port = s.addr.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=20) for _ in range(16)]

    def body(c: int, t: int) -> bytes:
        return b"c%02dt%02d-" % (c, t) + b"x" * ((c * 40 + t) * 7919 % (70 * 1024 if t % 13 == 0 else 300))

    try:
        for c, sock in enumerate(socks):
            heads = [extended_header(len(body(c, t)), tag=t, keepalive=True) for t in range(40)]
            sock.sendall(b"".join(head + body(c, t) for t, head in enumerate(heads)))
        for c, sock in enumerate(socks):
            got = {}
            for _ in range(40):
                length, tag, status = parse_reply_header(recv_exactly(sock, 9))
                got[tag] = recv_exactly(sock, length)
                assert status == 0
            assert got == {t: body(c, t) for t in range(40)}
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: s.producer.stats()["pending"] == 0, 5)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes: a socket with a timeout is non-blocking underneath, so MSG_WAITALL may
    return fewer once a large reply arrives in pieces."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"the server closed after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)
