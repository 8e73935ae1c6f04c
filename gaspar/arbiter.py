"""Forking, reaping and the flapping policy.

Workers are forked by a small **fork server**, itself forked by ``Producer.start()`` before
the front end makes its 0MQ context or runs its eventlet hub. So no worker inherits a hub,
a 0MQ context's threads, or a client's connection (a connection held open by a child
would keep its FIN or RST from reaching the client). The fork server holds the handler's
module, imported once, so module-level state is shared copy-on-write.

A reload, when the consumer was named ``module:attr`` (the CLI's way), starts a *new* fork
server in a fresh interpreter (``python -m gaspar.forkserver``, :func:`ForkServer.successor`):
it imports the application afresh, every module of it, and says ``reloaded`` (or that the
import failed, and exits). The front end then forks the new generation from it, and tells
the old one to ``retire``: it exits once its last worker is gone. A consumer given as a
Python object cannot be named for a fresh interpreter; nor can hooks that are not
importable by name (a config file's, a lambda): then a reload re-imports the handler's own
module in the running fork server (:meth:`gaspar.worker.Consumer.reloaded`), and the next
forks run that.

    front end ──cmd pipe (JSON lines: spawn, kill, reload, retire)──▶ fork server ──fork──▶ workers
    front end ◀──event pipe (spawned, exited + wait status, reloaded)── fork server

The fork server knows which pids are still its unreaped children, so a kill never reaches a
recycled pid. It dies with the front end (``PR_SET_PDEATHSIG`` and a parent-pid watchdog),
and its workers die with it the same way: a SIGKILLed front end leaves no process behind.

With ``capture_output`` it also holds the read ends of a pipe per worker and stream (made
before the fork, fds 1 and 2 in the worker) and logs their lines in the same loop that forks
and reaps (:class:`gaspar.capture.OutputCapture`): its stderr is the daemon's, and it has no
hub that must never block.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from .apppath import fresh_interpreter
from .capture import OutputCapture
from .worker import DUMP_SIGNAL, Consumer, Worker, run_worker, set_proctitle, start_watchdog

log = logging.getLogger("gaspar")


class ForkServer:
    """The front end's handle on the fork server process. No eventlet in here."""

    def __init__(self, consumer: Consumer | None, settings: Any, spec: str | None = None) -> None:
        self.consumer = consumer  # None: a fresh interpreter imports ``spec``
        self.spec = spec  # the consumer's ``module:attr``, when it has one
        self.endpoint = ""  # the front end's 0MQ endpoint, set once it is bound
        self.settings = settings
        self.pid: int | None = None
        self.children: set[int] = set()  # its workers, as its events told us
        self.listener: Any = None  # the front end's watch on events_fd
        self._cmd = -1
        self.events_fd = -1
        self._buf = b""
        self._popen: subprocess.Popen | None = None
        self._fresh: dict[str, Any] = {}

    def successor(self) -> ForkServer:
        """A fork server, not started, that will import this one's ``spec`` in a fresh
        interpreter. Raises ValueError saying why there cannot be one (no ``spec``, or a
        hook that cannot be named for a fresh interpreter)."""
        from .forkserver import fresh_options

        if not self.spec:
            raise ValueError("the consumer was given as a Python object, not as module:attr")
        nxt = ForkServer(None, self.settings, self.spec)
        nxt._fresh = fresh_options(self.spec, self.settings)
        nxt.endpoint = self.endpoint
        return nxt

    def start(self) -> None:
        if self.consumer is None:
            return self._start_fresh()
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

    def _start_fresh(self) -> None:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        options = dict(self._fresh, parent=os.getpid(), cmd=cmd_r, evt=evt_w)
        try:
            argv = [*fresh_interpreter("gaspar.forkserver"), json.dumps(options)]
            self._popen = subprocess.Popen(argv, pass_fds=(cmd_r, evt_w), stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (cmd_w, evt_r):
                os.close(fd)
            raise
        finally:
            os.close(cmd_r)
            os.close(evt_w)
        os.set_blocking(evt_r, False)
        self.pid, self._cmd, self.events_fd = self._popen.pid, cmd_w, evt_r

    def _send(self, **command: Any) -> None:
        try:
            os.write(self._cmd, json.dumps(command).encode() + b"\n")
        except OSError as exc:  # the fork server is gone; its exit is reported elsewhere
            log.error("fork server unreachable: %s", exc)

    def spawn(self, number: int, generation: int, token: int) -> None:
        self._send(op="spawn", number=number, generation=generation, token=token, endpoint=self.endpoint)

    def kill(self, pid: int, sig: int, dump: bool = False) -> None:
        """Signal a worker; with ``dump``, first have it write its stack to the log."""
        self._send(op="kill", pid=pid, sig=int(sig), dump=dump)

    def reload(self) -> None:
        self._send(op="reload")

    def retire(self) -> None:
        """Fork nothing more; exit once the last worker is gone."""
        self._send(op="retire")

    def consumer_name(self) -> str:
        if self.spec:
            return self.spec
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
        events = [json.loads(line) for line in lines if line]
        for event in events:  # its own workers: a kill goes through the one that forked it
            if event["ev"] == "spawned":
                self.children.add(event["pid"])
            elif event["ev"] == "exited":
                self.children.discard(event["pid"])
        return events

    def close(self, timeout: float = 5.0) -> None:
        """Ask the fork server to kill what is left and exit; reap it, bounded."""
        if self.pid is None:
            return
        if self._cmd >= 0:
            os.close(self._cmd)
            self._cmd = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        if self._popen is not None:  # reaped here, not by Popen
            self._popen.returncode = os.waitstatus_to_exitcode(status)
        os.close(self.events_fd)
        self.events_fd = -1
        self.pid = None


class _Server:
    """The fork server's loop: fork on request, reap children, report their exits."""

    def __init__(self, consumer: Consumer, settings: Any, cmd: int, evt: int, parent: int) -> None:
        self.consumer, self.settings = consumer, settings
        self.cmd, self.evt = cmd, evt
        self.parent = parent
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stacks: dict[int, int] = {}  # pid -> read end of the pipe its stack dump goes to
        self._buf = b""
        self.output: OutputCapture | None = None  # the workers' stdout and stderr, if captured
        self.retiring = False  # told to retire: exit once no child is left

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
        # a poll set, not select(): two pipes per worker when output is captured
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.cmd, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        if self.settings.capture_output:
            self.output = OutputCapture(self.selector)
        while True:
            events = self.selector.select(1.0)
            ready = {key.fd for key, _ in events}
            if self.wake_r in ready:
                drain(self.wake_r)
            self.reap()
            if self.cmd in ready and not self.handle_commands():
                return self.shutdown()
            self.log_output(events)
            if self.retiring and not self.children:
                return self.shutdown()

    def log_output(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """One bounded read from each worker pipe that was ready (after forks and reaps, so
        a worker's flood never delays them by more than a chunk)."""
        for key, _ in events:
            if key.data is not None:
                key.data(key.fd)

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
        pipes = None
        if self.output is not None:
            _flush_std()  # or what this process buffered would be written again by the child
            try:
                pipes = self.output.pipes()
            except OSError as exc:
                log.error("Worker %s: cannot capture its output (%s); it writes to ours", number, exc)
        stack_r, stack_w = os.pipe()  # the worker's stack, when asked for before a kill
        try:
            pid = os.fork()
        except BaseException:
            if pipes is not None:
                self.output.abandon(pipes)
            os.close(stack_r)
            os.close(stack_w)
            raise
        if pid == 0:
            code = 1
            try:
                for fd in (self.cmd, self.evt, self.wake_r, self.wake_w, stack_r, *self.stacks.values()):
                    os.close(fd)
                self.selector.close()
                signal.set_wakeup_fd(-1)
                if pipes is not None:
                    self.output.child(pipes)
                worker = Worker(number, generation, token, self.consumer, self.settings.proc_name)
                s = self.settings
                code = run_worker(worker, endpoint, s.post_fork, s.worker_exit, s.worker_nice, stack_w)
            except BaseException:
                log.exception("Worker %s (pid:%s) crashed", number, os.getpid())
            finally:
                _flush_and_exit(code)
        os.close(stack_w)
        os.set_blocking(stack_r, False)
        self.children[pid] = number
        self.stacks[pid] = stack_r
        if pipes is not None:
            self.output.attach(pipes, number, pid)
        self.emit(ev="spawned", number=number, generation=generation, token=token, pid=pid)

    def do_kill(self, pid: int, sig: int, dump: bool = False) -> None:
        if pid not in self.children:
            return
        if dump:
            self.dump_stack(pid)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def dump_stack(self, pid: int, wait: float = 0.5) -> None:
        """Have worker ``pid`` write its threads' stacks (``faulthandler``, from C: it works
        in a handler stuck in C code too) and log them, waiting ``wait`` seconds at most for
        them (a frozen worker writes nothing)."""
        fd = self.stacks.get(pid)
        if fd is None:
            return
        drain(fd)  # nothing stale
        try:
            os.kill(pid, DUMP_SIGNAL)
        except ProcessLookupError:
            return
        chunks: list[bytes] = []
        deadline = time.monotonic() + wait
        quiet_after = deadline
        poller = selectors.DefaultSelector()
        poller.register(fd, selectors.EVENT_READ)
        try:
            while (now := time.monotonic()) < min(deadline, quiet_after):
                if not poller.select(min(deadline, quiet_after) - now):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                chunks.append(data)
                quiet_after = time.monotonic() + 0.05  # the dump comes at once: 50 ms of quiet ends it
        finally:
            poller.close()
        number = self.children.get(pid)
        text = b"".join(chunks).decode("utf-8", "replace").rstrip()
        if text:
            log.error("Worker %s (pid:%s) was running, before it was killed:\n%s", number, pid, text)
        else:
            why = "frozen, or stuck in the kernel"
            log.error("Worker %s (pid:%s) wrote no stack within %ss (%s)", number, pid, wait, why)

    def do_reload(self) -> None:
        try:
            self.consumer = self.consumer.reloaded()
        except Exception as exc:
            self.emit(ev="reloaded", ok=False, error=f"{type(exc).__name__}: {exc}")
        else:
            self.emit(ev="reloaded", ok=True, error=None)

    def do_retire(self) -> None:
        self.retiring = True

    def reap(self, report: bool = True) -> None:
        """Collect every child that has exited; with ``report``, tell the front end."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # none left, whatever our map says
                self.children.clear()
                for gone in list(self.stacks):
                    self._forget_stack(gone)
                return
            if not pid:
                return
            number = self.children.pop(pid, None)
            self._forget_stack(pid)
            if self.output is not None:  # its last lines before the news of its exit
                self.output.close(pid)
            if not report:
                continue
            try:
                self.emit(ev="exited", pid=pid, number=number, status=status)
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise

    def _forget_stack(self, pid: int) -> None:
        fd = self.stacks.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def shutdown(self, grace: float = 2.0) -> int:
        """The front end is done: give the workers a moment, then kill what is left."""
        deadline = time.monotonic() + grace
        self.selector.unregister(self.cmd)  # at its end, so always readable
        while self.children and time.monotonic() < deadline:
            events = self.selector.select(0.01)  # woken by SIGCHLD, or a worker's output
            if any(key.fd == self.wake_r for key, _ in events):
                drain(self.wake_r)
            # keep reading their output: a worker blocked on a full pipe could not exit
            self.log_output(events)
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
            self._forget_stack(pid)
            if self.output is not None:
                self.output.close(pid)
        for pid in list(self.stacks):
            self._forget_stack(pid)
        if self.output is not None:
            self.output.close_all()
        return 0


def drain(fd: int) -> None:
    """Read a non-blocking pipe (a wake-up pipe) until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _flush_and_exit(code: int) -> None:
    _flush_std()
    os._exit(code)
