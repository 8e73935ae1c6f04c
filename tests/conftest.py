"""Fixtures that start real gaspar servers and make sure nothing outlives a test.

Every server comes from a fixture that stops it at teardown and then checks that each
worker process it ever saw, and its fork server, is gone (bounded wait). CLI servers run
in their own process group and are SIGKILLed as a group at teardown.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import gaspar
from gaspar import client
from gaspar.ops.ipcdir import remove_stale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise_fd_limit() -> None:
    """1,000 concurrent connections need more than the usual 1,024 descriptors (both ends
    live in this process)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_raise_fd_limit()

# Every daemon a test starts opens a control socket at its default place, under
# $XDG_RUNTIME_DIR: keep them in a directory of this session's, removed when it ends (a test
# daemon killed with SIGKILL cannot remove its own).
_RUNTIME = tempfile.mkdtemp(prefix="gaspar-test-runtime-")
os.environ["XDG_RUNTIME_DIR"] = _RUNTIME
atexit.register(shutil.rmtree, _RUNTIME, True)


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it is true or ``timeout`` runs out; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def addr_of(producer) -> str:
    return "%s:%d" % tuple(producer.server_addr)


class Tracked:
    """A started Producer plus every worker pid it has shown us."""

    def __init__(self, producer):
        self.producer = producer
        self.addr = addr_of(producer)
        self.seen: set[int] = set()
        self.fork_server = producer.fork_server.pid

    def pids(self) -> list[int]:
        pids = self.producer.worker_pids()
        self.seen.update(pids)
        return pids

    def request(self, message: bytes, timeout: float = 10.0, **kw) -> bytes:
        return client.request(self.addr, message, timeout=timeout, **kw)


@pytest.fixture
def serve():
    """``serve(handler_or_consumer, processes=2, **options)`` -> a running Tracked producer."""
    started: list[Tracked] = []

    def start(handler, processes: int = 2, **options) -> Tracked:
        consumer = handler if isinstance(handler, gaspar.Consumer) else gaspar.Consumer(handler=handler)
        producer = gaspar.Producer(consumer, 0, processes=processes, **options)
        producer.start(blocking=False, timeout=20)
        tracked = Tracked(producer)
        tracked.pids()
        started.append(tracked)
        return tracked

    yield start
    for tracked in started:
        try:
            tracked.pids()
        except Exception:
            pass
        tracked.producer.stop(timeout=15)
        assert tracked.producer.stopped.is_set(), "the producer did not stop"
        left = [p for p in tracked.seen | {tracked.fork_server} if wait_for(lambda p=p: not alive(p), 5) is False]
        assert not left, f"processes left behind: {left}"


class LoggedProcess:
    """A subprocess whose output (stdout and stderr together) is collected line by line."""

    def _collect(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


class CliServer(LoggedProcess):
    """A ``python -m gaspar serve`` subprocess, its log collected line by line."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: str = ROOT, nofile: int | None = None):
        cmd = [sys.executable, "-m", "gaspar", "serve", *args]
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        full_env.update(env or {})
        limit = None if nofile is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (nofile,) * 2)
        self._collect(
            subprocess.Popen(
                cmd,
                cwd=cwd,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=limit,  # its fd limit, soft and hard
            )
        )
        self.addr: str | None = None

    def wait_listening(self, timeout: float = 20.0) -> str:
        def found():
            m = re.search(r"Listening at: tcp://([\d.]+):(\d+)", self.log)
            return m and f"{m.group(1)}:{m.group(2)}"

        self.addr = wait_for(found, timeout)
        assert self.addr, f"server did not listen:\n{self.log}"
        return self.addr

    def wait_ready(self, workers: int, timeout: float = 20.0) -> list[int]:
        """Wait until ``workers`` workers are ready; return their pids."""
        self.wait_listening(timeout)

        def ready():
            try:
                stats = client.request(self.addr, b"", timeout=2, stats=True)
            except gaspar.GasparError:
                return None
            import json

            ws = [w for w in json.loads(stats)["workers"] if not w["retiring"]]
            return [w["pid"] for w in ws] if len(ws) == workers else None

        pids = wait_for(ready, timeout, 0.05)
        assert pids, f"workers not ready:\n{self.log}"
        return pids

    def stats(self) -> dict:
        import json

        return json.loads(client.request(self.addr, b"", timeout=5, stats=True))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        else:
            try:  # the server is gone; make sure its group is too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(5)
        self.proc.stdout.close()


@pytest.fixture
def cli():
    """``cli(args...)`` -> a CliServer; killed with its whole process group at teardown."""
    servers: list[CliServer] = []

    def start(*args: str, env: dict | None = None, cwd: str = ROOT, nofile: int | None = None) -> CliServer:
        server = CliServer(list(args), env, str(cwd), nofile)
        servers.append(server)
        return server

    yield start
    for server in servers:
        pids = descendants(server.proc.pid) if server.proc.poll() is None else []
        server.kill()
        left = [p for p in pids if wait_for(lambda p=p: not alive(p), 5) is False]
        assert not left, f"processes left behind by the CLI server: {left}"
    remove_stale()  # the private ipc directories of the servers SIGKILLed here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess(LoggedProcess):
    """A ``python -m gaspar worker`` subprocess (an agent), in its own process group, its
    log collected. ``popen`` starts it elsewhere (inside a network namespace)."""

    def __init__(self, args: list[str], popen=None, path: tuple[str, ...] = ()):
        cmd = [sys.executable, "-m", "gaspar", "worker", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), *path]))
        kw = dict(cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._collect(popen(cmd, **kw) if popen is not None else subprocess.Popen(cmd, **kw))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group (a SIGSTOPped agent too), reap, and check that none of
        its processes is left."""
        pids = [self.proc.pid, *descendants(self.proc.pid)] if self.proc.poll() is None else []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)
        self.proc.stdout.close()
        left = [p for p in pids if wait_for(lambda p=p: not alive(p), 5) is False]
        assert not left, f"processes left behind by an agent: {left}\n{self.log}"


@pytest.fixture
def agent():
    """``agent(args..., popen=None)`` -> an AgentProcess; killed with its group at teardown."""
    started: list[AgentProcess] = []

    def start(*args: str, popen=None, path: tuple[str, ...] = ()) -> AgentProcess:
        proc = AgentProcess(list(args), popen, path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
    remove_stale()  # the private ipc directories of the agents SIGKILLed here


class CpuHog:
    """A process that spins on one CPU until it is killed (``with``): whatever else is
    pinned to that CPU then waits for it about half the time it is ready to run."""

    def __init__(self, cpu: int) -> None:
        code = f"import os, sys\nos.sched_setaffinity(0, {{{cpu}}})\nprint('ready', flush=True)\nwhile True: pass"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"ready\n"  # pinned and spinning
        self.pid = self.proc.pid

    def __enter__(self) -> CpuHog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
