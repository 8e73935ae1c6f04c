"""What the daemon writes to its own log about requests: handler errors (with their
traceback, rate-limited) and the access log (one line per request)."""

from __future__ import annotations

import logging
import socket
import struct

import handlers
import pytest
from conftest import wait_for

import gaspar
from gaspar import client
from gaspar.telemetry import LogLimiter


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_limiter_allows_a_burst_then_reports_what_it_held_back():
    clock = Clock()
    limit = LogLimiter(burst=3, period=60.0, clock=clock)
    assert [limit.allow() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    clock.now = 30.0
    assert limit.allow() == (False, 0)
    clock.now = 61.0
    assert limit.allow() == (True, 3)  # the next line says 3 were not logged
    assert limit.allow() == (True, 0)


def test_a_handler_error_is_logged_by_the_server_with_its_traceback(serve, caplog):
    caplog.set_level(logging.ERROR, logger="gaspar")
    s = serve(handlers.boom, processes=1)
    with pytest.raises(gaspar.HandlerError):
        s.request(b"boom now")
    record = wait_for(lambda: next((r for r in caplog.records if "Handler error" in r.getMessage()), None), 5)
    assert record is not None
    text = record.getMessage()
    assert "ValueError: bad input b'boom now'" in text
    assert "Traceback (most recent call last)" in text and "handlers.py" in text  # where it was raised
    assert record.worker == 1 and record.worker_pid == s.pids()[0]


def test_handler_errors_cannot_flood_the_log(serve, caplog):
    caplog.set_level(logging.ERROR, logger="gaspar")
    s = serve(handlers.boom, processes=1)
    for _ in range(30):
        with pytest.raises(gaspar.HandlerError):
            s.request(b"boom")
    assert s.producer.stats()["outcomes"]["error"] == 30
    logged = [r for r in caplog.records if "Handler error" in r.getMessage()]
    assert len(logged) == 10


def test_access_log_has_one_line_per_request_with_its_facts(serve, tmp_path):
    path = tmp_path / "access.log"
    s = serve(handlers.mixed, processes=1, access_log=str(path), max_message_size=100)
    assert s.request(b"hello") == b"hello"
    with pytest.raises(gaspar.HandlerError):
        s.request(b"boom")
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:  # too large: refused
        sock.sendall(struct.pack("!I", 1000))
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert client.request(s.addr, b"sleep 0.05") == b"sleep 0.05"
    lines = wait_for(lambda: (lambda t: t if len(t) >= 4 else None)(path.read_text().splitlines()), 5)
    assert lines and len(lines) == 4, path.read_text()
    ok, error, bad, slow = lines
    assert " ok in=5B out=5B " in ok and "worker=1" in ok and "127.0.0.1:" in ok
    assert " error in=4B " in error and "handler=" in error
    assert " bad_request " in bad
    handler_ms = float(slow.split("handler=")[1].split("ms")[0])
    assert 45 <= handler_ms < 1000
