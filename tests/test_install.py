"""The README's "Installation" from a built wheel: ``python -m build --wheel``, then the
wheel installed with an extra into a fresh virtual environment, which runs the quick start
(``gaspar serve gaspar.demo:echo`` and a one-line client call) on its own, away from the
source tree.

The dependencies (pyzmq, eventlet, prometheus_client, and setuptools for the isolated
build) come from the package index pip is configured with, as they would for a user; when
none answers, the test is skipped, saying so. About 10 s on two cores.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, wait_for

import gaspar

#: What a copy of the source tree to build from leaves out: generated files and tooling.
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "bench", "tests"
)
OFFLINE = ("No matching distribution", "Could not find a version", "NewConnectionError", "Temporary failure")


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def needs_index(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        if any(word in done.stdout + done.stderr for word in OFFLINE):
            pytest.skip(f"{what} needs a package index, and none answered: {done.stderr.strip()[-300:]}")
        pytest.fail(f"{what} failed:\n{done.stdout}\n{done.stderr}")


@pytest.mark.timeout(240)
def test_the_wheel_installs_with_an_extra_and_runs_the_quick_start(tmp_path):
    pytest.importorskip("build", reason="python -m build (pip install -e '.[test]')")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    built = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(src)], 120)
    needs_index(built, "python -m build")
    (wheel,) = (tmp_path / "dist").glob("gaspar-*.whl")
    assert wheel.name == f"gaspar-{gaspar.__version__}-py3-none-any.whl"

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], 60)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    # the README's `pip install 'dist/gaspar-2...whl[metrics]'`, with this pip, into that venv
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--find-links", str(tmp_path / "dist")]
    installed = run([*pip, f"{wheel}[metrics]"], 120)
    needs_index(installed, "pip install the wheel")

    port = free_port()
    where = tmp_path / "elsewhere"  # not the source tree: the venv's gaspar, or nothing
    where.mkdir()
    serve = [str(venv / "bin" / "gaspar"), "serve", "gaspar.demo:echo", "--bind", f"127.0.0.1:{port}", "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen(
        [*serve, "--metrics-bind", "127.0.0.1:0", "--control-socket", "off"],  # metrics: the extra is there
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        one_line = f"from gaspar import client; print(client.request('127.0.0.1:{port}', b'hello'))"

        def answered():
            done = run([python, "-c", one_line], 30, cwd=where)
            return done.returncode == 0 and done.stdout.strip() == "b'hello'"

        assert wait_for(answered, 30, 0.2), _stop(server)
        where_from = run([python, "-c", "import gaspar; print(gaspar.__file__)"], 30, cwd=where).stdout
        assert where_from.startswith(str(venv)), where_from
    finally:
        log = _stop(server)
    assert re.search(r"Metrics at: http://127\.0\.0\.1:\d+/metrics", log), log


def _stop(server: subprocess.Popen) -> str:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    try:  # whatever of its group is left
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return server.stdout.read().decode("utf-8", "replace")
