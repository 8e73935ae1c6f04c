"""The ``gaspar`` command, run for real: ``serve``, ``request``, ``stats``.

``serve`` runs as a subprocess in its own process group (the ``cli`` fixture kills the
group at teardown and checks nothing is left); the failures that end it at once are run
to completion here, and their process group is checked to be empty afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, alive, children_of, descendants, free_port, wait_for

import gaspar
from gaspar import client

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def gaspar_cmd(*args: str, cwd: str = ROOT, env: dict | None = None, stdin: bytes | None = None, timeout=30):
    """Run ``python -m gaspar ARGS`` to completion in a new session; check it left no process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaspar", *args],
        cwd=cwd,
        env=env or ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    left = wait_for(lambda: not group_members(proc.pid), 5)
    assert left, f"processes left in the group of {args}: {group_members(proc.pid)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (a /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def log_lines(text: str) -> list[str]:
    """The lines of a server's output that are not log records."""
    return [line for line in text.splitlines() if line and not re.match(r"\[[\d-]+ [\d:]+ [+-]\d+\] \[\d+\]", line)]


# -- serve --------------------------------------------------------------------------------------


def test_serve_logs_its_address_and_serves(cli):
    port = free_port()
    server = cli("handlers:upper_str", "--bind", f"127.0.0.1:{port}", "--workers", "2")
    assert server.wait_listening() == f"127.0.0.1:{port}"
    pids = server.wait_ready(2)
    assert f"Listening at: tcp://127.0.0.1:{port} ({server.proc.pid})" in server.log
    assert "Using 2 workers" in server.log
    assert client.request(server.addr, b"hello", timeout=10) == b"HELLO"
    (fork_server,) = children_of(server.proc.pid)
    assert sorted(children_of(fork_server)) == sorted(pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_on_a_signal(cli, sig):
    port = free_port()
    server = cli("handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "3")
    pids = server.wait_ready(3)
    family = descendants(server.proc.pid)
    assert len(family) == 4  # the fork server and three workers
    assert client.request(server.addr, b"x", timeout=10) == b"x"
    server.signal(sig)
    assert server.wait(15) == 0, server.log
    assert not [p for p in family if wait_for(lambda p=p: not alive(p), 5) is False]
    assert not group_members(server.proc.pid)
    for pid in pids:
        assert f"(pid:{pid}) exited" in server.log
    assert "Shutting down: gaspar (exit code 0)" in server.log
    with pytest.raises(gaspar.ConnectFailed):  # nothing listens any more
        client.request(f"127.0.0.1:{port}", b"x", timeout=5)
    with socket.socket() as s:  # and a new server could have the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_serve_log_level(cli):
    port = free_port()
    server = cli("handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "1", "--log-level", "warning")
    addr = f"127.0.0.1:{port}"
    assert wait_for(lambda: _answers(addr), 20), server.log
    victim = json.loads(client.request(addr, b"", timeout=5, stats=True))["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: "killed by SIGKILL" in server.log, 5), server.log
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert "[ERROR] Worker 1" in server.log
    assert "[INFO]" not in server.log and "Listening at" not in server.log


def _answers(addr: str) -> bool:
    try:
        return client.request(addr, b"ping", timeout=2) == b"ping"
    except gaspar.GasparError:
        return False


def test_serve_passes_settings_to_the_daemon(cli):
    server = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "-w", "1", "--timeout", "0.5")
    server.wait_ready(1)
    with pytest.raises(gaspar.WorkerTimeout) as info:
        client.request(server.addr, b"5", timeout=10)
    assert info.value.facts["timeout"] == 0.5
    assert client.request(server.addr, b"0.1", timeout=10) == b"0.1"


# -- serve: what ends it at once ------------------------------------------------------------------

BROKEN_IMPORT = "import os\nVALUE = 1\nraise RuntimeError('no config file')\n"


@pytest.mark.parametrize(
    "spec,module,words",
    [
        ("no_such_module_xyz:handle", None, "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        ("broken_at_import:handle", BROKEN_IMPORT, "cannot import 'broken_at_import': RuntimeError: no config file"),
        ("handlers:no_such_callable", None, "module 'handlers' has no attribute 'no_such_callable'"),
        ("handlers", None, "expected MODULE:CALLABLE, got 'handlers'"),
        ("handlers:__doc__", None, "is a str, not a callable or a Consumer"),
    ],
    ids=["missing module", "module raises", "missing callable", "no callable", "not callable"],
)
def test_serve_exits_at_once_when_the_handler_cannot_load(tmp_path, spec, module, words):
    env = ENV
    if module is not None:
        (tmp_path / (spec.split(":")[0] + ".py")).write_text(module)
        env = dict(ENV, PYTHONPATH=os.pathsep.join([ENV["PYTHONPATH"], str(tmp_path)]))
    t0 = time.monotonic()
    result = gaspar_cmd("serve", spec, "--bind", f"127.0.0.1:{free_port()}", "-w", "2", env=env)
    assert time.monotonic() - t0 < 15
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("gaspar: error: "), result.stderr
    assert len(lines) == (4 if module else 1), result.stderr  # a module that raised adds its frames
    assert words in lines[0]
    # before any fork: the daemon never started
    assert "Starting gaspar" not in result.stderr and "Booting" not in result.stderr


def test_serve_exits_when_the_address_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gaspar_cmd("serve", "handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "2")
    assert result.returncode == 1, result
    reason = log_lines(result.stderr)
    assert reason == [f"gaspar: cannot listen at 127.0.0.1:{port}: Address already in use"], result.stderr
    assert "Booting" not in result.stderr


def test_a_start_that_fails_names_what_it_was_opening(tmp_path):
    """QA: a busy metrics port was reported as the main --bind address, and an access log
    that cannot be opened as "cannot bind remote_bind <its path>"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = gaspar_cmd("serve", "handlers:echo", "--bind", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{busy}")
    assert result.returncode == 1, result
    assert log_lines(result.stderr) == [
        f"gaspar: cannot listen at 127.0.0.1:{busy} (metrics_bind): Address already in use"
    ], result.stderr
    path = tmp_path / "no" / "access.log"
    result = gaspar_cmd("serve", "handlers:echo", "--bind", "127.0.0.1:0", "--access-log", str(path))
    assert result.returncode == 1, result
    assert log_lines(result.stderr) == [f"gaspar: cannot open the access log {path}: No such file or directory"]
    assert f"did not start: cannot open the access log {path}: No such file or directory" in result.stderr


def test_serve_exits_when_another_gaspar_has_the_address(cli):
    port = free_port()
    first = cli("handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "1")
    first.wait_ready(1)
    result = gaspar_cmd("serve", "handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "1", timeout=15)
    assert result.returncode == 1, result
    assert log_lines(result.stderr) == [f"gaspar: cannot listen at 127.0.0.1:{port}: Address already in use"]
    assert client.request(first.addr, b"still mine", timeout=10) == b"still mine"


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.1:http", "localhost:", "127.0.0.1:102716"])
def test_serve_rejects_a_bad_bind(bind):
    result = gaspar_cmd("serve", "handlers:echo", "--bind", bind)
    assert result.returncode == 2
    assert result.stderr.strip() == f"gaspar: error: --bind takes HOST:PORT with a port from 0 to 65535, not {bind!r}"


# -- request and stats ------------------------------------------------------------------------------


@pytest.fixture
def daemon(cli):
    server = cli("handlers:boom", "--bind", "127.0.0.1:0", "-w", "2")
    server.wait_ready(2)
    return server


def test_request_prints_the_reply(daemon):
    result = gaspar_cmd("request", daemon.addr, "hello wörld")
    assert result.returncode == 0, result
    assert result.stdout == "hello wörld\n" and result.stderr == ""


def test_request_reads_standard_input(daemon):
    payload = bytes(range(256)) * 40
    proc = subprocess.run(
        [sys.executable, "-m", "gaspar", "request", daemon.addr, "-"],
        input=payload,
        capture_output=True,
        env=ENV,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == payload + b"\n"


def test_request_reports_a_handler_error(daemon):
    result = gaspar_cmd("request", daemon.addr, "boom now")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "gaspar: HandlerError: ValueError: bad input b'boom now'"


def test_request_to_nothing_fails_with_a_reason():
    port = free_port()
    result = gaspar_cmd("request", f"127.0.0.1:{port}", "x", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith(f"gaspar: ConnectFailed: cannot connect to 127.0.0.1:{port}")


def test_stats_prints_json(daemon):
    for _ in range(3):
        client.request(daemon.addr, b"x", timeout=10)
    result = gaspar_cmd("stats", daemon.addr)
    assert result.returncode == 0, result
    stats = json.loads(result.stdout)
    assert stats["pid"] == daemon.proc.pid
    assert stats["target_workers"] == 2 and len(stats["workers"]) == 2
    assert {w["pid"] for w in stats["workers"]} == set(children_of(children_of(daemon.proc.pid)[0]))
    assert stats["counters"]["completed"] >= 3 and stats["pending"] == 0
    assert stats["version"] == gaspar.__version__


def test_version():
    result = gaspar_cmd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"gaspar {gaspar.__version__}"


@pytest.mark.parametrize("command", ["request", "stats"])
def test_a_bad_address_is_a_one_line_usage_error(command):
    args = ("nope", "hello") if command == "request" else ("nope",)
    result = gaspar_cmd(command, *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"gaspar: error: {command} takes HOST:PORT with a port from 0 to 65535, not 'nope'"


CONFIG = """
import os
timeout = 0.5

def post_fork(worker):
    with open(os.path.join({where!r}, "forked-%d" % worker.pid), "w") as f:
        f.write(str(worker.number))
"""


def test_config_file_sets_options_and_hooks_and_flags_win(cli, tmp_path):
    config = tmp_path / "gaspar_conf.py"
    config.write_text(CONFIG.format(where=str(tmp_path)))
    server = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "-w", "2", "--config", str(config))
    pids = server.wait_ready(2)
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("forked-*")) == sorted(pids)
    with pytest.raises(gaspar.WorkerTimeout):  # timeout = 0.5 from the file
        client.request(server.addr, b"2", timeout=10)
    flagged = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "-w", "1", "--config", str(config), "--timeout", "5")
    flagged.wait_ready(1)
    assert client.request(flagged.addr, b"1", timeout=10) == b"1"  # --timeout 5 wins over the file
