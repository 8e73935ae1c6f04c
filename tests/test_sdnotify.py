"""systemd's readiness protocol: ``gaspar.ops.sdnotify.notify`` alone, then a real daemon.

The test plays systemd: it binds a Unix datagram socket and hands its name to the daemon
as ``$NOTIFY_SOCKET``. Each message is checked against the daemon's state at the moment it
arrives (READY=1 comes only once every worker is ready, and after a reload only once every
worker is of the new generation). Every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid

import pytest
from conftest import ROOT, wait_for

from gaspar.ops import sdnotify


class Notifications:
    """The systemd side: a bound datagram socket, read one message at a time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        """The next message as a dict (``{"READY": "1", "STATUS": ...}``); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no notification within {timeout}s; seen: {self.seen}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.seen.append(fields)
            return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    """(Notifications, the NOTIFY_SOCKET value) for a socket path under tmp_path."""
    path = str(tmp_path / "notify.sock")
    notes = Notifications(path)
    yield notes, path
    notes.close()


def live_workers(server) -> list[dict]:
    return [w for w in server.stats()["workers"] if not w["retiring"]]


def env_with(notify_socket: str, *extra: str) -> dict:
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), *map(str, extra)])
    return {"NOTIFY_SOCKET": notify_socket, "PYTHONPATH": path}


# -- notify() alone --------------------------------------------------------------------------


def test_unset_or_empty_notify_socket_returns_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_path_socket(systemd, monkeypatch):
    notes, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1\nSTATUS=hi") is True
    assert notes.next(5) == {"READY": "1", "STATUS": "hi"}


def test_abstract_socket(monkeypatch):
    name = f"gaspar-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    notes = Notifications("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1") is True
        assert notes.next(5) == {"STOPPING": "1"}
    finally:
        notes.close()


@pytest.mark.parametrize("value", ["/nonexistent/gaspar-notify.sock", "@gaspar-nobody-listens-here", "vsock:2:9"])
def test_failures_return_false_and_are_logged_once(value, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    monkeypatch.setattr(sdnotify, "_failed_once", False)
    with caplog.at_level(logging.DEBUG, logger="gaspar"):
        assert sdnotify.notify("READY=1") is False
        assert sdnotify.notify("READY=1") is False
    lines = [r for r in caplog.records if "systemd notification" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG, caplog.text


def test_a_full_socket_loses_the_message_instead_of_blocking(systemd, monkeypatch):
    notes, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sdnotify, "_failed_once", False)
    started = time.monotonic()
    results = [sdnotify.notify("STATUS=" + "x" * 1000) for _ in range(2000)]  # nobody reads
    assert time.monotonic() - started < 10
    assert results[0] is True and results[-1] is False


# -- a real daemon ----------------------------------------------------------------------------


def test_ready_reloading_stopping(cli, systemd):
    notes, path = systemd
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2", env=env_with(path))

    ready = notes.next(30)
    workers = live_workers(server) if server.wait_listening() else []
    assert ready.get("READY") == "1", notes.seen  # the first message, nothing before it
    assert len(workers) == 2, (workers, server.log)
    assert ready["MAINPID"] == str(server.proc.pid)
    assert ready["STATUS"] == "2 workers ready"
    old = {w["pid"] for w in workers}

    server.signal(signal.SIGHUP)
    reloading = notes.next(20)
    assert reloading.get("RELOADING") == "1", notes.seen
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 20_000_000
    ready = notes.next(30)
    assert ready.get("READY") == "1", notes.seen
    workers = live_workers(server)  # every worker replaced at that moment
    assert len(workers) == 2 and all(w["generation"] == 2 for w in workers), (workers, server.log)
    assert not old & {w["pid"] for w in workers}
    assert ready["STATUS"] == "2 workers ready"

    server.signal(signal.SIGTERM)
    stopping = notes.next(20)
    assert stopping.get("STOPPING") == "1", notes.seen
    assert "graceful" in stopping["STATUS"]
    assert server.wait(20) == 0


def test_a_failed_reload_is_ready_again_with_the_old_workers(cli, systemd, tmp_path):
    notes, path = systemd
    app = tmp_path / "breakable_sd.py"
    app.write_text("def handle(m):\n    return b'v1:' + m\n")
    server = cli("breakable_sd:handle", "--bind", "127.0.0.1:0", "-w", "2", env=env_with(path, tmp_path))
    assert notes.next(30).get("READY") == "1", notes.seen
    server.wait_listening()
    old = sorted(w["pid"] for w in live_workers(server))

    app.write_text("raise RuntimeError('half-written')\n")
    server.signal(signal.SIGHUP)
    assert notes.next(20).get("RELOADING") == "1", notes.seen
    ready = notes.next(20)
    assert ready.get("READY") == "1", notes.seen
    assert ready["STATUS"] == "Reload failed; 2 workers ready"
    # the log line was written before the notice, but our thread reads the pipe a bit later
    assert wait_for(lambda: "Reload failed" in server.log, 5), server.log
    assert sorted(w["pid"] for w in live_workers(server)) == old
