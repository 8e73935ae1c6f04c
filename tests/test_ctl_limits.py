"""The control socket's bounds and ``gaspar ctl reload``'s outcome, over the real socket:
a line of 1 MiB at most, 16 connections at most, each line whole within 5 s, refusals logged
10 a minute, ``scale`` up to ``max_workers``, a reload that is waited for (exit 1 with the
reason when it failed) and shown by ``status``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, wait_for

from gaspar.ops import ctl, reloads

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
APP = "def handle(m):\n    return b'{version}:' + m\n"


def gaspar_ctl(path: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gaspar", "ctl", "--socket", path, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def daemon(cli, tmp_path):
    """A daemon serving ``app:handle`` from ``tmp_path`` (rewritable), and its socket path."""

    def start(workers: int = 2, *extra: str):
        (tmp_path / "app.py").write_text(APP.format(version="v1"))
        path = str(tmp_path / "ctl.sock")
        args = ("app:handle", "--bind", "127.0.0.1:0", "-w", str(workers), "--control-socket", path, *extra)
        server = cli(*args, cwd=tmp_path)
        server.wait_ready(workers)
        return server, path

    return start


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def test_a_line_over_1_mib_is_refused_and_closed_never_buffered(daemon):
    server, path = daemon(1)
    rss = ctl.call(path, {"cmd": "status"})["result"]["front_end"]["rss_bytes"]
    for tail in (b"\n", b""):  # one that ends, one that never does
        with connect(path) as s:
            sender = threading.Thread(target=_send_quietly, args=(s, b"x" * (8 << 20) + tail), daemon=True)
            sender.start()
            f = s.makefile("rb")
            reply = json.loads(f.readline())
            assert reply == {"ok": False, "error": "a request line is at most 1048576 bytes; closing the connection"}
            assert f.read() == b""  # closed
            sender.join(10)
    st = ctl.call(path, {"cmd": "status"})["result"]  # the daemon carries on
    assert st["front_end"]["rss_bytes"] - rss < 16 << 20, (rss, st["front_end"])
    assert "a request line longer than 1048576 bytes" in server.log
    # a line just under the limit is read whole
    message = "m" * (ctl.MAX_LINE - 64)
    assert ctl.call(path, {"cmd": "broadcast", "message": message}) == {"ok": True, "result": {"sent": 1}}
    with pytest.raises(ValueError, match="more than the control socket's 1048576"):
        ctl.call(path, {"cmd": "broadcast", "message": "m" * ctl.MAX_LINE})


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the daemon closed: expected once it has had enough
        pass


def test_lines_sent_back_to_back_leave_the_data_path_its_turns(daemon):
    """QA: three connections sending 1 MiB lines of junk back to back (each under the line
    limit, each answered) took the hub from the data path: its p50 went from 1.4 to 20 ms,
    its p99 from 6 to 290-440 ms. A connection now waits between lines."""
    from gaspar import client

    server, path = daemon(2)
    line, stop, answered = b"[" * ((1 << 20) - 10) + b"\n", threading.Event(), []

    def flood():
        with connect(path) as s:
            f = s.makefile("rb")
            while not stop.is_set():
                s.sendall(line)
                answered.append(json.loads(f.readline())["ok"])

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
    for t in floods:
        t.start()
    waits, end = [], time.monotonic() + 4
    while time.monotonic() < end:
        began = time.monotonic()
        assert client.request(server.addr, b"x", timeout=5) == b"v1:x"
        waits.append(time.monotonic() - began)
        time.sleep(0.005)
    stop.set()
    for t in floods:
        t.join(10)
    waits.sort()
    assert len(answered) > 30 and not any(answered)  # the junk was read and refused meanwhile
    assert waits[len(waits) // 2] < 0.010, waits[len(waits) // 2]  # before: 20 ms
    assert waits[int(len(waits) * 0.95)] < 0.060, waits[int(len(waits) * 0.95)]  # before: 170+ ms


def test_at_most_16_connections_at_once(daemon):
    server, path = daemon(1)
    held = _hold(path)  # 16, each reading a request line
    with connect(path) as extra:
        extra.sendall(b'{"cmd": "status"}\n')
        f = extra.makefile("rb")
        assert json.loads(f.readline()) == {
            "ok": False,
            "error": "too many control connections (16 are open); try again later",
        }
        assert f.read() == b""
    # the daemon logs it before it answers; its log reaches us through a pipe and a reader thread
    assert wait_for(lambda: "Control: refused a connection" in server.log, 5), server.log
    held.pop().close()
    assert wait_for(lambda: _status_ok(path), 5)
    for s in held:
        s.close()


def test_a_new_connection_takes_the_place_of_the_one_idle_longest(daemon):
    """QA: 16 connections that each got a reply and stayed (a reply allows 300 s of silence),
    or that sent a status every 4 s, locked gaspar ctl out for minutes, or for good."""
    server, path = daemon(1)
    idle = []

    def status(s: socket.socket) -> dict:
        s.sendall(b'{"cmd": "status"}\n')
        reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is True, reply
        return reply["result"]["control"]

    for _ in range(ctl.MAX_CONNECTIONS):
        idle.append(connect(path))
        status(idle[-1])
    for n in (1, 2):  # each stays open, so all 16 are taken again
        idle.append(connect(path))
        control = status(idle[-1])  # served, not refused
        assert control["closed_idle"] == n and control["refused"]["too_many"] == 0, control
        assert idle[n - 1].makefile("rb").read() == b""  # the one idle longest, closed
    idle[2].sendall(b'{"cmd": "status"}\n')  # the others are still served
    assert json.loads(idle[2].makefile("rb").readline())["ok"] is True
    for s in idle:
        s.close()


def _hold(path: str) -> list[socket.socket]:
    """All MAX_CONNECTIONS slots, each reading a request line (whole within 5 s: these
    tests take less), so none is idle and none can be closed to make room."""
    held = [connect(path) for _ in range(ctl.MAX_CONNECTIONS)]
    for s in held:
        s.sendall(b'{"cmd": "status"')
    assert wait_for(lambda: ctl.call(path, {"cmd": "status"}, timeout=2).get("ok") is False, 2)
    return held


def test_refused_connections_are_logged_10_a_minute_and_counted(daemon):
    """QA: a connect/close loop against 16 held connections logged 66,667 warnings in 5 s."""
    server, path = daemon(1)
    held = _hold(path)
    knocks, end = 0, time.monotonic() + 2.0
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1)
        try:
            s.connect(path)
            knocks += 1
        except OSError:  # a full backlog
            pass
        finally:
            s.close()
    assert knocks > 100, knocks
    held.pop().close()
    assert wait_for(lambda: _status_ok(path), 5)
    assert wait_for(lambda: server.log.count("Control: refused a connection") >= 10, 5), server.log[-2000:]
    time.sleep(0.5)  # anything more would have come by now
    assert server.log.count("Control: refused a connection") == 10, server.log.count("Control: refused")
    refused = ctl.call(path, {"cmd": "status"})["result"]["control"]["refused"]
    assert refused["too_many"] >= knocks * 0.9 and refused["too_slow"] == 0, (refused, knocks)
    for s in held:
        s.close()


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(0.5):  # a byte every half second, never a newline
        try:
            sock.sendall(b"{")
        except OSError:
            return


def test_silent_or_trickling_connections_are_closed_after_5_s(daemon):
    """QA: 16 silent connections (or ones sending a byte a second) locked gaspar ctl out for
    as long as they stayed. Now each must send its line whole within 5 s of connecting."""
    server, path = daemon(1)
    started = time.monotonic()
    silent = [connect(path) for _ in range(12)]
    trickling = [connect(path) for _ in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=_trickle, args=(s, stop), daemon=True) for s in trickling]
    for t in threads:
        t.start()
    try:
        busy = ctl.call(path, {"cmd": "status"})  # all 16 are taken
        assert busy["ok"] is False and "too many control connections" in busy["error"], busy
        error = {"ok": False, "error": "no whole request line within 5s; closing the connection"}
        for s in silent + trickling:  # each read bounded by its 10 s socket timeout
            f = s.makefile("rb")
            assert json.loads(f.readline()) == error
            assert time.monotonic() - started > ctl.REQUEST_TIMEOUT - 1  # not before its time
            try:
                assert f.read() == b""  # closed
            except ConnectionResetError:  # a trickler's bytes after the close
                pass
        assert time.monotonic() - started < ctl.REQUEST_TIMEOUT + ctl.LINGER + 4
        # gaspar ctl gets in again, once the refused ones have lingered (LINGER)
        assert wait_for(lambda: _status_ok(path), ctl.LINGER + 3, 0.25), server.log[-2000:]
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    control = ctl.call(path, {"cmd": "status"})["result"]["control"]
    assert control["refused"]["too_slow"] == 16 and control["refused"]["line_too_long"] == 0, control
    # logged 10 a minute, all refusals together: the busy one, then 9 of the 16 slow ones
    assert wait_for(lambda: server.log.count("Control: refused") >= 10, 5), server.log[-2000:]
    time.sleep(0.5)  # anything more would have come by now
    assert server.log.count("Control: refused") == 10, server.log[-2000:]
    assert server.log.count("no whole request line within 5s") == 9
    for s in [*silent, *trickling]:
        s.close()


def _status_ok(path: str) -> bool:
    try:
        return ctl.call(path, {"cmd": "status"}, timeout=2)["ok"] is True
    except (ctl.Unreachable, ValueError, KeyError):
        return False


def test_scale_is_bounded_by_max_workers(daemon, cli):
    server, path = daemon(1, "--max-workers", "2")
    done = gaspar_ctl(path, "scale", str(10**12))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "gaspar ctl: the daemon refused: cannot scale to 1000000000000 workers: max_workers is 2"
    )
    assert gaspar_ctl(path, "scale", "3").returncode == 1
    assert gaspar_ctl(path, "scale", "2").returncode == 0
    assert wait_for(lambda: len(server.stats()["workers"]) == 2, 20), server.log
    too_many = cli("handlers:echo", "--bind", "127.0.0.1:0", "-w", "3", "--max-workers", "2")
    assert too_many.wait(20) == 2
    assert "workers (3) must be at most max_workers (2)" in too_many.log


def test_scale_from_python_is_bounded_too(serve):
    tracked = serve(lambda m: m, processes=1, control_socket="off", max_workers=2)
    with pytest.raises(ValueError, match="max_workers is 2"):
        tracked.producer.scale(10**12)
    assert tracked.producer.settings.max_workers == 2


def test_reload_waits_for_the_outcome_and_status_shows_it(daemon, tmp_path):
    server, path = daemon(2)
    human = gaspar_ctl(path, "status")
    assert "reload" not in human.stdout  # none yet
    (tmp_path / "app.py").write_text(APP.format(version="v2"))
    started = time.monotonic()
    done = gaspar_ctl(path, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reloaded app:handle: every worker runs the new code (generation 2, "), done.stdout
    workers = server.stats()["workers"]  # already replaced when the command returns
    assert [w["generation"] for w in workers if not w["retiring"]] == [2, 2], workers
    assert time.monotonic() - started < 30
    assert "last reload " in gaspar_ctl(path, "status").stdout and ": ok" in gaspar_ctl(path, "status").stdout

    (tmp_path / "app.py").write_text("def handle(m):\n    return b'v3:' +\n")  # a SyntaxError
    done = gaspar_ctl(path, "reload")
    assert done.returncode == 1
    assert done.stderr.startswith("gaspar ctl: reload failed, the old workers stay: cannot import 'app'"), done.stderr
    assert "SyntaxError" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "shadowed" not in done.stderr  # its own module: nothing to rename
    # the log shows where, on lines of their own (continuation lines, not escaped \n)
    assert wait_for(lambda: re.search(r"app\.py\", line 2\n {4}", server.log), 5), server.log[-2000:]
    assert "line 2\\n" not in server.log
    status = gaspar_ctl(path, "status").stdout
    assert "last reload " in status and ": failed: cannot import 'app': SyntaxError" in status, status
    reply = json.loads(gaspar_ctl(path, "--json", "status").stdout)["result"]["reloads"]
    assert reply["under_way"] is None and reply["last"]["ok"] is False and reply["last"]["seq"] == 2

    as_json = gaspar_ctl(path, "--json", "reload")  # the reply as it is, and the same exit status
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["result"]["reload"]["ok"] is False
    quick = gaspar_ctl(path, "reload", "--no-wait")
    assert quick.returncode == 0 and quick.stdout.strip() == "reloading app:handle"
    assert wait_for(lambda: "Reload failed" in server.log.split("Control: reload")[-1], 15)


# -- pure ----------------------------------------------------------------------------------


def test_reloads_settle_once_and_wake_their_waiters():
    book = reloads.Reloads()
    woken = []
    first = book.begin("app:handle", 100.0)
    book.waiters.append(lambda: woken.append(1))
    assert book.snapshot()["under_way"]["seq"] == 1 and book.snapshot()["last"] is None
    book.settle(False, "cannot import 'app'", 101.0)
    book.settle(True, None, 102.0)  # nothing under way: nothing happens
    assert woken == [1] and first.ok is False and book.last is first and book.current is None
    second = book.begin("app:handle", 110.0)
    third = book.begin("app:handle", 111.0)  # while the second still replaces workers
    assert second.ok is True and "superseded by reload 3" in second.reason
    book.settle(True, None, 112.5, generation=3)
    assert book.snapshot() == {"under_way": None, "last": third.as_dict()}
    assert reloads.outcome_text(third.as_dict()) == (
        True,
        "reloaded app:handle: every worker runs the new code (generation 3, 1.5s)",
    )
    assert reloads.outcome_text(first.as_dict())[1] == "reload failed, the old workers stay: cannot import 'app'"
    assert reloads.outcome_text({"ok": None}, 60)[1].startswith("the reload is still under way after 60s")
    assert reloads.status_line(None) is None
    assert reloads.status_line({"under_way": second.as_dict(), "last": None}).startswith("reload under way since ")


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b'{"cmd": "reload"}', ("reload", {"wait": 0})),
        (b'{"cmd": "reload", "wait": 30}', ("reload", {"wait": 30})),
        (b'{"cmd": "reload", "wait": 0.5}', ("reload", {"wait": 0.5})),
    ],
)
def test_parse_reload(line, parsed):
    assert ctl.parse(line) == parsed


@pytest.mark.parametrize("wait", ['"soon"', "-1", "true", "1e9"])
def test_parse_reload_refuses(wait):
    with pytest.raises(ctl.CtlError, match="reload's wait is a number of seconds"):
        ctl.parse(b'{"cmd": "reload", "wait": ' + wait.encode() + b"}")
