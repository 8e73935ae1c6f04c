"""Operations: strict settings (config file, GASPAR_CMD_ARGS, numeric ranges), a taken
port's log line, plain functions and ``str`` messages in the Python API, stale ipc
directories after a SIGKILL, packaging files and ``--help``.

Anything that touches the CLI runs ``python -m gaspar`` for real (``gaspar_cmd`` runs it
to completion and checks its process group is empty; the ``cli`` fixture kills daemons).
"""

from __future__ import annotations

import asyncio
import configparser
import os
import signal
import socket
import tempfile

import handlers
import pytest
from conftest import ROOT, alive, wait_for
from test_cli import gaspar_cmd, log_lines

import gaspar
from gaspar import aio, client
from gaspar.cli import with_env_args
from gaspar.config import Settings
from gaspar.ops.ipcdir import OWNER_FILE, is_stale, remove_stale, start_time

# -- settings, strictly ---------------------------------------------------------------------------


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "gaspar_conf.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, name, hint",
    [
        ("timout = 5\n", "timout", " (did you mean 'timeout'?)"),
        ("max_request = 10\n", "max_request", " (did you mean 'max_requests'?)"),
        ("worker = 2\n", "worker", " (did you mean 'workers'?)"),
        ("from os.path import join\n", "join", ""),
        ("_private = 1\n", "_private", ""),
    ],
)
def test_a_config_name_that_is_not_a_setting_is_a_usage_error(tmp_path, text, name, hint):
    config = write_config(tmp_path, text)
    result = gaspar_cmd("serve", "handlers:echo", "--bind", "127.0.0.1:0", "--config", config)
    assert result.returncode == 2, result
    assert result.stderr.strip() == f"gaspar: error: config {config!r}: {name!r} is not a setting{hint}"


def test_config_sets_bind_and_workers_and_the_flag_wins(cli, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path, f"import os\nbind = '127.0.0.1:{port}'\nworkers = 2\ntimeout = 5\n")
    server = cli("handlers:echo", "--config", config)
    assert server.wait_listening() == f"127.0.0.1:{port}"
    server.wait_ready(2)
    assert client.request(server.addr, b"from the file", timeout=10) == b"from the file"
    flagged = cli("handlers:echo", "--config", config, "--bind", "127.0.0.1:0", "-w", "1")
    assert flagged.wait_listening() != f"127.0.0.1:{port}"
    flagged.wait_ready(1)


def test_gaspar_cmd_args_come_before_the_real_arguments():
    env = {"GASPAR_CMD_ARGS": "--workers 3 --timeout '2.5'"}
    argv = ["serve", "app:f", "--workers", "1"]
    assert with_env_args(argv, env) == ["serve", "--workers", "3", "--timeout", "2.5", "app:f", "--workers", "1"]
    assert with_env_args(["--log-level", "x"], env) == ["--log-level", "x"]  # no command: unchanged
    assert with_env_args(["request", "h:1", "serve"], env) == ["request", "h:1", "serve"]  # not serve
    assert with_env_args(argv, {}) == argv


def test_gaspar_cmd_args_sets_a_daemon_and_the_command_line_wins(cli):
    env = {"GASPAR_CMD_ARGS": "--workers 2 --bind 127.0.0.1:0"}
    server = cli("handlers:echo", env=env)
    server.wait_ready(2)
    overridden = cli("handlers:echo", "--workers", "1", env=env)
    overridden.wait_ready(1)
    assert overridden.stats()["target_workers"] == 1


def test_gaspar_cmd_args_with_a_bad_quote_is_a_usage_error():
    result = gaspar_cmd("serve", "handlers:echo", env=dict(os.environ, GASPAR_CMD_ARGS="--bind '127"))
    assert result.returncode == 2
    assert result.stderr.strip() == "gaspar: error: GASPAR_CMD_ARGS: No closing quotation"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be at least 1 (0 with --remote-bind), not 0"),
        (["--workers", "-3"], "--workers must be at least 1 (0 with --remote-bind), not -3"),
        (["--workers", "0:2"], "--workers must be at least 1 (0 with --remote-bind), not '0:2'"),
        (["--workers", "3:2"], "--workers takes N or MIN:MAX, not '3:2'"),
        (["--workers", "many"], "--workers takes N or MIN:MAX, not 'many'"),
        (["--workers", "1:99", "--max-workers", "8"], "workers (1:99) must be at most max_workers (8)"),
        (["--timeout", "-1"], "timeout must be 0 or more, not -1.0"),
        (["--graceful-timeout", "-0.5"], "graceful_timeout must be 0 or more, not -0.5"),
        (["--max-requests", "-1"], "max_requests must be 0 or more, not -1"),
        (["--backlog", "0"], "backlog must be at least 1, not 0"),
        (["--worker-nice", "25"], "worker_nice must be from -20 to 19, not 25"),
        (["--statsd-interval", "0"], "statsd_interval must be positive, not 0.0"),
        (["--queue-timeout", "nan"], "queue_timeout must be a number, not nan"),
    ],
)
def test_a_number_out_of_range_is_a_one_line_usage_error(args, message):
    result = gaspar_cmd("serve", "handlers:echo", "--bind", "127.0.0.1:0", *args)
    assert result.returncode == 2, result
    assert result.stderr.strip() == f"gaspar: error: {message}"


def test_workers_from_a_config_file_are_checked_too(tmp_path):
    config = write_config(tmp_path, "workers = 0\n")
    result = gaspar_cmd("serve", "handlers:echo", "--bind", "127.0.0.1:0", "--config", config)
    assert result.returncode == 2
    assert result.stderr.strip() == "gaspar: error: --workers must be at least 1 (0 with --remote-bind), not 0"


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": -1},
        {"idle_timeout": -0.1},
        {"queue_timeout": -2},
        {"max_requests_jitter": -1},
        {"prefetch": -1},
        {"flap_window": -1},
        {"flap_max_retry": -1},
        {"max_message_size": 0},
        {"timeout": "5"},
        {"max_queued": True},
        {"error_detail": "full"},
    ],
)
def test_settings_reject_bad_numbers(options):
    with pytest.raises(ValueError, match=f"^{next(iter(options))} must be "):
        Settings(**options)


def test_zero_still_means_never_or_no_limit():
    s = Settings(timeout=0, idle_timeout=0, queue_timeout=0, max_requests=0, max_queued=0, prefetch=0)
    assert (s.timeout, s.idle_timeout, s.queue_timeout) == (None, None, None)
    assert (s.max_requests, s.max_queued, s.prefetch) == (0, 0, 0)


@pytest.mark.parametrize("processes", [0, -3, 1.5])
def test_producer_rejects_a_bad_worker_count(processes):
    with pytest.raises(ValueError, match="at least 1"):
        gaspar.Producer(handlers.echo, 0, processes=processes)


# -- a taken port ------------------------------------------------------------------------------------


def test_a_taken_port_logs_the_real_exit_code_and_why():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gaspar_cmd("serve", "handlers:echo", "--bind", f"127.0.0.1:{port}", "-w", "1")
    assert result.returncode == 1
    why = f"exit code 1, did not start: cannot listen at 127.0.0.1:{port}: Address already in use"
    assert f"[ERROR] Shutting down: gaspar ({why})" in result.stderr, result.stderr
    assert "exit code 0" not in result.stderr
    assert log_lines(result.stderr) == [f"gaspar: cannot listen at 127.0.0.1:{port}: Address already in use"]


# -- the Python API ----------------------------------------------------------------------------------


class Shout(gaspar.Consumer):
    def handle(self, message: bytes) -> bytes:
        return message.upper()


@pytest.mark.parametrize("handler, reply", [(handlers.echo, b"plain"), (Shout, b"PLAIN"), (Shout(), b"PLAIN")])
def test_producer_takes_a_plain_function_or_a_consumer_class(handler, reply):
    producer = gaspar.Producer(handler, 0, processes=1)
    producer.start(blocking=False, timeout=20)
    try:
        assert isinstance(producer.consumer, gaspar.Consumer)
        assert client.request("%s:%d" % producer.server_addr, b"plain", timeout=10) == reply
        pids = [producer.fork_server.pid, *producer.worker_pids()]
    finally:
        producer.stop(timeout=15)
    assert producer.stopped.is_set()
    assert all(wait_for(lambda p=p: not alive(p), 5) for p in pids)


def test_producer_rejects_what_is_not_callable():
    with pytest.raises(TypeError, match="a Consumer or a callable, not int"):
        gaspar.Producer(42, 0, processes=1)


def test_str_messages_are_sent_utf8_encoded(serve):
    server = serve(handlers.echo, processes=1)
    assert client.request(server.addr, "héllo", timeout=10) == "héllo".encode()
    with client.Client(server.addr, timeout=10) as c:
        assert c.request("wörld") == "wörld".encode()
        assert c.pipeline(["a", b"b", "ç"]) == [b"a", b"b", "ç".encode()]

    async def from_asyncio():
        first = await aio.request(server.addr, "über", timeout=10)
        async with aio.Client(server.addr, timeout=10) as c:
            return first, await c.request("naïve")

    assert asyncio.run(from_asyncio()) == ("über".encode(), "naïve".encode())


# -- stale ipc directories --------------------------------------------------------------------------


def ipc_dir_of(pid: int) -> str:
    """The gaspar-* directory whose owner.pid names ``pid``."""

    def find():
        tmp = tempfile.gettempdir()
        for name in os.listdir(tmp):
            try:
                with open(os.path.join(tmp, name, OWNER_FILE)) as f:
                    if name.startswith("gaspar-") and f.read().split()[0] == str(pid):
                        return os.path.join(tmp, name)
            except (OSError, IndexError):
                continue
        return None

    found = wait_for(find, 10)
    assert found, f"no ipc directory owned by {pid}"
    return found


def test_a_killed_front_ends_directory_is_removed_by_the_next_one(cli, tmp_path):
    live = cli("handlers:echo", "--bind", "127.0.0.1:0", "-w", "1")
    victim = cli("handlers:echo", "--bind", "127.0.0.1:0", "-w", "1")
    live.wait_ready(1)
    victim.wait_ready(1)
    live_dir, victim_dir = ipc_dir_of(live.proc.pid), ipc_dir_of(victim.proc.pid)
    # a directory with no owner.pid (a front end between mkdtemp and writing it) is left alone
    unowned = tempfile.mkdtemp(prefix="gaspar-")
    try:
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        assert os.path.isdir(victim_dir), "SIGKILL left no directory: nothing to test"
        after = cli("handlers:echo", "--bind", "127.0.0.1:0", "-w", "1")
        after.wait_ready(1)
        assert not os.path.exists(victim_dir)
        assert f"Removed {victim_dir}, left by a front end that was killed" in after.log
        assert os.path.isdir(live_dir) and os.path.isdir(unowned)
        assert client.request(live.addr, b"still serving", timeout=10) == b"still serving"
    finally:
        os.rmdir(unowned)


def test_only_this_users_directories_with_a_dead_owner_are_stale(tmp_path):
    def make(name: str, owner: str | None) -> str:
        path = tmp_path / name
        path.mkdir(mode=0o700)
        if owner is not None:
            (path / OWNER_FILE).write_text(owner)
        return str(path)

    me = os.getpid()
    dead = next(p for p in range(4_000_000, 1, -97) if start_time(p) is None)
    alive_dir = make("gaspar-alive", f"{me} {start_time(me)}\n")
    reused = make("gaspar-reused", f"{me} 1\n")  # our pid, another process's start time
    gone = make("gaspar-gone", f"{dead} 12345\n")
    unowned = make("gaspar-unowned", None)
    junk = make("gaspar-junk", "not a pid\n")
    other = make("other-gone", f"{dead} 12345\n")  # not ours by name
    os.symlink(gone, tmp_path / "gaspar-link")
    assert is_stale(gone) and is_stale(reused)
    assert not any(is_stale(p) for p in (alive_dir, unowned, junk, str(tmp_path / "gaspar-link")))
    assert sorted(remove_stale(str(tmp_path))) == sorted([gone, reused])
    assert all(os.path.isdir(p) for p in (alive_dir, unowned, junk, other))


# -- packaging and --help ----------------------------------------------------------------------------


def test_packaging_files():
    assert os.path.isfile(os.path.join(ROOT, "gaspar", "py.typed"))
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License") and "gaspar developers" in text
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "py.typed" in cfg["options.package_data"]["gaspar"]
    classifiers = cfg["metadata"]["classifiers"]
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers
    with open(os.path.join(ROOT, "CHANGELOG.rst")) as f:
        assert f"{gaspar.__version__} (" in f.read()


@pytest.mark.parametrize("command", ["serve", "request", "stats", "top"])
def test_help_has_a_description_and_examples(command):
    result = gaspar_cmd(command, "--help")
    assert result.returncode == 0
    assert "\nexamples:\n" in result.stdout
    assert f"  gaspar {command} " in result.stdout.split("\nexamples:\n", 1)[1]
    description = result.stdout.split("\n\n")[1]
    assert not description.startswith(("positional", "options")) and len(description) > 40
