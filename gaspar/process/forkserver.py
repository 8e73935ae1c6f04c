"""The fork server: the process that forks and reaps the workers (:class:`Server`), and its
entry point in a fresh interpreter, which a reload starts (:func:`main`).

The fork server knows which pids are still its unreaped children, so a kill never reaches a
recycled pid. It dies with its parent (``PR_SET_PDEATHSIG``, and a look at its parent's pid each
turn of its loop, at least once a second), and its workers die with it the same way
(theirs is a watchdog thread): a SIGKILLed front end leaves no process behind.

**No thread.** The fork server runs no thread of its own, so it never forks while
multi-threaded (a child of a multi-threaded process may deadlock on a lock that another
thread held at the fork). Python 3.12+ warns at such a fork, and also when a process's
name has a space in it (it miscounts the threads in ``/proc/self/stat`` then: "gaspar:
fork server" with setproctitle). So the fork server counts its threads itself
(``/proc/self/task``): it logs a warning, once, if the application started one, and
silences Python's (and eventlet's: the first fork server inherits its parent's imports,
not its hub) only while it has none.

With ``capture_output`` the fork server also holds the read ends of a pipe per worker and
stream (made before the fork, fds 1 and 2 in the worker) and logs their lines in the same
loop that forks and reaps (:class:`gaspar.process.capture.OutputCapture`): its stderr is the daemon's, and it has no hub
that must never block.

**In a fresh interpreter.** A fresh interpreter inherits no Python object, so its parent
passes it, as one JSON argument, what it needs by name (:func:`gaspar.process.forks.fresh_options`):
the consumer's ``module:attr``, the settings workers use (``proc_name``, ``worker_nice``,
``capture_output``, the ``post_fork`` and ``worker_exit`` hooks as ``module:qualname``), the
log level and format, ``sys.path``, its parent's pid and the two pipe fds. It is run as
``__main__`` by a short ``python -P -c`` (:func:`gaspar.apppath.fresh_interpreter`; 3.10 has
no ``-P``, so the ``-c`` drops the current directory itself), which never searches the
current directory before the standard library, and it takes its parent's ``sys.path`` as it
is: the application's directory after the standard library there too. It imports the
application (every module, afresh) before it reports; an import that fails is reported with
its error and the process exits, so the old fork server and its workers carry on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import sys
import time
import warnings
from typing import Any

from gaspar.app import reshaped, shape
from gaspar.ops.telemetry import LogLimiter
from gaspar.process.capture import OutputCapture
from gaspar.process.worker import DUMP_SIGNAL, Consumer, Worker, die_with_parent, run_worker, set_proctitle

log = logging.getLogger("gaspar")


class Server:
    """The fork server's loop: fork on request, reap children, report their exits."""

    def __init__(self, consumer: Consumer, settings: Any, cmd: int, evt: int, parent: int) -> None:
        self.consumer, self.settings = consumer, settings
        self.cmd, self.evt = cmd, evt
        self.parent = parent
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stacks: dict[int, int] = {}  # pid -> read end of the pipe its stack dump goes to
        self.crash_log = LogLimiter(burst=10, period=60.0)  # crashes' stacks: a crash loop's flood
        self._buf = b""
        self.output: OutputCapture | None = None  # the workers' stdout and stderr, if captured
        self.retiring = False  # told to retire: exit once no child is left
        self.threads_told = False  # the log said the application started threads here

    def run(self) -> int:
        set_proctitle(f"{self.settings.proc_name}: fork server")
        die_with_parent(self.parent)  # and the loop below looks, as a worker's watchdog does
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
            if os.getppid() != self.parent:  # a backstop to PR_SET_PDEATHSIG
                os._exit(1)
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

    def do_spawn(self, number: int, generation: int, token: int, endpoint: str, pool: str = "default") -> None:
        pipes = None
        if self.output is not None:
            _flush_std()  # or what this process buffered would be written again by the child
            try:
                pipes = self.output.pipes()
            except OSError as exc:
                log.error("Worker %s: cannot capture its output (%s); it writes to ours", number, exc)
        stack_r, stack_w = os.pipe()  # the worker's stack, when asked for before a kill
        threads = thread_count()
        if threads > 1 and not self.threads_told:
            self.threads_told = True
            log.warning(
                "The fork server runs %d threads (started by the application's import?): a "
                "worker forked while another thread holds a lock may deadlock on it",
                threads,
            )
        try:
            pid = fork_alone(threads)
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
                worker = Worker(number, generation, token, self.consumer, self.settings.proc_name, pool)
                s = self.settings
                code = run_worker(worker, endpoint, s.post_fork, s.worker_exit, s.worker_nice, stack_w)
            except SystemExit as exc:  # a handler's sys.exit(n): the worker exits with n, as Python would
                code = 0 if exc.code is None else exc.code
                if not isinstance(code, int):  # sys.exit("message"): Python prints it, and exits 1
                    log.error("Worker %s (pid:%s) called sys.exit(%r)", number, os.getpid(), code)
                    code = 1
            except BaseException:
                log.exception("Worker %s (pid:%s) crashed", number, os.getpid())
            finally:
                flush_and_exit(code)
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
            # the stack in the message itself, not an argument: its lines become the text log's
            # indented continuation lines, as a handler's traceback (an argument's are escaped)
            log.error(f"Worker {number} (pid:{pid}) was running, before it was killed:\n{text}")
        else:
            why = "frozen, or stuck in the kernel"
            log.error("Worker %s (pid:%s) wrote no stack within %ss (%s)", number, pid, wait, why)

    def do_reload(self) -> None:
        try:
            new = self.consumer.reloaded()
        except Exception as exc:
            self.emit(ev="reloaded", ok=False, error=f"{type(exc).__name__}: {exc}")
            return
        if why := reshaped(shape(self.consumer), shape(new)):
            self.emit(ev="reloaded", ok=False, error=why)
        else:
            self.consumer = new
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
            self._forget_stack(pid, number)
            if self.output is not None:  # its last lines before the news of its exit
                self.output.close(pid)
            if not report:
                continue
            try:
                self.emit(ev="exited", pid=pid, number=number, status=status)
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise

    def _forget_stack(self, pid: int, number: int | None = None) -> None:
        """Close an exited worker's stack pipe; what is in it is a crash's stack (a fatal
        signal: ``faulthandler.enable`` in the worker), logged."""
        fd = self.stacks.pop(pid, None)
        if fd is not None:
            text = drain(fd, 65536).decode("utf-8", "replace").rstrip()
            allowed, held = self.crash_log.allow() if text else (False, 0)
            if allowed:  # 10 a minute: a request that segfaults its worker, again and again
                more = f" ({held} more crash stacks not logged)" if held else ""
                log.error(f"Worker {number} (pid:{pid}) crashed{more} in:\n{text}")  # lines as above
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


def drain(fd: int, keep: int = 0) -> bytes:
    """Read a non-blocking pipe (a wake-up pipe) until it is empty; return the first
    ``keep`` bytes read."""
    kept = b""
    try:
        while data := os.read(fd, 4096):
            if len(kept) < keep:
                kept += data
    except BlockingIOError:
        pass
    return kept[:keep]


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def flush_and_exit(code: int) -> None:
    _flush_std()
    os._exit(code)


def _load(options: dict[str, Any]) -> tuple[Any, Any]:
    """The consumer and the settings, imported afresh; raises what the import raises."""
    from gaspar.config import Settings
    from gaspar.loading import UsageError, load_consumer

    try:
        consumer = load_consumer(options["spec"])
    except UsageError as exc:
        if exc.detail:  # the application's traceback: a message of its own, so that its
            log.error(exc.detail)  # lines are continuation lines, not one escaped line
        raise
    hooks = {name: _import(*hook.split(":", 1)) for name, hook in options["hooks"].items()}
    return consumer, Settings(**options["settings"], **hooks)


def _import(module: str, qualname: str) -> Any:
    import importlib

    from gaspar.process.worker import _resolve

    return _resolve(importlib.import_module(module), qualname)


def thread_count() -> int:
    """The threads of this process, C ones too (Python's ``threading`` sees its own only)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: what Python knows
        import threading

        return threading.active_count()


def fork_alone(threads: int | None = None) -> int:
    """``os.fork()`` in a process that should run one thread (the front end before its
    first 0MQ socket, the fork server). While it does, Python's warning about forking a
    multi-threaded process (3.12+, which miscounts a process whose name has a space in it)
    and eventlet's about forking at all (no hub runs here yet) are silenced; with more
    threads they stand. ``threads``: the count, if the caller has just taken it."""
    if (thread_count() if threads is None else threads) > 1:
        return os.fork()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
        warnings.filterwarnings("ignore", r"Using fork\(\) is a bad idea", DeprecationWarning)
        return os.fork()


def main(argv: list[str]) -> int:
    options = json.loads(argv[0])
    parent, cmd, evt = options["parent"], options["cmd"], options["evt"]
    # as the first fork server: a terminal's ^C or a stray signal is the front end's business
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from gaspar.ops.logs import configure

    die_with_parent(parent)  # during the import too
    set_proctitle(f"{options['settings']['proc_name']}: fork server (importing)")  # not python -c {json}
    configure(options["log"]["level"], options["log"]["format"], sys.stderr)
    from gaspar.apppath import adopt

    adopt(options["path"])  # the front end's, in its order: the application's directory last
    try:
        consumer, settings = _load(options)
    except Exception as exc:
        from gaspar.loading import UsageError

        error = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
        _emit(evt, ev="reloaded", ok=False, error=error)
        return 1
    if why := reshaped(options.get("shape"), shape(consumer)):  # it imports, but cannot be taken
        _emit(evt, ev="reloaded", ok=False, error=why)
        return 1
    _emit(evt, ev="reloaded", ok=True, error=None)
    return Server(consumer, settings, cmd, evt, parent).run()


def _emit(fd: int, **event: Any) -> None:
    os.write(fd, json.dumps(event).encode() + b"\n")


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except BaseException:
        log.exception("fork server failed")
    finally:
        flush_and_exit(code)
