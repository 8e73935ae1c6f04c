"""Forking, reaping and the flapping policy.

Workers are forked by a small **fork server**, itself forked by ``Producer.start()`` before
the front end makes its 0MQ context or runs its eventlet hub. So no worker inherits a hub,
a 0MQ context's threads, or a client's connection (a connection held open by a child
would keep its FIN or RST from reaching the client). The fork server holds the handler's
module, imported once, so module-level state is shared copy-on-write; a reload re-imports
it there, and the next forks run the new code.

    front end ──cmd pipe (JSON lines: spawn, kill, reload)──▶ fork server ──fork──▶ workers
    front end ◀──event pipe (spawned, exited + wait status, reloaded)── fork server

The fork server knows which pids are still its unreaped children, so a kill never reaches a
recycled pid. It dies with the front end (``PR_SET_PDEATHSIG`` and a parent-pid watchdog),
and its workers die with it the same way: a SIGKILLed front end leaves no process behind.

:class:`FlapPolicy` is the pure rule that stops a hopeless start from fork-bombing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from typing import Any

from .worker import Consumer, Worker, run_worker, set_proctitle, start_watchdog

log = logging.getLogger("gaspar")


class FlapPolicy:
    """gaffer's flapping detection, as a pure rule.

    ``attempts`` boot failures within ``window`` seconds are a flapping episode: wait
    ``retry_in`` seconds before forking again. After ``max_retry`` episodes, give up. A
    worker that boots resets the count. With the defaults (5, 10 s, 1 s, 3) a hopeless
    start costs at most 5 x 4 = 20 forks.
    """

    RESPAWN, BACKOFF, GIVE_UP = "respawn", "backoff", "give up"

    def __init__(self, attempts: int = 5, window: float = 10.0, retry_in: float = 1.0, max_retry: int = 3) -> None:
        self.attempts, self.window, self.retry_in, self.max_retry = attempts, window, retry_in, max_retry
        self.failures: deque[float] = deque()
        self.episodes = 0

    def boot_failed(self, now: float) -> tuple[str, float]:
        """Record a worker that died before it was ready; say what to do next."""
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window:
            self.failures.popleft()
        if len(self.failures) < self.attempts:
            return self.RESPAWN, 0.0
        self.failures.clear()
        self.episodes += 1
        if self.episodes > self.max_retry:
            return self.GIVE_UP, 0.0
        return self.BACKOFF, self.retry_in

    def booted(self) -> None:
        """A worker became ready: the start is not hopeless."""
        self.failures.clear()
        self.episodes = 0


def describe_exit(status: int) -> tuple[int | None, int | None, str]:
    """``(exitcode, signal, text)`` for a wait status, in words an operator can act on."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        hint = " Perhaps out of memory?" if sig == signal.SIGKILL else ""
        return None, sig, f"killed by {name}.{hint}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return code, None, f"exited with code {code}"


class ForkServer:
    """The front end's handle on the fork server process. No eventlet in here."""

    def __init__(self, consumer: Consumer, settings: Any) -> None:
        self.consumer = consumer
        self.endpoint = ""  # the front end's 0MQ endpoint, set once it is bound
        self.settings = settings
        self.pid: int | None = None
        self._cmd = -1
        self.events_fd = -1
        self._buf = b""

    def start(self) -> None:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the fork server
            code = 1
            try:
                os.close(cmd_w)
                os.close(evt_r)
                code = _Server(self.consumer, self.settings, cmd_r, evt_w, parent).run()
            except BaseException:
                log.exception("fork server failed")
            finally:
                _flush_and_exit(code)
        os.close(cmd_r)
        os.close(evt_w)
        os.set_blocking(evt_r, False)
        self.pid, self._cmd, self.events_fd = pid, cmd_w, evt_r

    def _send(self, **command: Any) -> None:
        try:
            os.write(self._cmd, json.dumps(command).encode() + b"\n")
        except OSError as exc:  # the fork server is gone; its exit is reported elsewhere
            log.error("fork server unreachable: %s", exc)

    def spawn(self, number: int, generation: int, token: int) -> None:
        self._send(op="spawn", number=number, generation=generation, token=token, endpoint=self.endpoint)

    def kill(self, pid: int, sig: int) -> None:
        self._send(op="kill", pid=pid, sig=int(sig))

    def reload(self) -> None:
        self._send(op="reload")

    def consumer_name(self) -> str:
        target = self.consumer.handler or type(self.consumer)
        return f"{target.__module__}:{target.__qualname__}"

    def read_events(self) -> list[dict[str, Any]] | None:
        """Events available now; None once the fork server has closed its pipe."""
        try:
            data = os.read(self.events_fd, 65536)
        except BlockingIOError:
            return []
        if not data:
            return None
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def close(self, timeout: float = 5.0) -> None:
        """Ask the fork server to kill what is left and exit; reap it, bounded."""
        if self.pid is None:
            return
        if self._cmd >= 0:
            os.close(self._cmd)
            self._cmd = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.events_fd)
        self.pid = None


class _Server:
    """The fork server's loop: fork on request, reap children, report their exits."""

    def __init__(self, consumer: Consumer, settings: Any, cmd: int, evt: int, parent: int) -> None:
        self.consumer, self.settings = consumer, settings
        self.cmd, self.evt = cmd, evt
        self.parent = parent
        self.children: dict[int, int] = {}  # pid -> worker number
        self._buf = b""

    def run(self) -> int:
        set_proctitle(f"{self.settings.proc_name}: fork server")
        start_watchdog(self.parent)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wake_w = wake_w
        while True:
            try:
                ready, _, _ = select.select([self.cmd, self.wake_r], [], [], 1.0)
            except InterruptedError:
                ready = []
            if self.wake_r in ready:
                _drain(self.wake_r)
            self.reap()
            if self.cmd in ready and not self.handle_commands():
                return self.shutdown()

    def handle_commands(self) -> bool:
        data = os.read(self.cmd, 65536)
        if not data:
            return False
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            command = json.loads(line)
            getattr(self, "do_" + command.pop("op"))(**command)
        return True

    def emit(self, **event: Any) -> None:
        os.write(self.evt, json.dumps(event).encode() + b"\n")

    def do_spawn(self, number: int, generation: int, token: int, endpoint: str) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd in (self.cmd, self.evt, self.wake_r, self.wake_w):
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                worker = Worker(number, generation, token, self.consumer, self.settings.proc_name)
                s = self.settings
                code = run_worker(worker, endpoint, s.post_fork, s.worker_exit, s.worker_nice)
            except BaseException:
                log.exception("Worker %s (pid:%s) crashed", number, os.getpid())
            finally:
                _flush_and_exit(code)
        self.children[pid] = number
        self.emit(ev="spawned", number=number, generation=generation, token=token, pid=pid)

    def do_kill(self, pid: int, sig: int) -> None:
        if pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def do_reload(self) -> None:
        try:
            self.consumer = self.consumer.reloaded()
        except Exception as exc:
            self.emit(ev="reloaded", ok=False, error=f"{type(exc).__name__}: {exc}")
        else:
            self.emit(ev="reloaded", ok=True, error=None)

    def reap(self, report: bool = True) -> None:
        """Collect every child that has exited; with ``report``, tell the front end."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # none left, whatever our map says
                self.children.clear()
                return
            if not pid:
                return
            number = self.children.pop(pid, None)
            if not report:
                continue
            try:
                self.emit(ev="exited", pid=pid, number=number, status=status)
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise

    def shutdown(self, grace: float = 2.0) -> int:
        """The front end is done: give the workers a moment, then kill what is left."""
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            time.sleep(0.01)
            self.reap(report=False)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)
        return 0


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
