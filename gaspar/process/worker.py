"""The Consumer (the user's handler) and the main loop of a worker process.

A worker is a forked process with plain blocking pyzmq: no eventlet, no threads but a small
watchdog. It connects a DEALER socket to the front end's ROUTER, says HELLO (its ready
signal), then handles one message at a time:

    front end ──[Q id, payload]──▶ worker ──handle()──▶ [R id status timing, body] ──▶ front end

The front end hands a worker a request when it is idle and, under overload only, a few
more ahead (prefetch, sent as ``AHEAD``). Before it starts a request handed ahead, the worker
takes every message that has arrived, so a ``CANCEL`` for it is seen in time: that request is
answered ``SKIPPED`` and never reaches the handler (its client left, or its deadline
passed). A handler's exception becomes an error reply and the worker carries on; a
handler that kills the process (``os._exit``, a segfault) costs only its own request: the
front end fails it and has the worker replaced.

**Limits.** A request's head carries the client's own limits: its ``handler_timeout`` (from
the handler's start) and what was left of its deadline (from the request's arrival here).
When the first passes, the worker interrupts the handler softly: SIGALRM raises
:class:`gaspar.SoftTimeout` inside it (Celery's ``soft_time_limit``); the front end has
answered the client already, drops the reply, and the worker lives on. Only the operator's
``timeout`` kills a worker, from the front end; first it asks for the handler's stack
(``faulthandler`` on SIGUSR2, written to a pipe the fork server logs), so a hang leaves a
traceback in the log.

A worker exits (code 0) when told to (``EXIT``: finish the request in hand first), and on
its own when its parent dies: ``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread that
checks the parent pid every second elsewhere and as a second line.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from time import perf_counter, thread_time
from typing import Any

from gaspar.errors import SoftTimeout
from gaspar.wire.envelope import ID, TIMING, Kind, limits
from gaspar.wire.framing import Status, error_body

log = logging.getLogger("gaspar")

#: A worker that cannot boot (its ``post_fork`` hook raised) exits with this code, as
#: gunicorn's WORKER_BOOT_ERROR; the supervisor counts it towards flapping.
WORKER_BOOT_ERROR = 3

_LARGE = 64 * 1024  # frames this big are sent without a copy
#: A worker looks for cancels before a request handed ahead only if it has not looked for
#: this long (seconds): a cancel sent later than that before the request would start may
#: miss it. Looking costs a system call; on the bench machine, looking before every request
#: cost 11% of the 64-byte echo's throughput over persistent connections.
CANCEL_LOOK = 0.0005
#: The signal the front end (through the fork server) sends for a dump of the stack before
#: it kills a worker past the operator's timeout.
DUMP_SIGNAL = signal.SIGUSR2


class SoftLimit:
    """The client's limit on one handler run, as a one-shot SIGALRM timer that raises
    :class:`SoftTimeout` in the handler. Armed only around the handler's call, so a late
    signal never lands in the worker's own loop."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = False  # the last armed limit passed: the handler was interrupted
        self.limit: tuple[float, str] = (0.0, "")
        signal.signal(signal.SIGALRM, self._fire)

    def arm(self, seconds: float, kind: str) -> None:
        self.armed, self.fired, self.limit = True, False, (seconds, kind)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6))

    def disarm(self) -> None:
        if self.armed:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _fire(self, _signum: int, _frame: Any) -> None:
        if self.armed:
            self.armed, self.fired = False, True
            raise SoftTimeout(f"{_describe(*self.limit)} passed; its client is answered as timed out")


def _describe(seconds: float, kind: str) -> str:
    return f"the client's {kind} ({seconds:.3g}s)"


class Consumer:
    """Runs the user's handler in every worker.

    Pass ``handler`` (a callable taking the request's ``bytes``) or subclass and override
    :meth:`handle`. A handler returns ``bytes`` (or ``str``, sent UTF-8 encoded). The
    module that defines it is imported before the fork, so its module-level state is
    shared copy-on-write by every worker.
    """

    def __init__(self, handler: Callable[[bytes], bytes | str] | None = None) -> None:
        self.handler = handler

    def handle(self, message: bytes) -> bytes | str:
        """Handle one request. Override this, or pass ``handler``."""
        if self.handler is None:
            raise NotImplementedError("Consumer needs a handler= or a handle() override")
        return self.handler(message)

    def on_broadcast(self, message: bytes) -> None:
        """Called in each live worker by ``Producer.broadcast(message)``; override it."""

    def reloaded(self) -> Consumer:
        """A consumer built from a fresh import of the module that defines this one.

        Used by a rolling reload when the application cannot be loaded in a fresh fork
        server (a Consumer given as an object, a hook that cannot be named): modules that
        this one imports keep their old code. Raises whatever the import raises.
        """
        target = self.handler if self.handler is not None else type(self)
        module = importlib.reload(sys.modules[target.__module__])
        fresh = _resolve(module, target.__qualname__)
        if self.handler is not None:
            clone = object.__new__(type(self))
            clone.__dict__.update(self.__dict__)
            clone.handler = fresh
            return clone
        clone = object.__new__(fresh)
        clone.__dict__.update(self.__dict__)
        return clone


def _resolve(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class Worker:
    """What hooks see of a worker process (``post_fork(worker)``, ``worker_exit(worker)``).

    ``state`` is a dict for per-worker things a hook sets up (a connection, a table).
    """

    def __init__(self, number: int, generation: int, token: int, consumer: Consumer, proc_name: str) -> None:
        self.number = number
        self.generation = generation
        self.token = token  # matches this worker's HELLO to the fork that made it
        self.consumer = consumer
        self.proc_name = proc_name
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.handled = 0
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Worker {self.number} pid={self.pid}>"


def run_worker(
    worker: Worker,
    endpoint: str,
    post_fork: Any = None,
    worker_exit: Any = None,
    nice: int = 0,
    stack_fd: int | None = None,
) -> int:
    """The worker process's whole life; returns its exit code. Runs after the fork.

    Messages are two frames (the ROUTER adds or strips the routing id): a head, the kind's
    byte then the 8-byte request id (and, going back, the status byte), and the body.
    ``stack_fd``: where ``faulthandler`` writes the stack when the front end asks for it.
    """
    import zmq  # the worker's own context, made after the fork
    import zmq.backend

    set_proctitle(f"{worker.proc_name}: worker {worker.number}")
    if nice:
        # Below the front end: on a busy machine its dispatch and socket work run as soon as
        # they are woken instead of queueing behind handlers (bench: fairness p99 and
        # CPU-bound throughput both improved with 5 on 2 cores).
        os.nice(nice)
    start_watchdog(worker.ppid)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # the front end decides; SIGTERM still ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if stack_fd is not None:
        import faulthandler

        faulthandler.register(DUMP_SIGNAL, file=stack_fd, all_threads=True, chain=False)
    soft = SoftLimit()
    if post_fork is not None:
        try:
            post_fork(worker)
        except Exception:
            log.exception("Worker %s (pid:%s) post_fork hook failed", worker.number, worker.pid)
            return WORKER_BOOT_ERROR
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 2000
    sock.routing_id = b"%d:%d" % (worker.pid, worker.generation)
    sock.connect(endpoint)
    hello = {"pid": worker.pid, "number": worker.number, "generation": worker.generation, "token": worker.token}
    sock.send_multipart([Kind.HELLO.value, json.dumps(hello).encode()])
    consumer = worker.consumer
    request, ahead = Kind.REQUEST.value[0], Kind.AHEAD.value[0]
    broadcast, exit_, cancel = Kind.BROADCAST.value[0], Kind.EXIT.value[0], Kind.CANCEL.value[0]
    reply, ack, skipped = Kind.REPLY.value, Kind.ACK.value, Kind.SKIPPED.value
    # pyzmq's Cython methods with int flags: its Python layer is a real share of a small
    # request's cost (see producer.py)
    send, recv, get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
    more, rcvmore, events, pollin = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)
    inbox: deque[tuple[bytes, Any, float]] = deque()  # received, not handled yet (handed ahead)

    def receive(flags: int) -> None:
        head = recv(sock, flags)
        frame = recv(sock, 0, False) if get(sock, rcvmore) else None
        if head[0] != cancel:
            inbox.append((head, frame, perf_counter()))
            return
        for i, (queued, _, _) in enumerate(inbox):  # not there: it ran already; nothing to do
            if queued[0] == ahead and queued[ID] == head[ID]:
                del inbox[i]
                send(sock, skipped + head[ID], 0)
                break

    slow = False  # the last handler ran 1 ms or more: worth measuring its CPU time
    looked = 0.0  # when the socket was last drained, to empty (perf_counter)
    try:
        while True:
            if not inbox:
                receive(0)  # one message: more (a cancel) may wait behind it
                continue  # it may have been a late cancel, for a request that already ran
            if inbox[0][0][0] == ahead and perf_counter() - looked >= CANCEL_LOOK:
                # Only a request handed ahead may be cancelled: take what has arrived first.
                # Asking costs a system call, so a request sent to an idle worker skips it,
                # and so does one started within CANCEL_LOOK of the last look.
                while get(sock, events) & pollin:
                    receive(0)
                looked = perf_counter()
                if not inbox:
                    continue
            head, frame, received = inbox.popleft()
            kind = head[0]
            if kind == request or kind == ahead:
                # CPU time costs two system calls, more than a small handler's run on some
                # machines: it is measured once the last run took 1 ms or more (-1: not measured)
                cpu = thread_time() if slow else -1.0
                wall = perf_counter()
                limit = client_limit(head, wall - received)
                status, body = call_handler(consumer.handle, frame, limit=limit, soft=soft)
                wall = perf_counter() - wall
                if cpu >= 0:
                    cpu = thread_time() - cpu
                slow = wall >= 0.001
                worker.handled += 1
                send(sock, reply + head[ID] + status + TIMING.pack(wall, cpu), more)
                send(sock, body, 0, len(body) < _LARGE)
            elif kind == broadcast:
                status, body = call_handler(consumer.on_broadcast, frame, broadcast=True)
                send(sock, ack + head[ID] + status, more)
                send(sock, body, 0)
            elif kind == exit_:
                break
    finally:
        if worker_exit is not None:
            try:
                worker_exit(worker)
            except Exception:
                log.exception("Worker %s (pid:%s) worker_exit hook failed", worker.number, worker.pid)
        sock.close()
        ctx.term()
    return 0


_OK = bytes([Status.OK])
_ERROR = bytes([Status.HANDLER_ERROR])
_TIMEOUT = bytes([Status.TIMEOUT])


def _timeout_body(limit: tuple[float, str], what: str) -> bytes:
    """A reply saying the client's own limit passed (a WorkerTimeout that killed nothing)."""
    seconds, kind = limit
    facts = {"timeout": round(seconds, 6), "limit": kind, "killed": False, "pid": os.getpid()}
    return error_body("WorkerTimeout", f"{_describe(seconds, kind)} {what}", **facts)


def client_limit(head: bytes, waited: float) -> tuple[float, str] | None:
    """The client's limit on a request's handler from its head, ``(seconds from now, which)``
    (``handler_timeout`` or ``deadline``), or None: its ``handler_timeout``, or what is left
    of its deadline once the ``waited`` seconds since the request arrived here are taken
    off, whichever comes first."""
    found = limits(head)
    if found is None:
        return None
    soft_ms, deadline_ms = found
    best = None
    if soft_ms:
        best = (soft_ms / 1000.0, "handler_timeout")
    if deadline_ms:
        left = deadline_ms / 1000.0 - waited
        if best is None or left < best[0]:
            best = (left, "deadline")
    return best


def call_handler(
    fn: Callable[[Any], Any],
    frame: Any,
    broadcast: bool = False,
    limit: tuple[float, str] | None = None,
    soft: SoftLimit | None = None,
) -> tuple[bytes, Any]:
    """Run ``fn`` on a request frame; return (status byte, body) and never raise. With a
    ``limit``, the handler is interrupted (``SoftTimeout``) when it passes; one that has
    passed already is not run at all."""
    message = frame.bytes  # handlers get bytes, whatever the size (one copy of a large one)
    try:
        if limit is None or soft is None:
            result = fn(message)
        elif limit[0] <= 0:
            return _TIMEOUT, _timeout_body(limit, "passed before the handler started; it was not run")
        else:
            try:
                soft.arm(*limit)
                result = fn(message)
            finally:
                soft.disarm()
        if broadcast:
            return _OK, b""
        if isinstance(result, str):
            return _OK, result.encode("utf-8")
        if isinstance(result, (bytes, bytearray, memoryview)):
            return _OK, result
        raise TypeError(f"handler returned {type(result).__name__}, expected bytes or str")
    except Exception as exc:
        if soft is not None:
            soft.armed = False  # raised in the timer's own disarm: it has fired; never again
            if soft.fired and isinstance(exc, SoftTimeout):
                return _TIMEOUT, _timeout_body(soft.limit, "passed; the handler was interrupted, the worker lives on")
        tb = traceback.format_exc()
        return _ERROR, error_body(type(exc).__name__, str(exc), traceback=tb)


def start_watchdog(parent: int, interval: float = 1.0) -> None:
    """Exit this process when its parent is gone (a backstop to PR_SET_PDEATHSIG)."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            threading.Event().wait(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="gaspar-watchdog", daemon=True).start()


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


def set_proctitle(title: str) -> None:
    """Name this process in ``ps`` when the optional setproctitle is installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)
