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
front end fails it and has the worker replaced. ``os._exit`` first lets the replies already
sent leave (:func:`flushing_exit`), and a crash's stack is logged (``faulthandler``).

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
from collections import deque
from collections.abc import Callable
from time import perf_counter, thread_time
from typing import Any

from gaspar.core.pool import BOOT_ERROR_CHARS
from gaspar.process.running import (
    ITEM,
    STREAM_BYTES,
    STREAM_WINDOW,
    Refused,
    SoftLimit,
    call_handler,
    client_limit,
    run_stream,
)
from gaspar.wire.envelope import CALL_AT, CREDITS, ID, STREAM, TIMING, Kind

log = logging.getLogger("gaspar")

#: A worker that cannot boot (its ``post_fork`` hook or its App's setup raised) exits with this code, as
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

    def start(self, pools: set[str] | None = None) -> None:
        """Called once in each worker after the fork, before its first request (an App
        runs its pools' setup hooks here)."""

    def handler_of(self, body: Any) -> str:
        """In the front end: the handler a call's body names, if this consumer has it."""
        return ""

    def refusal(self, body: Any) -> tuple[str, str, str] | None:
        """In the front end: ``(kind, message, handler)`` for a call refused before it
        queues (``handler``: the App's handler it names, if any)."""
        return None

    def call(self, message: Any) -> bytes:
        """A typed call's reply; only an App (``gaspar.App``) takes them."""
        raise Refused("NoSuchHandler", "this server runs a bytes handler, not an App: send plain requests")

    def stream(self, message: Any) -> Any:
        """A streaming call's items; only an App takes them."""
        return self.call(message)

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

    def __init__(
        self, number: int, generation: int, token: int, consumer: Consumer, proc_name: str, pool: str = "default"
    ) -> None:
        self.number = number
        self.pool = pool  # an App's pool: the handlers it serves, the setup hooks it runs
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

    pool = "" if worker.pool == "default" else f" ({worker.pool})"
    set_proctitle(f"{worker.proc_name}: worker {worker.number}{pool}")
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
        faulthandler.enable(file=stack_fd, all_threads=True)  # a crash's stack, logged at its exit
    soft = SoftLimit()
    for step, boot in (("post_fork hook", post_fork), ("setup", lambda w: w.consumer.start({w.pool}))):
        if boot is None:
            continue
        try:
            boot(worker)
        except Exception as exc:
            log.exception("Worker %s (pid:%s) %s failed", worker.number, worker.pid, step)
            say_boot_failed(endpoint, worker, f"its {step} raised {type(exc).__name__}: {exc}")
            return WORKER_BOOT_ERROR
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 2000
    sock.routing_id = b"%d:%d" % (worker.pid, worker.generation)
    sock.connect(endpoint)
    hello = {"pid": worker.pid, "number": worker.number, "generation": worker.generation, "token": worker.token}
    if worker.pool != "default":
        hello["pool"] = worker.pool
    sock.send_multipart([Kind.HELLO.value, json.dumps(hello).encode()])
    real_exit = os._exit
    os._exit = flushing_exit(sock, ctx, real_exit)
    consumer = worker.consumer
    request, ahead = Kind.REQUEST.value[0], Kind.AHEAD.value[0]
    broadcast, exit_, cancel = Kind.BROADCAST.value[0], Kind.EXIT.value[0], Kind.CANCEL.value[0]
    reply, ack, skipped = Kind.REPLY.value, Kind.ACK.value, Kind.SKIPPED.value
    credit, item_head = Kind.CREDIT.value[0], Kind.ITEM.value
    streaming: list[Any] = [None, False, b""]  # a running stream: id, cancelled, item head
    untaken: deque[int] = deque()  # its items' sizes its client has not taken yet, oldest first (its window)
    # pyzmq's Cython methods with int flags: its Python layer is a real share of a small
    # request's cost (see producer.py)
    send, recv, get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
    more, events, pollin = int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)
    # the kinds a body frame follows (gaspar.wire.envelope); asking the socket instead
    # (RCVMORE) costs pyzmq's SocketOption enum lookup, about a microsecond a message
    bodied = frozenset((request, ahead, broadcast))
    inbox: deque[tuple[bytes, Any, float]] = deque()  # received, not handled yet (handed ahead)

    def receive(flags: int) -> None:
        head = recv(sock, flags)
        frame = recv(sock, 0, False) if head[0] in bodied else None
        if streaming[0] is not None and head[ID] == streaming[0]:
            if head[0] == credit:
                for _ in range(min(CREDITS.unpack_from(head, ID.stop)[0], len(untaken))):
                    untaken.popleft()
                return
            if head[0] == cancel:  # its client left: end the stream
                streaming[1] = True
                return
        if head[0] == credit:
            return  # for a stream that has ended
        if head[0] != cancel:
            inbox.append((head, frame, perf_counter()))
            return
        for i, (queued, _, _) in enumerate(inbox):  # not there: it ran already; nothing to do
            if queued[0] == ahead and queued[ID] == head[ID]:
                del inbox[i]
                send(sock, skipped + head[ID], 0)
                break

    def send_item(data: bytes) -> None:
        send(sock, streaming[2], more)
        send(sock, data, 0, len(data) < _LARGE)
        untaken.append(len(data))

    def wait_credit() -> bool:
        """After a stream's item: take what has arrived, and wait while its window is full:
        its client has not taken enough items (each credit is one taken), or enough of their
        bytes (an item larger than STREAM_BYTES goes alone). False: its client left."""
        while get(sock, events) & pollin:
            receive(0)
        while (len(untaken) >= STREAM_WINDOW or sum(untaken) >= STREAM_BYTES) and not streaming[1]:
            receive(0)
        return not streaming[1]

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
                call = head[CALL_AT] if len(head) > CALL_AT else 0
                if not call:
                    status, body = call_handler(consumer.handle, frame.bytes, limit=limit, soft=soft)
                elif call == STREAM:
                    streaming[:] = [head[ID], False, item_head + head[ID] + ITEM]
                    untaken.clear()
                    status, body = run_stream(consumer.stream, frame.buffer, send_item, wait_credit)
                    streaming[0] = None
                else:
                    status, body = call_handler(consumer.call, frame.buffer, limit=limit, soft=soft)
                wall = perf_counter() - wall
                if cpu >= 0:
                    cpu = thread_time() - cpu
                slow = wall >= 0.001
                worker.handled += 1
                send(sock, reply + head[ID] + status + TIMING.pack(wall, cpu), more)
                send(sock, body, 0, len(body) < _LARGE)
            elif kind == broadcast:
                status, body = call_handler(consumer.on_broadcast, frame.bytes, broadcast=True)
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
        os._exit = real_exit
        sock.close()
        ctx.term()
    return 0


def say_boot_failed(endpoint: str, worker: Worker, error: str) -> None:
    """Tell the front end (or agent) why this worker cannot boot, so that a reload's verdict
    names the error and not only the exit code. At most a second, and best effort: the
    exit code says that it failed either way."""
    import zmq

    text = error if len(error) <= BOOT_ERROR_CHARS else error[: BOOT_ERROR_CHARS - 3] + "..."
    payload = json.dumps({"pid": worker.pid, "token": worker.token, "error": text}).encode()
    ctx = zmq.Context(1)
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.routing_id = b"%d:%d" % (worker.pid, worker.generation)
        sock.connect(endpoint)
        sock.send_multipart([Kind.FAILED.value, payload])
        sock.close(linger=1000)
    except zmq.ZMQError:
        pass
    finally:
        ctx.term()


def flushing_exit(sock: Any, ctx: Any, real_exit: Callable[[int], Any]) -> Callable[[int], Any]:
    """``os._exit`` for a handler that ends its worker at once: first the replies already
    sent leave (1 s at most). A worker starts a request handed ahead right after sending
    the reply before it, which waits a moment in 0MQ's queue for its I/O thread; a handler
    dying at once would take that reply with it, and the front end would answer that
    request, which ran, WorkerDied too. Only from the worker's main thread (a 0MQ socket
    is not thread-safe) and not in a process the handler forked."""
    pid = os.getpid()

    def _exit(code: int) -> Any:
        if os.getpid() == pid and threading.current_thread() is threading.main_thread():
            try:
                sock.close(linger=1000)
                ctx.term()
            except Exception:  # dying anyway
                pass
        real_exit(code)

    return _exit


def die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` dies (PR_SET_PDEATHSIG); exit now if it died already."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def start_watchdog(parent: int, interval: float = 1.0) -> None:
    """Exit this process when its parent is gone: :func:`die_with_parent`, and a thread
    that looks every ``interval`` seconds (a backstop to PR_SET_PDEATHSIG)."""
    die_with_parent(parent)

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
