"""The control socket and ``gaspar ctl``, against real daemons (the ``cli`` fixture), plus
the pure parts (the request parser, the default path) as tables."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, free_port, wait_for

from gaspar import client
from gaspar.ops import ctl

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def gaspar_ctl(*args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "ctl", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(path: str) -> dict:
    done = gaspar_ctl("--socket", path, "--json", "status")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is True
    return reply["result"]


def live_pids(path: str) -> list[int]:
    return sorted(w["pid"] for w in status(path)["workers"] if not w["retiring"])


@pytest.fixture
def daemon(cli, tmp_path):
    """``daemon(app="handlers:echo", workers=2)`` -> (server, control socket path), ready."""

    def start(app: str = "handlers:echo", workers: int = 2, path: str | None = None, *extra: str):
        path = path or str(tmp_path / "ctl.sock")
        server = cli(app, "--bind", "127.0.0.1:0", "--workers", str(workers), "--control-socket", path, *extra)
        server.wait_ready(workers)
        return server, path

    return start


def test_socket_is_private_and_status_shows_the_workers(daemon):
    server, path = daemon()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    st = status(path)
    assert len(st["workers"]) == 2 and st["target_workers"] == 2
    assert st["pid"] == server.proc.pid
    human = gaspar_ctl("--socket", path, "status")
    assert human.returncode == 0, human.stderr
    assert f"pid {server.proc.pid}" in human.stdout and "workers 2 of 2" in human.stdout
    assert "queued 0" in human.stdout and "in flight 0" in human.stdout


def test_scale_then_status_shows_three(daemon):
    server, path = daemon()
    done = gaspar_ctl("--socket", path, "scale", "3")
    assert done.returncode == 0, done.stderr
    assert "scaling to 3 workers" in done.stdout
    assert wait_for(lambda: len(live_pids(path)) == 3 and status(path)["worker_states"]["booting"] == 0, 20)
    assert status(path)["target_workers"] == 3
    assert wait_for(lambda: "Control: scale 3" in server.log, 5), server.log


def test_reload_replaces_the_workers(daemon):
    server, path = daemon()
    before = set(live_pids(path))
    done = gaspar_ctl("--socket", path, "reload")
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: len(set(live_pids(path)) - before) == 2 and len(live_pids(path)) == 2, 20), server.log
    assert "Control: reload" in server.log


def test_broadcast_reaches_every_worker(daemon):
    server, path = daemon("handlers:Stateful")
    assert server.stats()["workers"]  # ready
    done = gaspar_ctl("--socket", path, "broadcast", "v2")
    assert done.returncode == 0, done.stderr
    assert "sent to 2 workers" in done.stdout
    # a broadcast travels ahead of any later request on each worker's pipe
    assert {client.request(server.addr, b"x", timeout=10) for _ in range(8)} == {b"v2:x"}
    raw = b"\xff\x00bin"
    reply = ctl.call(path, {"cmd": "broadcast", "message": base64.b64encode(raw).decode(), "encoding": "base64"})
    assert reply == {"ok": True, "result": {"sent": 2}}
    assert {client.request(server.addr, b"x", timeout=10) for _ in range(8)} == {raw + b":x"}
    assert "Control: broadcast (2 bytes)" in server.log


def test_errors_are_replies_and_usage_errors_exit_2(daemon):
    server, path = daemon()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"cmd": "nope"}\nnot json\n{"cmd": "scale", "n": 0}\n{"cmd": "status"}\n')
        f = s.makefile("rb")
        replies = [json.loads(f.readline()) for _ in range(4)]
    assert [r["ok"] for r in replies] == [False, False, False, True]
    assert "unknown command" in replies[0]["error"] and "not JSON" in replies[1]["error"]
    assert "scale 0 needs --remote-bind" in replies[2]["error"], replies[2]
    assert replies[3]["result"]["pid"] == server.proc.pid
    # a usage error is the client's own: exit 2, nothing sent
    assert gaspar_ctl("--socket", path, "scale", "-1").returncode == 2
    assert gaspar_ctl("--socket", path, "frobnicate").returncode == 2


def test_a_refusal_is_exit_1(daemon):
    server, path = daemon("handlers:faulty", 1)
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(client.request, server.addr, b"2", timeout=20)  # holds the graceful stop
    assert wait_for(lambda: status(path)["running"] == 1, 10)
    assert gaspar_ctl("--socket", path, "stop", "--graceful").returncode == 0
    done = gaspar_ctl("--socket", path, "scale", "3")
    assert done.returncode == 1
    assert done.stderr.strip() == "gaspar ctl: the daemon refused: the daemon is stopping"
    assert slow.result(20).endswith(b":2")  # a graceful stop lets it finish
    pool.shutdown()
    assert server.wait(20) == 0


def test_stop_graceful_ends_the_daemon_and_removes_the_socket(daemon):
    server, path = daemon()
    done = gaspar_ctl("--socket", path, "stop", "--graceful")
    assert done.returncode == 0, done.stderr
    assert "stopping (graceful)" in done.stdout
    assert server.wait(20) == 0
    assert not os.path.exists(path)
    assert "Control: stop (graceful)" in server.log


def test_a_stale_socket_is_replaced(daemon, tmp_path):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays; nothing answers on it
    assert os.path.exists(path)
    server, _ = daemon(path=path)
    assert status(path)["pid"] == server.proc.pid
    assert "Replacing a stale control socket" in server.log


def test_a_second_daemon_on_the_same_socket_fails_to_start(daemon, cli):
    first, path = daemon()
    second = cli("handlers:echo", "--bind", "127.0.0.1:0", "--workers", "1", "--control-socket", path)
    assert second.wait(20) == 1
    assert "another gaspar daemon answers on the control socket" in second.log
    assert status(path)["pid"] == first.proc.pid  # the first one's socket is untouched


def test_unreachable_socket_is_exit_2_in_one_line(tmp_path):
    done = gaspar_ctl("--socket", str(tmp_path / "nothing.sock"), "status")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no control socket at" in done.stderr
    stale = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(stale)
    dead.close()
    done = gaspar_ctl("--socket", stale, "status")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot reach the control socket" in done.stderr


def test_the_default_path_is_used_without_the_flag(cli, tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    port = free_port()
    server = cli("handlers:echo", "--bind", f"127.0.0.1:{port}", "--workers", "1", env=env)
    server.wait_ready(1)
    path = tmp_path / "gaspar" / f"{port}.sock"
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert f"Control socket at: {path}" in server.log
    done = gaspar_ctl("--port", str(port), "--json", "status", env=dict(ENV, **env))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["pid"] == server.proc.pid


def test_off_turns_it_off(serve):
    tracked = serve(lambda m: m, processes=1, control_socket="off")
    assert tracked.producer.control_server is None


# -- pure ----------------------------------------------------------------------------------


def test_default_path():
    assert ctl.default_path(8000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == "/run/user/1000/gaspar/8000.sock"
    assert ctl.default_path(8000, {}, 1000) == "/tmp/gaspar-1000/8000.sock"
    assert ctl.default_path(8000, {"XDG_RUNTIME_DIR": "relative"}, 5) == "/tmp/gaspar-5/8000.sock"
    assert ctl.resolve("off", 1) is None and ctl.resolve("", 1) is None and ctl.resolve("/x.sock", 1) == "/x.sock"


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b'{"cmd": "status"}', ("status", {})),
        (b'{"cmd": "scale", "n": 3}', ("scale", {"n": 3})),
        (b'{"cmd": "scale", "n": 0}', ("scale", {"n": 0})),  # refused later without agents
        (b'{"cmd": "reload"}', ("reload", {"wait": 0})),
        (b'{"cmd": "broadcast", "message": "h\\u00e9"}', ("broadcast", {"message": "hé".encode()})),
        (b'{"cmd": "broadcast", "message": "AP8=", "encoding": "base64"}', ("broadcast", {"message": b"\x00\xff"})),
        (b'{"cmd": "stop", "graceful": true}', ("stop", {"graceful": True})),
        (b'{"cmd": "stop"}', ("stop", {"graceful": False})),
    ],
)
def test_parse_accepts(line, parsed):
    assert ctl.parse(line) == parsed


@pytest.mark.parametrize(
    "line, error",
    [
        (b"nope", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # QA: a RecursionError's traceback, unlimited
        (b"[1]", "a JSON object"),
        (b'{"cmd": "dance"}', "unknown command"),
        (b'{"cmd": "scale"}', "0 or more"),
        (b'{"cmd": "scale", "n": -1}', "0 or more"),
        (b'{"cmd": "scale", "n": "3"}', "0 or more"),
        (b'{"cmd": "scale", "n": true}', "0 or more"),
        (b'{"cmd": "broadcast"}', "a string"),
        (b'{"cmd": "broadcast", "message": "!!", "encoding": "base64"}', "base64"),
        (b'{"cmd": "broadcast", "message": "x", "encoding": "rot13"}', "utf-8 or base64"),
        (b'{"cmd": "stop", "graceful": "yes"}', "true or false"),
    ],
)
def test_parse_refuses(line, error):
    with pytest.raises(ctl.CtlError, match=error):
        ctl.parse(line)
