"""The framework recipes in examples/web_*.py, run for real.

Each test starts a gaspar daemon serving ``examples.hashing:Hasher`` (the ``cli`` fixture),
starts the web app as a subprocess in its own session on a free port, asks its CPU-heavy
endpoint for a digest (which only the daemon computes: the test checks it against
hashlib, and that the daemon's request counter moved) and its cheap endpoint, then stops
the app with SIGTERM (SIGKILL after a bounded wait) and checks that no process of it is
left. A recipe is skipped only when its framework is not importable; CI installs every
one of them with ``.[test]``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, alive, descendants, free_port, wait_for

BIN = os.path.dirname(sys.executable)
ROUNDS = 100_000  # examples.hashing.Hasher's default


def expected_digest(data: bytes) -> str:
    digest = data
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


def needs(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not importable: {', '.join(missing)} (pip install -e '.[test]')")


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class App:
    """A web app subprocess in its own session; its output goes to a temporary file."""

    def __init__(self, cmd: list[str], port: int, gaspar_addr: str):
        self.port = port
        self.out = tempfile.TemporaryFile()
        env = dict(os.environ, GASPAR_ADDR=gaspar_addr, PORT=str(port), PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids: set[int] = {self.proc.pid}

    @property
    def log(self) -> str:
        self.out.seek(0)
        return self.out.read().decode("utf-8", "replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_up(self, timeout: float = 20.0) -> None:
        def up():
            assert self.proc.poll() is None, f"the app exited with {self.proc.returncode}:\n{self.log}"
            self.pids.update(descendants(self.proc.pid))
            try:
                return get(self.url("/ping"), timeout=2)[0] == 200
            except OSError:
                return False

        assert wait_for(up, timeout, 0.1), f"the app did not answer in {timeout} s:\n{self.log}"

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole session after ``grace`` s; return the exit code
        of a clean stop (``None`` if it had to be killed)."""
        if self.proc.poll() is None:
            self.pids.update(descendants(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
            self.out.close()


@pytest.fixture
def daemon(cli):
    server = cli("examples.hashing:Hasher", "--bind", "127.0.0.1:0", "-w", "2")
    server.wait_ready(2)
    return server


@pytest.fixture
def app_process():
    """``app_process(cmd, port, gaspar_addr)`` -> a started App, stopped at teardown."""
    apps: list[App] = []

    def start(cmd: list[str], port: int, gaspar_addr: str) -> App:
        app = App(cmd, port, gaspar_addr)
        apps.append(app)
        return app

    yield start
    for app in apps:
        if app.proc.returncode is None:
            app.stop()
        left = [p for p in app.pids if wait_for(lambda p=p: not alive(p), 5) is False]
        assert not left, f"processes of the app left behind: {left}"


def _requests_served(daemon) -> int:
    return daemon.stats()["outcomes"]["ok"]


RECIPES = [
    pytest.param(
        lambda port: [
            os.path.join(BIN, "uvicorn"),
            "examples.web_fastapi:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        marks=needs("fastapi", "uvicorn"),
        id="fastapi-uvicorn",
    ),
    pytest.param(
        lambda port: [
            sys.executable,
            "-m",
            "aiohttp.web",
            "-H",
            "127.0.0.1",
            "-P",
            str(port),
            "examples.web_aiohttp:make_app",
        ],
        marks=needs("aiohttp"),
        id="aiohttp",
    ),
    pytest.param(lambda port: [sys.executable, "examples/web_tornado.py"], marks=needs("tornado"), id="tornado"),
    pytest.param(lambda port: [sys.executable, "examples/web_gevent.py"], marks=needs("gevent"), id="gevent"),
    pytest.param(
        lambda port: [
            os.path.join(BIN, "gunicorn"),
            "-k",
            "gthread",
            "--threads",
            "4",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            "examples.web_flask:app",
        ],
        marks=needs("flask", "gunicorn"),
        id="flask-gunicorn-gthread",
    ),
    pytest.param(
        lambda port: [sys.executable, "examples/web_django.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        marks=needs("django"),
        id="django-runserver",
    ),
]


@pytest.mark.parametrize("command", RECIPES)
def test_recipe_offloads_to_gaspar(daemon, app_process, command):
    port = free_port()
    app = app_process(command(port), port, daemon.addr)
    app.wait_up()
    before = _requests_served(daemon)

    started = time.monotonic()
    status, body = get(app.url("/hash?data=hello"))
    assert (status, body) == (200, expected_digest(b"hello")), app.log
    status, body = get(app.url("/hash?data=gaspar"))
    assert (status, body) == (200, expected_digest(b"gaspar")), app.log
    assert time.monotonic() - started < 10
    assert _requests_served(daemon) - before >= 2, "the digests did not come from the gaspar daemon"

    assert get(app.url("/ping")) == (200, "pong")

    code = app.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown; Django's runserver dies of it
    assert code in (0, -signal.SIGTERM), f"the app did not stop on SIGTERM (exit {code}):\n{app.log}"


@pytest.mark.parametrize("command", RECIPES)
def test_cheap_endpoint_answers_while_a_request_runs_in_gaspar(cli, app_process, command):
    """A request waiting for gaspar must not block the app: with ``handlers:sleepy`` (the
    payload is seconds to sleep) the cheap endpoint answers at once meanwhile."""
    sleepy = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "-w", "1")
    sleepy.wait_ready(1)
    port = free_port()
    app = app_process(command(port), port, sleepy.addr)
    app.wait_up()

    replies: list[tuple[int, str]] = []
    slow = threading.Thread(target=lambda: replies.append(get(app.url("/hash?data=1.5"))), daemon=True)
    slow.start()
    assert wait_for(lambda: sleepy.stats()["running"] == 1, 5), "the slow request did not reach gaspar"
    started = time.monotonic()
    assert get(app.url("/ping"), timeout=5) == (200, "pong")
    assert time.monotonic() - started < 0.5, "the cheap endpoint waited for the request in gaspar"
    slow.join(10)
    assert replies == [(200, "1.5")], app.log
    assert app.stop() in (0, -signal.SIGTERM), app.log
