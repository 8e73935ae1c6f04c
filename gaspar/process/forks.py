"""The parent's side of the fork server: its handle (:class:`ForkServer`) and the hand-over
between fork servers across reloads (:class:`ForkServers`). No eventlet in here.

Workers are forked by a small **fork server** (:mod:`gaspar.process.forkserver`), itself
forked by ``Producer.start()`` (or an agent) before any 0MQ context or eventlet hub exists.
So no worker inherits a hub, a 0MQ context's threads, or a client's connection (a
connection held open by a child would keep its FIN or RST from reaching the client). The
fork server holds the handler's module, imported once, so module-level state is shared
copy-on-write.

A reload, when the consumer was named ``module:attr`` (the CLI's way), starts a *new* fork
server in a fresh interpreter (:meth:`ForkServer.successor`, with :func:`fresh_options`):
it imports the application afresh, every module of it, and says ``reloaded`` (or that the
import failed, and exits). The front end then forks the new generation from it, and tells
the old one to ``retire``: it exits once its last worker is gone. An import that has not
reported within :func:`import_bound` (the ``timeout`` setting, at least 10 s; 60 s when
``timeout`` is 0) is given up: the owner asks :meth:`ForkServers.overdue` from its loop,
which kills that fork server, and the reload fails; the old fork server and its workers
carry on, and the next reload is taken. A consumer given as a
Python object cannot be named for a fresh interpreter; nor can hooks that are not
importable by name (a config file's, a lambda): then a reload re-imports the handler's own
module in the running fork server (:meth:`gaspar.process.worker.Consumer.reloaded`), and
the next forks run that.

    front end ──cmd pipe (JSON lines: spawn, kill, reload, retire)──▶ fork server ──fork──▶ workers
    front end ◀──event pipe (spawned, exited + wait status, reloaded)── fork server

:class:`ForkServers` is shared by the front end's supervisor (in its hub) and by an agent on
another host (blocking): which fork server forks new workers, which one a reload is waiting
on, which ones are retiring, and which one forked a given worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from gaspar.app import shape
from gaspar.apppath import fresh_interpreter
from gaspar.process.forkserver import Server, flush_and_exit, fork_alone
from gaspar.process.worker import Consumer

log = logging.getLogger("gaspar")


#: A fresh fork server's import is never bounded below this (an interpreter's start, a heavy
#: application), nor above :data:`IMPORT_BOUND_NEVER` when ``timeout`` is 0 (never).
IMPORT_BOUND_MIN = 10.0
IMPORT_BOUND_NEVER = 60.0

#: The settings a fork server and its workers use; the rest belong to the front end.
WORKER_SETTINGS = ("proc_name", "worker_nice", "capture_output")
HOOKS = ("post_fork", "worker_exit")


def hook_name(fn: Any) -> str | None:
    """``module:qualname`` naming ``fn`` for a fresh interpreter, or None if it cannot be
    named (a lambda, a closure, a config file's function, ``__main__``'s)."""
    from gaspar.process.worker import _resolve

    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname or module not in sys.modules:
        return None
    try:
        found = _resolve(sys.modules[module], qualname)
    except AttributeError:
        return None
    return f"{module}:{qualname}" if found is fn else None


def import_bound(settings: Any) -> float:
    """Seconds a reload's fresh fork server may take to import the application: the
    ``timeout`` setting (gunicorn's bounds a worker's boot too), at least 10 s; 60 s when it
    is 0 (handlers may run forever; an import may not)."""
    timeout = getattr(settings, "timeout", None)
    return max(float(timeout), IMPORT_BOUND_MIN) if timeout else IMPORT_BOUND_NEVER


#: The front end's ends of its fork servers' pipes, while open. A fork server forked from
#: the front end (a Consumer given as an object) closes them all: holding another fork
#: server's command pipe, it would keep that one from seeing its end (two Producers in one
#: process: stopping the first waited 5 s and killed its fork server).
_HELD: set[int] = set()


class ForkServer:
    """The front end's handle on the fork server process. No eventlet in here."""

    def __init__(self, consumer: Consumer | None, settings: Any, spec: str | None = None) -> None:
        self.consumer = consumer  # None: a fresh interpreter imports ``spec``
        self.spec = spec  # the consumer's ``module:attr``, when it has one
        self.endpoint = ""  # the front end's 0MQ endpoint, set once it is bound
        self.settings = settings
        self.pid: int | None = None
        self.children: dict[int, int] = {}  # its workers' pids and numbers, as its events told us
        self.replacing = False  # started in place of a current one that died, not yet imported
        self.listener: Any = None  # the front end's watch on events_fd
        self._cmd = -1
        self.events_fd = -1
        self._buf = b""
        self._popen: subprocess.Popen | None = None
        self._fresh: dict[str, Any] = {}
        self.shape = shape(consumer)  # the App's handlers and pools at start: a reload keeps them

    def successor(self) -> ForkServer:
        """A fork server, not started, that will import this one's ``spec`` in a fresh
        interpreter. Raises ValueError saying why there cannot be one (no ``spec``, or a
        hook that cannot be named for a fresh interpreter)."""
        if not self.spec:
            raise ValueError("the consumer was given as a Python object, not as module:attr")
        nxt = ForkServer(None, self.settings, self.spec)
        nxt._fresh, nxt.shape = {**fresh_options(self.spec, self.settings), "shape": self.shape}, self.shape
        nxt.endpoint = self.endpoint
        return nxt

    def start(self) -> None:
        if self.consumer is None:
            return self._start_fresh()
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        parent = os.getpid()
        pid = fork_alone()
        if pid == 0:  # the fork server
            code = 1
            try:
                for fd in (cmd_w, evt_r, *_HELD):  # other fork servers' ends too (see _HELD)
                    os.close(fd)
                code = Server(self.consumer, self.settings, cmd_r, evt_w, parent).run()
            except BaseException:
                log.exception("fork server failed")
            finally:
                flush_and_exit(code)
        os.close(cmd_r)
        os.close(evt_w)
        os.set_blocking(evt_r, False)
        _HELD.update((cmd_w, evt_r))
        self.pid, self._cmd, self.events_fd = pid, cmd_w, evt_r

    def _start_fresh(self) -> None:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        options = dict(self._fresh, parent=os.getpid(), cmd=cmd_r, evt=evt_w)
        try:
            argv = [*fresh_interpreter("gaspar.process.forkserver"), json.dumps(options)]
            self._popen = subprocess.Popen(argv, pass_fds=(cmd_r, evt_w), stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (cmd_w, evt_r):
                os.close(fd)
            raise
        finally:
            os.close(cmd_r)
            os.close(evt_w)
        os.set_blocking(evt_r, False)
        _HELD.update((cmd_w, evt_r))
        self.pid, self._cmd, self.events_fd = self._popen.pid, cmd_w, evt_r

    def _send(self, **command: Any) -> None:
        if self._cmd < 0:  # closed: it died and was reaped (its workers with it)
            return
        try:
            os.write(self._cmd, json.dumps(command).encode() + b"\n")
        except OSError as exc:  # the fork server is gone; its exit is reported elsewhere
            log.error("fork server unreachable: %s", exc)

    def spawn(self, number: int, generation: int, token: int, pool: str = "default") -> None:
        fields = {"number": number, "generation": generation, "token": token, "pool": pool}
        self._send(op="spawn", endpoint=self.endpoint, **fields)

    def kill(self, pid: int, sig: int, dump: bool = False) -> None:
        """Signal a worker; with ``dump``, first have it write its stack to the log."""
        self._send(op="kill", pid=pid, sig=int(sig), dump=dump)

    def reload(self) -> None:
        self._send(op="reload")

    def retire(self) -> None:
        """Fork nothing more; exit once the last worker is gone."""
        self._send(op="retire")

    def abandon(self) -> None:
        """SIGKILL this fork server (one stuck importing: it has no worker yet). Its pipe
        closes, and :meth:`close` reaps it; until then the pid is still its own."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
                self.children[event["pid"]] = event["number"]
            elif event["ev"] == "exited":
                self.children.pop(event["pid"], None)
        return events

    def close(self, timeout: float = 5.0) -> None:
        """Ask the fork server to kill what is left and exit; reap it, bounded."""
        if self.pid is None:
            return
        if self._cmd >= 0:
            _HELD.discard(self._cmd)
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
        _HELD.discard(self.events_fd)
        os.close(self.events_fd)
        self.events_fd = -1
        self.pid = None


class ForkServers:
    """The fork servers of one pool: the ``current`` one forks new workers; ``next`` is the
    one a reload started, until it says whether the application imported; ``standby`` is
    the one before a reload's, kept until a worker of the new code is ready (:meth:`proven`)
    so that a reload whose workers cannot boot goes back to it (:meth:`rollback`); ``old``
    ones are retiring and exit once their last worker is gone (a refused one at once).
    Nothing here waits: the owner reads their events and calls :meth:`settle` and :meth:`gone`."""

    def __init__(self, current: ForkServer) -> None:
        self.current = current
        self.next: ForkServer | None = None
        self.next_due = 0.0  # time.monotonic() by which ``next`` must have said it imported
        self.standby: ForkServer | None = None
        self.old: list[ForkServer] = []
        self.deaths: list[float] = []  # when current ones died (see replace)

    def all(self) -> list[ForkServer]:
        return [fs for fs in (self.current, self.next, self.standby, *self.old) if fs is not None]

    def kill(self, pid: int, sig: int, dump: bool = False) -> None:
        """Signal a worker through the fork server that forked it (it knows its children,
        so a recycled pid is never hit); with ``dump``, its stack is logged first."""
        owner = next((fs for fs in self.all() if pid in fs.children), self.current)
        owner.kill(pid, sig, dump)

    def start_next(self) -> tuple[ForkServer | None, str | None]:
        """Begin a reload: ``(fresh, None)``, a fork server importing the application in a
        fresh interpreter (the owner watches its events for "reloaded"); ``(None, None)``
        when the consumer cannot be named for one, so the current fork server re-imports
        the handler's module in place (its "reloaded" follows); ``(None, error)`` when no
        fork server could start."""
        try:
            fresh = self.current.successor()
        except ValueError as exc:
            if self.current.spec:
                log.warning("Cannot start a fresh fork server (%s); re-importing the handler's module only", exc)
            self.current.reload()
            return None, None
        try:
            fresh.start()
        except OSError as exc:
            return None, f"cannot start a fork server: {exc}"
        self.next, self.next_due = fresh, time.monotonic() + import_bound(fresh.settings)
        return fresh, None

    def overdue(self, now: float) -> tuple[ForkServer, str] | None:
        """The next fork server, still importing past its bound: SIGKILLed, and why the reload
        failed (the owner settles it as failed: ``settle(False, fs)``; its exit follows).
        None while nothing is overdue."""
        fs = self.next
        if fs is None or now < self.next_due:
            return None
        bound = import_bound(fs.settings)
        fs.abandon()
        return fs, (
            f"the new fork server (pid:{fs.pid}) had not imported {fs.spec} after {bound:g}s "
            "(an import that hangs?); killed it"
        )

    def check_import(self, on_reloaded: Any) -> None:
        """Give up the next fork server's import if it is :meth:`overdue`: then
        ``on_reloaded(False, why, fs)`` (the owner's, as for a failed import)."""
        late = self.overdue(time.monotonic())
        if late is not None:
            on_reloaded(False, late[1], late[0])

    def settle(self, ok: bool, fs: ForkServer | None) -> None:
        """``fs`` said whether the application imported: the next one that did becomes the
        current one, and the current one the standby (or retires, when an older one, whose
        code is known to boot, is the standby already); one that did not is kept only until
        it exits."""
        if fs is not None and fs is self.next:
            self.next = None
            if ok:
                self.current, fs = fs, self.current
                if self.standby is None:
                    self.standby = fs
                    return
                fs.retire()
            self.old.append(fs)

    def forking(self, older: bool) -> ForkServer:
        """The fork server to fork a worker: the standby for one of an ``older`` generation
        than the current one's (the old code, while a reload's is not yet seen booting)."""
        return self.standby if older and self.standby is not None else self.current

    def proven(self) -> None:
        """A worker of the current fork server's code is ready: the standby retires."""
        if self.standby is not None:
            self.standby.retire()
            self.old.append(self.standby)
            self.standby = None

    def rollback(self, why: str, pids: list[int]) -> str:
        """The current fork server's workers cannot boot: kill those still booting
        (``pids``), go back to the standby, and retire the current one. Returns ``why``,
        with what happened, as the reload's failure."""
        for pid in pids:
            self.kill(pid, signal.SIGKILL)
        if self.standby is None:  # the code was re-imported in place: nothing to go back to
            return f"{why}; the old workers stay, but new ones run the reloaded module"
        self.current.retire()
        self.old.append(self.current)
        self.current, self.standby = self.standby, None
        return f"{why}; back to the old code"

    def replace(self, dead: ForkServer, book: Any) -> tuple[ForkServer | None, list[tuple[int, int]]]:
        """The current fork server died (a handler killed its parent; the OOM killer): its
        workers die with it (``PR_SET_PDEATHSIG``), their exits never reported. Start a fresh
        one in its place, as a reload does (it imports the application first; forks asked
        meanwhile wait in its pipe). Returns it, or None (a consumer given as an object
        cannot be imported afresh; a sixth death within a minute): the owner stops. And its
        workers, ``(pid, number)``, each recorded in the pool ``book`` as killed because
        of it: the owner reports each as an exit (killed by SIGKILL)."""
        pid, now = dead.pid, time.monotonic()
        workers = self.orphans(dead, book)
        dead.close()
        self.deaths = [t for t in self.deaths if now - t < 60.0] + [now]
        fresh, why = None, "that is 6 deaths within a minute"
        if len(self.deaths) <= 5:
            try:
                fresh = dead.successor()
                fresh.start()
            except (ValueError, OSError) as exc:
                fresh, why = None, f"no fresh one can be started: {exc}"
        if fresh is None:
            log.critical("The fork server (pid:%s) died; %s; stopping", pid, why)
            return None, workers
        fresh.replacing, self.current = True, fresh
        log.error("The fork server (pid:%s) died, its workers with it; a fresh one (pid:%s) imports", pid, fresh.pid)
        return fresh, workers

    def orphans(self, dead: ForkServer, book: Any) -> list[tuple[int, int]]:
        """The workers of a fork server that died (current, standby or old), ``(pid,
        number)``: they died with it, unreported; each is recorded in the pool ``book`` as
        killed because of it, for the owner to report as an exit (killed by SIGKILL)."""
        workers = sorted(dead.children.items())
        for child, _ in workers:
            book.killing(child, f"its fork server (pid:{dead.pid}) died")
        return workers

    def replaced(self, fs: ForkServer, ok: bool) -> bool:
        """``fs`` said whether it imported: True if it is a fork server started by
        :meth:`replace` (not a reload's), whose news ends there."""
        if not fs.replacing:
            return False
        fs.replacing = False
        if ok:
            log.info("The fresh fork server (pid:%s) imported %s; forking its workers", fs.pid, fs.spec)
        return True

    def gone(self, fs: ForkServer, book: Any) -> tuple[str | None, list[tuple[int, int]]]:
        """``fs``, not the current one, exited: forgotten and reaped. Returns why the reload
        failed when it was the next one, gone before it said whether it imported; and its
        workers, which died with it (a standby's: see :meth:`orphans`), for the owner to report."""
        failed, workers = None, self.orphans(fs, book)
        if fs is self.next:
            self.next = None
            failed = f"the new fork server (pid:{fs.pid}) exited before it was ready"
        if fs is self.standby:
            self.standby = None
        if fs in self.old:
            self.old.remove(fs)
        fs.close()
        return failed, workers


def fresh_options(spec: str, settings: Any) -> dict[str, Any]:
    """What a fresh fork server needs (without the pids and fds); raises ValueError if a
    hook cannot be named."""
    from gaspar.ops.logs import JsonFormatter

    hooks = {}
    for name in HOOKS:
        fn = getattr(settings, name)
        if fn is not None:
            hooks[name] = hook_name(fn)
            if hooks[name] is None:
                raise ValueError(f"the {name} hook {fn!r} cannot be imported by name")
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
    return {
        "spec": spec,
        "settings": {name: getattr(settings, name) for name in WORKER_SETTINGS},
        "hooks": hooks,
        "log": {"level": root.level, "format": fmt},
        "path": list(sys.path),
    }


__all__ = ["ForkServer", "ForkServers", "fresh_options", "hook_name", "import_bound"]
