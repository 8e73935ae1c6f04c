"""The core product against real workers, real 0MQ and real TCP: issue 'gaspar core'."""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import handlers
import pytest
from conftest import ROOT, alive, wait_for

import gaspar
from gaspar import client
from gaspar.wire.framing import extended_header, parse_reply_header


def raw_request(addr: str, message: bytes, timeout: float = 10.0) -> bytes:
    """Exactly what a gaspar 1.0 client does: send the packed request, read to EOF."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(client.pack(message))
        return sock.makefile("rb").read()


def test_echo_every_byte_value_and_empty(serve):
    s = serve(handlers.echo)
    every = bytes(range(256)) * 4
    assert s.request(every) == every
    assert s.request(b"") == b""
    assert raw_request(s.addr, every) == every
    assert raw_request(s.addr, b"") == b""


def test_echo_16_mib(serve):
    s = serve(handlers.echo)
    big = os.urandom(16 * 1024 * 1024)
    assert s.request(big, timeout=60) == big
    assert raw_request(s.addr, big, timeout=60) == big


@pytest.mark.parametrize("size", [0, 10, 65536, 3 * 1024 * 1024])
def test_handlers_are_given_bytes_at_every_size(serve, size):
    s = serve(handlers.describe, processes=1)
    message = (b"abcd" * (size // 4 + 1))[:size]
    assert s.request(message, timeout=30) == b"bytes:%d:%s" % (size, message[:4])


def test_str_reply_is_utf8_and_other_types_are_handler_errors(serve):
    s = serve(handlers.upper_str)
    assert s.request("héllo".encode()) == "HÉLLO".encode()
    bad = serve(handlers.returns_int)
    with pytest.raises(gaspar.HandlerError) as info:
        bad.request(b"x")
    assert info.value.remote_type == "TypeError" and "int" in info.value.remote_message
    assert bad.request.__self__.pids()  # the workers are still there


def test_two_producers_in_one_process_each_stop_at_once(serve):
    """The second one's fork server, forked from this process, held the first one's command
    pipe: stopping the first waited 5 s for its fork server, then killed it."""
    first, second = serve(handlers.echo), serve(handlers.echo)
    fork_server, began = first.fork_server, time.monotonic()
    first.producer.stop(timeout=15)
    assert first.producer.stopped.is_set() and not alive(fork_server)
    assert time.monotonic() - began < 2.0
    assert second.request(b"still here") == b"still here"


def test_handler_exception_reaches_the_client_and_the_worker_survives(serve):
    s = serve(handlers.boom, processes=1)
    [pid] = s.pids()
    with pytest.raises(gaspar.HandlerError) as info:
        s.request(b"boom now")
    err = info.value
    assert isinstance(err, gaspar.GasparError)
    assert err.remote_type == "ValueError" and "bad input" in err.remote_message
    assert str(err) == "ValueError: bad input b'boom now'"
    assert err.remote_traceback is None  # error_detail = message, the default
    assert s.request(b"fine") == b"fine"
    assert s.pids() == [pid]


def raw_extended(addr: str, message: bytes, tag: int = 5) -> tuple[int, dict]:
    """One extended request, by hand: (status, the error body's JSON)."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(extended_header(len(message), tag=tag) + message)
        length, got_tag, status = parse_reply_header(sock.recv(9, socket.MSG_WAITALL))
        assert got_tag == tag
        return status, json.loads(sock.recv(length, socket.MSG_WAITALL))


@pytest.mark.parametrize("detail", ["message", "traceback"])
def test_a_client_gets_the_handlers_traceback_only_with_error_detail_traceback(serve, caplog, detail):
    caplog.set_level(logging.ERROR, logger="gaspar")
    s = serve(handlers.boom, processes=1, error_detail=detail)
    with pytest.raises(gaspar.HandlerError) as info:
        s.request(b"boom 1")
    err = info.value
    assert (err.remote_type, err.remote_message) == ("ValueError", "bad input b'boom 1'")
    status, facts = raw_extended(s.addr, b"boom 2")
    assert status == 1 and facts["type"] == "ValueError" and facts["message"] == "bad input b'boom 2'"
    if detail == "message":
        assert err.remote_traceback is None and set(facts) == {"type", "message"}
    else:
        for tb in (err.remote_traceback, facts["traceback"]):
            assert tb.startswith("Traceback (most recent call last):") and "handlers.py" in tb
            assert tb.rstrip().endswith(
                "ValueError: bad input b'boom 1'" if tb is err.remote_traceback else "b'boom 2'"
            )
    with pytest.raises(ConnectionResetError):  # a 1.0 client: a reset, whatever the setting
        raw_request(s.addr, b"boom 3")
    # the daemon's log has the traceback either way
    logged = wait_for(lambda: [r for r in caplog.records if "Handler error" in r.getMessage()], 5)
    assert logged and all(r.exc_text.startswith("Traceback (most recent call last):") for r in logged)


def test_a_1_0_client_sees_an_error_as_an_error(serve):
    s = serve(handlers.boom)
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        raw_request(s.addr, b"boom", timeout=10)
    assert time.monotonic() - start < 5
    assert raw_request(s.addr, b"ok") == b"ok"


def test_1000_concurrent_connections_all_answered(serve):
    s = serve(handlers.echo)
    host, port = s.addr.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    socks = {}
    try:
        for i in range(1000):
            sock = socket.create_connection((host, int(port)), timeout=10)
            socks[sock] = (b"conn-%d-" % i) * (i % 7 + 1)
        for sock, msg in socks.items():  # every connection is open before any is sent
            sock.sendall(client.pack(msg))
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, bytearray())
        done = {}
        deadline = time.monotonic() + 60
        while len(done) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                data = key.fileobj.recv(65536)
                if data:
                    key.data.extend(data)
                else:
                    done[key.fileobj] = bytes(key.data)
                    sel.unregister(key.fileobj)
        assert len(done) == 1000
        assert all(done[sock] == msg for sock, msg in socks.items())
    finally:
        for sock in socks:
            sock.close()
        sel.close()


def test_replies_go_back_to_the_connection_that_asked(serve):
    s = serve(handlers.echo, processes=3)
    errors: list[str] = []

    def worker(t: int) -> None:
        with client.Client(s.addr, timeout=30) as c:
            for i in range(250):
                msg = b"%d:%d:" % (t, i) + os.urandom(i % 300)
                reply = c.request(msg) if i % 2 else client.request(s.addr, msg, timeout=30)
                if reply != msg:
                    errors.append(f"thread {t} request {i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_request_map_is_empty_after_10000_requests(serve):
    s = serve(handlers.echo)

    def run(n: int, keepalive: bool) -> None:
        with client.Client(s.addr, timeout=30) as c:
            for i in range(n):
                msg = b"%d" % i
                assert (c.request(msg) if keepalive else client.request(s.addr, msg, timeout=30)) == msg

    threads = [threading.Thread(target=run, args=(1250, k)) for k in (True, False) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    stats = s.producer.stats()
    assert stats["counters"]["completed"] >= 10000
    assert stats["pending"] == 0 and stats["queued"] == 0 and s.producer.dispatcher.pending == {}


def test_header_cut_short_gets_a_reset_and_others_are_served(serve):
    s = serve(handlers.echo)
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x00\x00")
        sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert s.request(b"next") == b"next"


def test_a_stalled_connection_is_closed_after_idle_timeout(serve):
    s = serve(handlers.echo, idle_timeout=0.5)
    host, port = s.addr.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)), timeout=10)
    stalled = socket.create_connection((host, int(port)), timeout=10)
    try:
        stalled.sendall(struct.pack("!I", 100) + b"only part")
        assert s.request(b"meanwhile") == b"meanwhile"  # the others are served
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            stalled.recv(10)  # mid-request: an error, not an empty reply
        assert silent.recv(10) == b""  # never sent anything: a plain close
        assert time.monotonic() - start < 5
    finally:
        silent.close()
        stalled.close()


def test_too_large_is_refused_without_reading_it(serve):
    s = serve(handlers.echo, max_message_size=1000)
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(struct.pack("!I", 2_000_000_000))  # 2 GB declared, never sent
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(extended_header(1001, tag=5))
        head = sock.recv(9, socket.MSG_WAITALL)
        length, tag, status = parse_reply_header(head)
        body = json.loads(sock.recv(length, socket.MSG_WAITALL))
        assert tag == 5 and status == 4 and body["type"] == "RequestTooLarge"
    with pytest.raises(gaspar.BadRequest, match="max_message_size"):
        s.request(b"x" * 1001)
    assert s.request(b"x" * 1000) == b"x" * 1000


def test_unknown_flags_get_a_framed_bad_request(serve):
    s = serve(handlers.echo)
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(struct.pack("!IIII", 0x80000000, 0x40, 0, 9))
        length, tag, status = parse_reply_header(sock.recv(9, socket.MSG_WAITALL))
        assert status == 4 and "flags" in json.loads(sock.recv(length, socket.MSG_WAITALL))["message"]


def test_while_every_worker_is_busy_new_connections_are_held_at_most_hold(serve, monkeypatch):
    """Saturated (every worker busy, requests waiting), the front end stops watching its
    listening socket and takes new connections at the start of each round of its loop, or
    after HOLD: a client arriving then is read and answered (a bad request needs no worker)
    within HOLD, not at the next reply; once nothing waits, the socket is watched again."""
    from gaspar.frontend import hub

    monkeypatch.setattr(hub, "HOLD", 0.5)  # long enough to be seen from here
    s = serve(handlers.sleepy, processes=1)
    host, port = s.addr.rsplit(":", 1)
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(s.request(b"2", timeout=20))
        except gaspar.GasparError as exc:
            answers.append(exc)

    busy = [threading.Thread(target=ask) for _ in range(2)]
    for t in busy:
        t.start()
    assert wait_for(s.producer.saturated, 5), "one request runs, one waits"

    def bad_request() -> float:
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(struct.pack("!IIII", 0x80000000, 0x40, 0, 9))  # unknown flags: BadRequest
            length, _, status = parse_reply_header(sock.recv(9, socket.MSG_WAITALL))
            assert status == 4 and "flags" in json.loads(sock.recv(length, socket.MSG_WAITALL))["message"]
        return time.monotonic() - started

    assert wait_for(lambda: not s.producer.acceptor.held, 5)
    assert bad_request() < 0.4  # the socket was watched: taken at once; then accepts are held
    assert wait_for(lambda: s.producer.acceptor.held, 0.3)
    waited = bad_request()
    assert 0.1 < waited < 1.2, waited  # held until HOLD ended, not until the reply 2 s away
    for t in busy:
        t.join(20)
    assert answers == [b"2", b"2"]
    assert wait_for(lambda: not s.producer.acceptor.held, 5)
    assert s.request(b"0", timeout=10) == b"0"
    busy = [threading.Thread(target=ask) for _ in range(2)]
    for t in busy:
        t.start()
    assert wait_for(s.producer.saturated, 5)
    bad_request()
    assert wait_for(lambda: s.producer.acceptor.held, 0.3)
    s.producer.stop(timeout=15)  # while held: the stop takes what is in the backlog and ends
    assert s.producer.stopped.is_set()
    for t in busy:
        t.join(20)
    assert len(answers) == 4


def test_a_client_that_leaves_before_its_reply_leaks_nothing(serve):
    s = serve(handlers.sleepy, processes=1)
    host, port = s.addr.rsplit(":", 1)
    for _ in range(3):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(client.pack(b"0.3"))
        sock.close()
    assert s.request(b"0", timeout=10) == b"0"  # queued behind the abandoned ones
    assert wait_for(lambda: s.producer.stats()["pending"] == 0, 5)
    assert len(s.pids()) == 1


def test_stop_leaves_no_worker_process():
    producer = gaspar.Producer(gaspar.Consumer(handler=handlers.echo), 0, processes=3)
    producer.start(blocking=False, timeout=20)
    pids = producer.worker_pids()
    fork_server = producer.fork_server.pid
    assert len(pids) == 3 and all(alive(p) for p in pids)
    assert client.request("%s:%d" % producer.server_addr, b"x", timeout=5) == b"x"
    producer.stop(timeout=15)
    assert producer.stopped.is_set() and not producer.running.is_set()
    assert wait_for(lambda: not any(alive(p) for p in pids + [fork_server]), 5)


def test_start_waits_for_every_worker(serve):
    s = serve(handlers.pid, processes=4)
    assert len(s.pids()) == 4
    assert s.producer.running.is_set()
    seen = {s.request(b"") for _ in range(20)}
    assert seen <= {str(p).encode() for p in s.pids()}


def test_client_errors_for_refused_and_timeout(serve):
    port = __import__("conftest").free_port()
    with pytest.raises(gaspar.ConnectFailed) as info:
        client.request(f"127.0.0.1:{port}", b"x", timeout=5)
    assert isinstance(info.value, ConnectionError)
    s = serve(handlers.sleepy, processes=1)
    start = time.monotonic()
    with pytest.raises(gaspar.RequestTimeout) as info:
        s.request(b"2", timeout=0.3)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - start < 2


GREEN_SCRIPT = """
import eventlet
eventlet.monkey_patch()
import sys, time
from gaspar import client
addr, n = sys.argv[1], int(sys.argv[2])
pool = eventlet.GreenPool()
start = time.monotonic()
replies = list(pool.imap(lambda i: client.request(addr, b"0.5", timeout=20), range(n)))
print(time.monotonic() - start, len(replies), all(r == b"0.5" for r in replies))
"""


def test_the_client_is_green_under_eventlet(serve):
    n = 6
    s = serve(handlers.sleepy, processes=n)
    out = subprocess.run(
        [sys.executable, "-c", GREEN_SCRIPT, s.addr, str(n)],
        capture_output=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=True,
    ).stdout.split()
    elapsed, count, ok = float(out[0]), int(out[1]), out[2] == b"True"
    assert count == n and ok
    assert elapsed < 0.5 * n / 2  # concurrent: about one request's 0.5 s, not n of them


def test_tcp_transport(serve):
    s = serve(handlers.echo, transport="tcp")
    assert s.request(b"over tcp") == b"over tcp"


def test_ipc_directory_is_private(serve):
    s = serve(handlers.echo)
    path = s.producer.ports.ipc_dir
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_public_api_is_pinned():
    assert sorted(gaspar.__all__) == sorted(
        [
            "__version__",
            "App",
            "Executor",
            "Consumer",
            "Producer",
            "Settings",
            "Worker",
            "GasparError",
            "RemoteError",
            "HandlerError",
            "WorkerDied",
            "WorkerLost",
            "WorkerTimeout",
            "BadRequest",
            "NoSuchHandler",
            "Overloaded",
            "ServerUnavailable",
            "ConnectFailed",
            "ConnectionLost",
            "RequestTimeout",
            "ProtocolError",
            "ClientClosed",
        ]
    )
    assert client.pack(b"ab") == b"\x00\x00\x00\x02ab"


def test_importing_the_client_does_not_import_eventlet():
    code = "import gaspar, gaspar.client, gaspar.aio, sys; print('eventlet' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    assert out.stdout.strip() == b"False", out.stderr


def test_garbage_from_a_rogue_worker_socket_is_dropped(serve):
    """Unknown request ids, unknown kinds and broken HELLOs on the workers' ROUTER are
    counted or logged and dropped; the daemon keeps serving."""
    import zmq

    s = serve(handlers.echo)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.linger = 0
    try:
        rogue.connect(s.producer.fork_server.endpoint)
        rogue.send_multipart([b"R" + (12345).to_bytes(8, "big") + b"\x00", b"stray reply"])
        rogue.send_multipart([b"?", b"unknown kind"])
        rogue.send_multipart([b"H", b"not json"])
        rogue.send(b"R")  # too short a head
        assert wait_for(lambda: s.producer.stats()["counters"]["unknown_replies"] >= 1, 5)
        assert s.request(b"still fine") == b"still fine"
        assert s.producer.stats()["pending"] == 0
    finally:
        rogue.close()
        ctx.term()
