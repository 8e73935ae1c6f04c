"""A fork server in a fresh interpreter: what a reload starts (``python -m gaspar.forkserver``).

A fresh interpreter inherits no Python object, so the front end passes it, as one JSON
argument, what it needs by name: the consumer's ``module:attr``, the settings workers use
(``proc_name``, ``worker_nice``, ``capture_output``, the ``post_fork`` and ``worker_exit``
hooks as ``module:qualname``), the log level and format, ``sys.path``, its own pid and the
two pipe fds (:class:`gaspar.arbiter.ForkServer` made them, ``pass_fds`` kept them open).
It is run as ``__main__`` by a short ``python -P -c`` (:func:`gaspar.apppath.fresh_interpreter`;
3.10 has no ``-P``, so the ``-c`` drops the current directory itself), which never searches
the current directory before the standard library, and it takes the front end's ``sys.path``
as it is: the application's directory after the standard library there too.

    front end ──Popen──▶ python -P -c (runs gaspar.forkserver) ──import app──▶ "reloaded" ok / error
                                                               └─ok: the loop of gaspar.arbiter._Server

It imports the application (every module, afresh) before it reports; an import that fails
is reported with its error and the process exits, so the old fork server and its workers
carry on. It dies with the front end, as the first fork server does.

:class:`ForkServers` is the hand-over itself, shared by the front end's
:class:`gaspar.supervisor.Supervisor` (in its hub) and by an agent on another host
(blocking, :mod:`gaspar.agent`): which fork server forks new workers, which one a reload is
waiting on, which ones are retiring, and which one forked a given worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .arbiter import ForkServer

log = logging.getLogger("gaspar")

#: The settings a fork server and its workers use; the rest belong to the front end.
WORKER_SETTINGS = ("proc_name", "worker_nice", "capture_output")
HOOKS = ("post_fork", "worker_exit")


def hook_name(fn: Any) -> str | None:
    """``module:qualname`` naming ``fn`` for a fresh interpreter, or None if it cannot be
    named (a lambda, a closure, a config file's function, ``__main__``'s)."""
    from .worker import _resolve

    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname or module not in sys.modules:
        return None
    try:
        found = _resolve(sys.modules[module], qualname)
    except AttributeError:
        return None
    return f"{module}:{qualname}" if found is fn else None


class ForkServers:
    """The fork servers of one pool: the ``current`` one forks new workers; ``next`` is the
    one a reload started, until it says whether the application imported; ``old`` ones
    are retiring and exit once their last worker is gone (a refused one at once). Nothing
    here waits: the owner reads their events and calls :meth:`settle` and :meth:`gone`."""

    def __init__(self, current: ForkServer) -> None:
        self.current = current
        self.next: ForkServer | None = None
        self.old: list[ForkServer] = []

    def all(self) -> list[ForkServer]:
        return [fs for fs in (self.current, self.next, *self.old) if fs is not None]

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
        self.next = fresh
        return fresh, None

    def settle(self, ok: bool, fs: ForkServer | None) -> None:
        """``fs`` said whether the application imported: the next one that did becomes the
        current one, which retires; one that did not is kept only until it exits."""
        if fs is not None and fs is self.next:
            self.next = None
            if ok:
                self.current, fs = fs, self.current
                fs.retire()
            self.old.append(fs)

    def gone(self, fs: ForkServer) -> str | None:
        """``fs``, not the current one, exited: forgotten and reaped. Returns why the reload
        failed when it was the next one, gone before it said whether it imported."""
        failed = None
        if fs is self.next:
            self.next = None
            failed = f"the new fork server (pid:{fs.pid}) exited before it was ready"
        if fs in self.old:
            self.old.remove(fs)
        fs.close()
        return failed


def fresh_options(spec: str, settings: Any) -> dict[str, Any]:
    """What a fresh fork server needs (without the pids and fds); raises ValueError if a
    hook cannot be named."""
    from .logs import JsonFormatter

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


def _load(options: dict[str, Any]) -> tuple[Any, Any]:
    """The consumer and the settings, imported afresh; raises what the import raises."""
    from .cli import UsageError, load_consumer
    from .config import Settings

    try:
        consumer = load_consumer(options["spec"])
    except UsageError as exc:
        if exc.detail:
            log.error("%s", exc.detail)
        raise
    hooks = {name: _import(*hook.split(":", 1)) for name, hook in options["hooks"].items()}
    return consumer, Settings(**options["settings"], **hooks)


def _import(module: str, qualname: str) -> Any:
    import importlib

    from .worker import _resolve

    return _resolve(importlib.import_module(module), qualname)


def main(argv: list[str]) -> int:
    options = json.loads(argv[0])
    parent, cmd, evt = options["parent"], options["cmd"], options["evt"]
    # as the first fork server: a terminal's ^C or a stray signal is the front end's business
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from .logs import configure
    from .worker import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)  # during the import too
    if os.getppid() != parent:
        return 1
    configure(options["log"]["level"], options["log"]["format"], sys.stderr)
    from .apppath import adopt

    adopt(options["path"])  # the front end's, in its order: the application's directory last
    try:
        consumer, settings = _load(options)
    except Exception as exc:
        from .cli import UsageError

        error = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
        _emit(evt, ev="reloaded", ok=False, error=error)
        return 1
    _emit(evt, ev="reloaded", ok=True, error=None)
    from .arbiter import _Server

    return _Server(consumer, settings, cmd, evt, parent).run()


def _emit(fd: int, **event: Any) -> None:
    os.write(fd, json.dumps(event).encode() + b"\n")


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except BaseException:
        log.exception("fork server failed")
    finally:
        from gaspar.arbiter import _flush_and_exit

        _flush_and_exit(code)
