"""The Producer: gaspar's eventlet front end, and the owner of its pool's lifecycle.

::

    clients ──TCP──▶ IOLoop (one epoll in the hub): accept, read ──submit──▶ Dispatcher
                                                                            │ idle worker?
    workers ◀──[id, Q+req, payload]── ROUTER socket ◀── outbox, sent per round ┘
    workers ──[id, R+req+status, body]──▶ ROUTER ──▶ read_router ──▶ Connection.deliver

**Concurrency.** Everything runs in one OS thread, on one eventlet hub. The hot path is not
green threads: client sockets, the listening socket and the ROUTER's fd sit in one epoll
(``gaspar.frontend.connection.IOLoop``) whose callbacks run in batches, and each batch ends with a
round of 0MQ work (send what is queued, read every reply). Green threads do the rest: the
fork server's events, signals and calls from other threads, stops, and a 0.1 s ticker
(timeouts, idle connections). ``start(blocking=False)`` runs that hub in a background
thread; the public methods may be called from any thread and are handed to the hub.
Workers are forked by the fork server (``gaspar.process.forks``, ``gaspar.process.forkserver``),
never by this process. This
host's workers are the Supervisor's (``gaspar.frontend.supervisor``), workers on other hosts the
Gateway's (``gaspar.frontend.gateway``); the Producer keeps the start, the stop, the signals and the
ticker, and asks :meth:`owner` which of the two acts on a worker.

**Dispatch.** One ROUTER socket; each worker is a DEALER that says HELLO when ready and is
given a request when idle (ready credits; see ``gaspar.core.dispatch``). Fair: a request never
waits behind a busy worker while another is idle. Under overload only (more queued than
there are workers), a busy worker is also given its next request ahead (prefetch).

**Faults.** A worker that dies fails only the request it held (``WorkerDied``), queued
requests wait for the next idle worker, and a new worker is forked at once. A request past
its timeout fails with ``WorkerTimeout`` and its worker is SIGKILLed and replaced: a
timeout cannot stop a handler, only its process. Workers that die before they are ready
count towards flapping (``FlapPolicy``): back off, then give up (exit code 3).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import select
import shutil
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import zmq

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice; see README
    import eventlet
    import eventlet.hubs
    from eventlet.event import Event as GreenEvent

from gaspar import __version__
from gaspar.config import Settings
from gaspar.core.admission import ByteBudget, Stall
from gaspar.core.dispatch import Dispatcher
from gaspar.core.overload import NO_WORKERS, REASONS, QueueControl
from gaspar.core.records import Pending, WorkerSlot
from gaspar.errors import GasparError
from gaspar.frontend.connection import Connection
from gaspar.frontend.handoff import Control
from gaspar.frontend.hub import Acceptor, ConnectionCounters, IOLoop
from gaspar.frontend.supervisor import Supervisor
from gaspar.frontend.zmqfast import LARGE as _LARGE
from gaspar.frontend.zmqfast import MORE_NOW as _MORE_NOW
from gaspar.frontend.zmqfast import NOW as _NOW
from gaspar.frontend.zmqfast import RCVMORE as _RCVMORE
from gaspar.frontend.zmqfast import get as _raw_get
from gaspar.frontend.zmqfast import recv as _raw_recv
from gaspar.frontend.zmqfast import send as _raw_send
from gaspar.ops import sdnotify
from gaspar.ops.ipcdir import make_ipc_dir
from gaspar.ops.logs import access_line, close_access_log, log_handler_error, log_held_back, open_access_log
from gaspar.ops.telemetry import WORKER_STATES, LogLimiter, ShedReport, Telemetry, proc_usage
from gaspar.process.forks import ForkServer
from gaspar.process.worker import TIMING, Consumer
from gaspar.wire.framing import LIMITS, Kind, Request, Status, error_body, error_for_client, pack_id

log = logging.getLogger("gaspar")

_REQUEST = Kind.REQUEST.value
_AHEAD = Kind.AHEAD.value
_REPLY = Kind.REPLY.value
_CANCEL = Kind.CANCEL.value
_SKIPPED = Kind.SKIPPED.value
_FAILED = {Status.TIMEOUT: "timeout", Status.WORKER_DIED: "worker_died", Status.UNAVAILABLE: "unavailable"}


def _limits(req: Pending) -> bytes:
    """The client's own limits in a request's head (see ``gaspar.wire.framing.LIMITS``), so its
    worker can interrupt the handler softly when they pass."""
    soft = 0 if req.soft_timeout is None else max(1, round(req.soft_timeout * 1000))
    left = 0
    if req.client_deadline is not None:
        left = max(1, min(0xFFFFFFFF, round((req.client_deadline - time.monotonic()) * 1000)))
    return LIMITS.pack(min(soft, 0xFFFFFFFF), left)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket. No SO_REUSEPORT: a second daemon on a taken port must fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Producer:
    """Listens on ``host:port`` and runs each request on one of ``processes`` workers.

    ``consumer`` is a Consumer, a Consumer subclass or a plain function (wrapped in
    ``Consumer(handler=...)``). ``options`` are the names of :class:`gaspar.config.Settings`
    (``timeout``, ``max_requests``, hooks...). Nothing happens until :meth:`start`.
    """

    def __init__(
        self,
        consumer: Consumer | Callable[[bytes], bytes | str],
        port: int,
        processes: int | None = None,
        host: str = "127.0.0.1",
        **options: Any,
    ) -> None:
        if isinstance(consumer, type) and issubclass(consumer, Consumer):
            consumer = consumer()
        elif not isinstance(consumer, Consumer):
            if not callable(consumer):
                raise TypeError(f"Producer needs a Consumer or a callable, not {type(consumer).__name__}")
            consumer = Consumer(handler=consumer)  # a plain function, as the CLI accepts
        self.settings = Settings(**options)
        least = 0 if self.settings.remote_bind else 1  # 0: remote workers only
        if processes is not None and (
            isinstance(processes, bool) or not isinstance(processes, int) or processes < least
        ):
            more = " (0 only with remote_bind)" if least else ""
            raise ValueError(f"workers must be at least {least}{more} (None: one per CPU), not {processes!r}")
        if (processes or 0) > self.settings.max_workers:
            raise ValueError(f"workers ({processes}) must be at most max_workers ({self.settings.max_workers})")
        self.consumer = consumer
        #: The consumer's ``module:attr``, when it was loaded by name (the CLI sets it): a
        #: reload then imports the application afresh, every module, in a new fork server.
        #: None (a Consumer given as an object): a reload re-imports the handler's module only.
        self.app_spec: str | None = None
        self.host = host
        self.port = port
        self.processes = processes if processes is not None else min(os.cpu_count() or 1, self.settings.max_workers)
        self.supervisor: Supervisor | None = None  # made by start(), in the hub's thread
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.server_addr: tuple[str, int] | None = None
        self.exit_code = 0
        s = self.settings
        control = QueueControl(s.queue_timeout, s.queue_target, s.queue_interval, workers=max(1, self.processes))
        self.dispatcher = Dispatcher(prefetch=s.prefetch, control=control, max_queued=s.max_queued)
        self.budget = ByteBudget(s.max_buffered_bytes)
        self.counters = ConnectionCounters()  # abandoned, refused, idle and slow resets
        self.telemetry = Telemetry()
        self._error_log = LogLimiter(burst=10, period=60.0)
        self.access_log: logging.Logger | None = None  # opened by start() when access_log is set
        self._refusal_log = LogLimiter(burst=10, period=60.0)  # bad requests, resets, refusals
        self._shed_report = ShedReport()
        self.stall = Stall()
        self._control = Control()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # -- public API (any thread) --------------------------------------------------------

    def start(self, blocking: bool = True, timeout: float = 60.0) -> None:
        """Serve. Blocks until stopped, or with ``blocking=False`` returns once the port
        listens and every worker is ready (raises if that fails within ``timeout``)."""
        if blocking:
            self._run(install_signals=threading.current_thread() is threading.main_thread())
            if self._failure is not None:
                raise self._failure
            return
        self._thread = threading.Thread(target=self._run, name="gaspar-producer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.running.wait(0.05):
            if self.stopped.is_set() or time.monotonic() > deadline:
                if not self.stopped.is_set():
                    self.stop()
                raise self._failure or GasparError("the producer did not start (see the log)")

    def stop(self, graceful: bool = False, timeout: float = 60.0) -> None:
        """Stop serving and stop every worker. ``graceful``: first let every accepted request
        finish (up to ``graceful_timeout``). Returns when stopped (or after ``timeout``)."""
        if self.stopped.is_set():
            return
        self._control.call(lambda: eventlet.spawn_n(self.begin_stop, graceful), wait=False)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self.stopped.wait(timeout)
            self._thread.join(timeout)

    def reload(self) -> None:
        """Load the code afresh and replace the workers one by one: every module, in a new
        fork server, when :attr:`app_spec` is set; else the handler's module only."""
        self._control.call(self.do_reload, wait=False)

    def scale(self, n: int) -> None:
        """Run ``n`` local workers (at least 1; 0 is allowed with agents on other hosts)."""
        self._control.call(lambda: self.do_scale(n))

    def broadcast(self, message: bytes) -> int:
        """Deliver ``message`` to every live worker once (``Consumer.on_broadcast``).
        Returns how many workers it was sent to."""
        return self._control.call(lambda: self.do_broadcast(bytes(message)))

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes."""
        return self._control.call(self._worker_pids)

    def stats(self) -> dict[str, Any]:
        """Counters and the workers' state, as a dict (also served over the wire)."""
        return self._control.call(self._stats)

    # -- the hub thread -----------------------------------------------------------------

    def _run(self, install_signals: bool = False) -> None:
        self._hub_thread = threading.current_thread()
        self._setup()
        try:
            if self._failure is None:
                self._control.attach(install_signals, self.on_signal)
                self._done.wait()
        finally:
            self._teardown()

    def _setup(self) -> None:
        s = self.settings
        self.supervisor = Supervisor(
            self.consumer,
            self.app_spec,
            s,
            self.dispatcher,
            self.telemetry,
            self.processes,
            send=self._send,
            fail=self._fail,
            on_ready=self._on_pool_ready,
            on_fatal=self._on_fatal,
        )
        self.connections: set[Connection] = set()
        self.draining = False  # no longer accepting
        self.stopping = False  # failing what is left, stopping workers
        self.hurry = False
        self.started_at = time.time()
        self._done = GreenEvent()
        self._in_round = False
        self._read_scheduled = None
        self._outbox: list[tuple[WorkerSlot, Pending]] = []
        self._cancel_box: list[tuple[WorkerSlot, Pending]] = []
        self._waking: set[Connection] = set()
        self._wake_scheduled = False
        self._ipc_dir = None
        self._step = ""  # what _setup was doing, for the log line if it fails
        self.router = None
        self.gateway = None  # agents on other hosts (remote_bind)
        self.ctx = None
        self.listener = None
        self.metrics_listener = None
        self.metrics_server: Any = None
        self.control_server = None
        self.statsd_addr = None
        try:
            if s.on_starting is not None:
                s.on_starting(self)
            log.info("Starting gaspar %s", __version__)
            if s.transport == "ipc":
                self._ipc_dir = make_ipc_dir()  # mode 0700; stale ones removed first
                endpoint = f"ipc://{self._ipc_dir}/workers"
            else:
                endpoint = "tcp://127.0.0.1:*"
            self.supervisor.start_fork_server()  # before any 0MQ context or hub exists here
            self.ctx = zmq.Context(1)
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.linger = 0
            self.router.router_mandatory = 1
            self.router.bind(endpoint)
            if s.remote_bind:
                from gaspar.frontend.gateway import Gateway

                self.gateway = Gateway(
                    self.ctx, s, self.dispatcher, self.telemetry, self._send, self._fail, self._on_message
                )
                self._step = f": cannot bind remote_bind {s.remote_bind}"
                self.gateway.open()
            self._step = f": cannot listen at {self.host}:{self.port}"
            self.listener = _listen(self.host, self.port, s.backlog)
            self._step = ""
            self.server_addr = self.listener.getsockname()[:2]
            if s.metrics_bind:
                from gaspar.client import parse_address
                from gaspar.ops import metrics

                metrics.require_prometheus()
                self.metrics_listener = metrics.listen(*parse_address(s.metrics_bind))
                self.metrics_addr = self.metrics_listener.getsockname()[:2]
            from gaspar.frontend.ctlserver import ControlServer

            self.control_server = ControlServer.open(s.control_socket, self.server_addr[1])  # None if off
            if s.statsd_host:
                from gaspar.client import parse_address

                self.statsd_addr = parse_address(s.statsd_host)
            if s.access_log:
                self.access_log = open_access_log(s.access_log)
        except BaseException as exc:
            self._failure = exc
            self.exit_code = self.exit_code or 1
            return
        log.info("Listening at: tcp://%s:%s (%s)", *self.server_addr, os.getpid())
        if self.metrics_listener is not None:
            log.info("Metrics at: http://%s:%s/metrics", *self.metrics_addr)
        if self.control_server is not None:
            log.info("Control socket at: %s", self.control_server.path)
        log.info("Using %s workers over %s", self.target, s.transport)
        if self.gateway is not None:
            curve = "CURVE" if self.gateway.gatekeeper is not None else "no authentication"
            log.info("Agents join at: %s (%s)", self.gateway.endpoint, curve)
        hub = eventlet.hubs.get_hub()
        self._read_scheduled = None
        self.ioloop = IOLoop(hub, self.read_router)
        # the ROUTER's fd only wakes the loop: read_router runs after every round
        self.ioloop.register(self.router.fd, select.EPOLLIN, lambda _events: None)
        for fd, callback in self.gateway.fds() if self.gateway is not None else ():
            self.ioloop.register(fd, select.EPOLLIN, callback)
        self.acceptor = Acceptor(self.listener, self.ioloop, self)
        self._greenlets = [eventlet.spawn(self.tick)]
        if self.metrics_listener is not None:
            from gaspar.ops import metrics

            self.metrics_server = metrics.make_server(self.metrics_listener, self._stats, self.healthy, self.ready)
            self._greenlets.append(eventlet.spawn(self.metrics_server.serve))
        if self.statsd_addr is not None:
            from gaspar.ops.statsd import StatsdPusher

            pusher = StatsdPusher(self._stats, self.statsd_addr, s.statsd_prefix, s.statsd_interval)
            self._greenlets.append(eventlet.spawn(pusher.run, eventlet.sleep))
        if self.control_server is not None:
            from gaspar.frontend.ctlserver import producer_commands

            self._greenlets.append(eventlet.spawn(self.control_server.serve, producer_commands(self)))
        self.supervisor.attach(self.router)  # the first forks
        if self.processes == 0:  # remote workers only: serving now, whether agents have joined or not
            self._on_pool_ready()

    def _teardown(self) -> None:
        for g in getattr(self, "_greenlets", []):
            g.kill()
        for conn in list(getattr(self, "connections", ())):
            conn.abort()
        if getattr(self, "ioloop", None) is not None:
            self.acceptor.close()
            self.ioloop.close()
        elif self.listener is not None:
            self.listener.close()
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        if self.control_server is not None:
            self.control_server.close()
        if self.access_log is not None:
            close_access_log(self.access_log)
            self.access_log = None
        self.supervisor.close()
        if self.router is not None:
            self.router.close(linger=0)
        if self.gateway is not None:
            self.gateway.close()
        if self.ctx is not None:
            self.ctx.term()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        self._control.detach()
        self.running.clear()
        if self._failure is not None:
            exc = self._failure
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            where = self._step if isinstance(exc, (OSError, zmq.ZMQError)) else ""
            log.error("Shutting down: gaspar (exit code %s, did not start%s: %s)", self.exit_code, where, why)
        else:
            log.info("Shutting down: gaspar (exit code %s)", self.exit_code)
        self.stopped.set()

    # -- the ticker and control ---------------------------------------------------------------

    def tick(self) -> None:
        """Every 10 ms while requests are queued: shed what waited too long. Every 0.1 s:
        shed requests whose client's deadline cannot be met, fail what ran past its timeout
        and kill its worker, ping the agents and lose the silent ones; every 0.5 s, end
        connections idle past ``idle_timeout``; and read the ROUTER, as a backstop. An idle
        daemon wakes ten times a second. How late each wake-up comes is the hub's lag
        (``gaspar_hub_lag_seconds``)."""
        rounds, next_slow = 0, time.monotonic() + 0.1
        lag = self.telemetry.hub_lag
        while True:
            nap = 0.01 if self.dispatcher.queued else max(0.0, next_slow - time.monotonic())
            due = time.monotonic() + nap
            eventlet.sleep(nap)
            lag.observe(max(0.0, time.monotonic() - due))  # how late the hub woke us
            try:
                slow = time.monotonic() >= next_slow
                self.dispatcher.sweep(deadlines=slow)
                self.settle()
                if slow:
                    rounds += 1
                    next_slow = time.monotonic() + 0.1
                    self._tick(rounds)
            except Exception:  # the ticker must outlive any one bad round
                log.exception("Error in the front end's tick; carrying on")

    def _tick(self, rounds: int) -> None:
        self.read_router()
        log_held_back(self._error_log, "handler errors", logging.ERROR)
        if self.gateway is not None:
            self.gateway.tick()
        now = time.monotonic()
        if rounds % 5 == 0:  # slow request bodies and idle connections, every 0.5 s
            idle = self.settings.idle_timeout
            for conn in list(self.connections):
                conn.sweep(now, idle)
        d = self.dispatcher
        self.stall.sample(now, self.budget.freed, d.counters.started + d.counters.completed)
        self._report_shedding(now)
        log_held_back(self._refusal_log, "refused or reset requests and connections")
        answered, killed = self.dispatcher.expire()
        for req in answered:  # the client's own limit: answer now; its worker interrupts the handler
            worker = req.worker
            limit = req.soft_timeout if req.expired == "handler_timeout" else req.client_deadline - req.started
            what = "its handler_timeout" if req.expired == "handler_timeout" else "its deadline"
            msg = (
                f"handler ran past {what} ({limit:.3g}s, the client's); "
                f"worker {worker.label} (pid {worker.pid}) interrupts it and lives on"
            )
            facts = {"timeout": round(limit, 6), "limit": req.expired, "killed": False, "pid": worker.pid}
            self._fail(req, Status.TIMEOUT, "WorkerTimeout", msg, **facts)
        for req in killed:  # the operator's timeout: the only limit that kills a worker
            worker = req.worker
            log.error(
                "WORKER TIMEOUT (worker %s, pid:%s) after %ss: the timeout setting; logging its stack, then SIGKILL",
                worker.label,
                worker.pid,
                req.timeout,
            )
            why = f"its handler ran past the timeout setting ({req.timeout}s)"
            self.owner(worker).kill(worker, signal.SIGKILL, why, dump=True)
            if not req.cancelled:
                who = f"worker {worker.label} (pid {worker.pid})"
                msg = f"handler ran past the server's timeout ({req.timeout}s); {who} killed"
                facts = {"timeout": req.timeout, "limit": "timeout", "killed": True, "pid": worker.pid}
                self._fail(req, Status.TIMEOUT, "WorkerTimeout", msg, **facts)
        if killed:
            self._send(self.dispatcher.dispatch())
            self.manage_workers()

    def on_signal(self, signum: int) -> None:
        """One small action per signal, as gunicorn's arbiter."""
        name = signal.Signals(signum).name
        log.info("Handling signal: %s", name[3:].lower())
        handler = {
            signal.SIGTERM: lambda: self.begin_stop(True),
            signal.SIGINT: lambda: self.begin_stop(False),
            signal.SIGQUIT: lambda: self.begin_stop(False),
            signal.SIGHUP: self.do_reload,
            signal.SIGTTIN: lambda: self.do_scale(min(self.target + 1, self.settings.max_workers)),
            signal.SIGTTOU: lambda: self.do_scale(self.target - 1),
        }.get(signum)
        if handler is not None:
            handler()

    def do_reload(self) -> None:
        if not self.stopping:
            if self.gateway is not None:
                self.gateway.reload_keys()  # who may join from other hosts
            self.supervisor.reload(self)

    def do_scale(self, n: int) -> None:
        self.supervisor.scale(n, least=0 if self.gateway is not None else 1)

    def do_broadcast(self, message: bytes) -> int:
        sent = 0
        for w in list(self.dispatcher.workers.values()):
            if not w.retiring:
                sent += self.owner(w).broadcast(w, message)
        self.read_router_soon()
        return sent

    def begin_stop(self, graceful: bool) -> None:
        """Stop accepting; a graceful stop lets accepted requests finish; then stop workers."""
        if self.stopping or self.draining:
            if not graceful and self.draining:
                self.hurry = True  # a fast stop during a graceful one: finish now
            return
        self.draining = True
        log.info("Stopping (%s)", "graceful" if graceful else "fast")
        sdnotify.notify(f"STOPPING=1\nSTATUS=Stopping ({'graceful' if graceful else 'fast'})")
        self.close_listener(accept_backlog=graceful)
        if graceful:
            deadline = time.monotonic() + self.settings.graceful_timeout
            while not self.hurry and time.monotonic() < deadline and self._busy():
                eventlet.sleep(0.02)
        self.stopping = True
        running = {w.routing_id for w in self.dispatcher.workers.values() if w.current is not None}
        for req in self.dispatcher.fail_all():
            self._fail(req, Status.UNAVAILABLE, "ServerUnavailable", "the server stopped before the request finished")
        if self.gateway is not None:
            self.gateway.stop()  # every agent's session ends; their workers leave the pool
        for conn in list(self.connections):
            # A connection that owes its client nothing is closed; one that owes a reply, an
            # error or (a plain request's error) a reset keeps its write side until it is paid.
            if not conn.busy:
                conn.close()
            elif conn.partial:
                conn.abort()
        self.supervisor.stop(graceful and not self.hurry, running)
        if self.supervisor.waiting_for():
            self.supervisor.gone.wait(5.0 if graceful else 2.0)
        deadline = time.monotonic() + 1.0
        while self.connections and time.monotonic() < deadline:
            eventlet.sleep(0.01)  # let connections write their last replies
        self._done.send()

    def close_listener(self, accept_backlog: bool) -> None:
        """Stop accepting. With ``accept_backlog``, first take the connections the kernel
        has already accepted for us: their clients think they are in, so serve them."""
        if accept_backlog:
            self.acceptor.accept_all()
        self.acceptor.close()

    def _busy(self) -> bool:
        """Accepted work remains: a request queued or running, one being read, or a new
        connection's first request, not read yet (its client is in: it must be served).
        A persistent connection waiting for more is not busy."""
        return bool(self.dispatcher.pending) or any(c.busy or c.awaiting_first for c in self.connections)

    # -- requests -----------------------------------------------------------------------

    def submit(self, conn: Connection, request: Request) -> None:
        """Queue a request for a worker; its outcome is delivered to ``conn``."""
        if request.stats:
            conn.deliver(request, Status.OK, self.stats_json())
            return
        if self.stopping:
            self.telemetry.ended("unavailable", None, 0.0)
            if self.access_log is not None:
                self.log_access((conn, request), "unavailable", 0, None, None, 0.0, None)
            self._deliver_error(conn, request, Status.UNAVAILABLE, "ServerUnavailable", "the server is stopping")
            return
        # the operator's timeout bounds the handler; the client may only ask for less
        pending, assignments = self.dispatcher.submit(
            request.body,
            (conn, request),
            self.settings.timeout,
            request.deadline,
            request.timeout,
            conn if conn.keepalive else None,  # a connection that may pipeline: one share of the queue
        )
        conn.requests.add(pending)
        self._send(assignments)

    def settle(self) -> None:
        """Act on what the dispatcher decided: answer shed requests (``Overloaded``), and
        queue cancels for requests handed ahead whose client left or whose deadline passed."""
        d = self.dispatcher
        if not (d._cancels or d._shed):  # the usual case, on the hot path: nothing to do
            return
        cancels = d.take_cancels()
        if cancels:
            self._cancel_box.extend(cancels)
            self.read_router_soon()
        shed = d.take_shed()
        if not shed:
            return
        now = time.monotonic()
        for req, reason in shed:
            self._answer_shed(req, reason, now)

    def _answer_shed(self, req: Pending, reason: str, now: float) -> None:
        conn, request = req.waiter
        conn.requests.discard(req)
        outcome = "unavailable" if reason == NO_WORKERS else "shed"
        self.telemetry.ended(outcome, now - req.queued_at, now - req.queued_at)
        if self.access_log is not None:
            self.log_access(req.waiter, outcome, 0, now - req.queued_at, None, now - req.queued_at, None)
        d = self.dispatcher
        queued_ms = round((now - req.queued_at) * 1000, 1)
        if reason == NO_WORKERS:  # not an overload: there was nothing to run it
            text = f"no worker was ready to run it within queue_timeout ({queued_ms} ms): {self._why_no_workers()}"
            facts = {"reason": reason, "queued_ms": queued_ms, "started": False}
            self._deliver_error(conn, request, Status.UNAVAILABLE, "ServerUnavailable", text, **facts)
            return
        retry_ms = round(d.control.retry_after(d.queued) * 1000, 1)
        text = {
            "queue_delay": f"shed after {queued_ms} ms in a standing queue (overloaded)",
            "queue_timeout": f"waited {queued_ms} ms, past queue_timeout",
            "queue_full": f"{d.max_queued} requests were waiting (max_queued); the oldest was shed",
            "deadline": "the client's deadline could not be met",
            "cancelled": "the client left",
        }.get(reason, reason)
        facts = {"reason": reason, "queued_ms": queued_ms, "retry_after_ms": retry_ms, "started": False}
        self._deliver_error(conn, request, Status.UNAVAILABLE, "Overloaded", text, **facts)

    def _why_no_workers(self) -> str:
        """Why the pool has no worker, for a client refused for it and the log."""
        booting = len(self.supervisor.booting) if self.supervisor is not None else 0
        if booting:
            return f"{booting} worker(s) booting"
        if self.target == 0:
            return "this front end runs no worker itself (workers 0) and no agent's worker has joined"
        return "none is running; new ones are being forked"

    def _report_shedding(self, now: float) -> None:
        """One summary a second while requests are shed, by reason, and one when shedding
        ends (and when overload begins and ends): never one line per request."""
        c, control = self.dispatcher.counters, self.dispatcher.control
        counts = {reason: getattr(c, "shed_" + reason) for reason in REASONS}
        counts[NO_WORKERS] = c.no_workers
        target_ms = control.effective_target() * 1000
        for level, line in self._shed_report.update(now, counts, control.overloaded, self.dispatcher.queued, target_ms):
            log.log(level, "%s", line)

    def log_refusal(self, message: str, *args: Any) -> None:
        """A refused or reset request or connection, at most 10 lines a minute; the rest
        are counted and summed up once the minute ends."""
        allowed, held = self._refusal_log.allow()
        if allowed:
            log.warning(message + (f" ({held} more not logged)" if held else ""), *args)

    def refuse_connection(self, sock: Any) -> None:
        """Past max_connections: reset a connection as soon as it is accepted."""
        self.counters.refused_connections += 1
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
        self.log_refusal("max_connections (%s) reached; resetting new connections", self.settings.max_connections)

    def wake_starved(self, conns: list[Connection]) -> None:
        """Connections waiting for the byte budget that may read now: resumed soon, in
        order, outside the caller (which is freeing bytes, maybe mid-delivery)."""
        if not conns:
            return
        self._waking.update(conns)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            eventlet.hubs.get_hub().schedule_call_global(0, self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        for conn in self.budget.ready():
            if conn in self._waking:
                conn.resume()
        self._waking.clear()

    def _send(self, assignments: list[tuple[WorkerSlot, Pending]]) -> None:
        """Queue requests for their workers; they go out in a batch at the end of the round
        (one wake-up of 0MQ's I/O thread can then carry several)."""
        self._outbox.extend(assignments)
        self.read_router_soon()
        self.settle()

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        router, send, pending = self.router, _raw_send, self.dispatcher.pending
        for worker, req in outbox:
            if req.worker is not worker or pending.get(req.id) is not req:
                continue  # since assigned: its worker was lost or died, or it ended (failed, shed)
            body, head = req.body, (_REQUEST if worker.current is req else _AHEAD) + pack_id(req.id)
            if req.soft_timeout is not None or req.client_deadline is not None:
                head += _limits(req)
            if worker.agent is not None:
                self._send_remote(worker, req, head, body)
                continue
            try:
                send(router, worker.routing_id, _MORE_NOW)
                send(router, head, _MORE_NOW)
                send(router, body, _NOW, len(body) < _LARGE)
            except zmq.ZMQError as exc:  # the worker's pipe is gone: it is dying
                log.warning("Worker %s (pid:%s) unreachable (%s)", worker.number, worker.pid, exc)
                self.dispatcher.retire(worker.routing_id, "died")
                self.supervisor.kill(worker, signal.SIGKILL, "its 0MQ pipe was gone")
                self._outbox.extend(self.dispatcher.requeue(req))
        cancels, self._cancel_box = self._cancel_box, []
        for worker, req in cancels:  # after the request itself: the worker sees both in order
            if worker.routing_id not in self.dispatcher.workers:
                continue  # it died: its handed-ahead requests came back already
            head = _CANCEL + pack_id(req.id)
            if worker.agent is not None:
                self.gateway.tell(worker, head)
                continue
            try:
                send(router, worker.routing_id, _MORE_NOW)
                send(router, head, _NOW)
            except zmq.ZMQError:
                pass  # its pipe is gone: it is dying, and its requests come back then

    def _send_remote(self, worker: WorkerSlot, req: Pending, head: bytes, body: Any) -> None:
        """A request to a worker on another host; if its agent cannot be reached, the
        request goes back to the head of the queue (it never left) and the agent is lost."""
        why = self.gateway.send_request(worker, head, body)
        if why is not None:
            self._outbox.extend(self.dispatcher.requeue(req))
            self.gateway.unreachable(worker.agent, why)

    def _resolve(self, pending: Pending, status: int, body: Any) -> None:
        conn, request = pending.waiter
        conn.requests.discard(pending)
        conn.deliver(request, status, body)

    def _record_reply(self, req: Pending, head: bytes, frame: Any) -> None:
        """A worker's reply to ``req`` (answered or not: its client may be gone)."""
        wall = cpu = 0.0
        if len(head) >= 10 + TIMING.size:
            wall, cpu = TIMING.unpack_from(head, 10)
        now = time.monotonic()
        worker = req.worker
        number = worker.label if worker is not None else 0
        status = head[9]
        ok = status == Status.OK
        outcome = "ok" if ok else "timeout" if status == Status.TIMEOUT else "error"
        queued = req.started - req.queued_at
        total = now - req.queued_at
        self.telemetry.replied(number, ok, wall, cpu, queued, total, counted=not req.cancelled, outcome=outcome)
        if outcome == "error":
            self._log_handler_error(worker, frame.bytes)
        if self.access_log is not None:
            if req.cancelled:
                outcome = "client_gone"
            self.log_access(req.waiter, outcome, len(frame), queued, wall, now - req.queued_at, number)

    def _log_handler_error(self, worker: WorkerSlot | None, body: bytes) -> None:
        """The operator sees what the client saw, at most 10 a minute."""
        label, pid = (worker.label, worker.pid) if worker is not None else (None, None)
        log_handler_error(self._error_log, label, pid, body)

    def log_access(
        self,
        waiter: tuple[Connection, Request],
        outcome: str,
        bytes_out: int,
        queued: float | None,
        handler: float | None,
        total: float,
        worker: int | str | None,
    ) -> None:
        """One access-log line for a request (``access_log``)."""
        conn, request = waiter
        access_line(self.access_log, conn.peer, outcome, len(request.body), bytes_out, queued, handler, total, worker)

    def _deliver_error(self, conn: Connection, request: Request, status: Status, kind: str, msg: str, **facts) -> None:
        conn.deliver(request, status, error_body(kind, msg, **facts))

    def _fail(self, pending: Pending, status: Status, kind: str, msg: str, **facts: Any) -> None:
        conn, request = pending.waiter
        conn.requests.discard(pending)
        now = time.monotonic()
        queued = pending.started - pending.queued_at if pending.started else None
        outcome = _FAILED.get(status, "unavailable")
        self.telemetry.ended(outcome, queued, now - pending.queued_at)
        if self.access_log is not None:
            number = pending.worker.label if pending.worker is not None else None
            self.log_access(pending.waiter, outcome, 0, queued, None, now - pending.queued_at, number)
        self._deliver_error(conn, request, status, kind, msg, **facts)

    # -- replies from the workers -----------------------------------------------------------

    def read_router_soon(self) -> None:
        """Make sure a round of 0MQ work runs soon, after a send made outside a round.

        0MQ's fd signals only changes: a send processes 0MQ's pending events and may consume
        the signal of a reply that is waiting, so whoever sends must make sure someone reads.
        Inside a round the round's end does; elsewhere this schedules a round.
        """
        if self._read_scheduled is None and not self._in_round and not self.ioloop.busy:
            self._read_scheduled = eventlet.hubs.get_hub().schedule_call_global(0, self.read_router)

    def read_router(self) -> None:
        """One round of 0MQ work: send what is queued for the workers, then take every
        message waiting on the ROUTER (replies, HELLOs, broadcast acks), until neither is left.
        Runs after every round of the I/O loop, when scheduled, and every 0.1 s."""
        if self._in_round:
            return
        self._read_scheduled = None
        self._in_round = True
        router, recv, get = self.router, _raw_recv, _raw_get
        more_remote = False
        try:
            while True:
                if self._outbox or self._cancel_box:
                    self._flush_outbox()
                try:
                    frames = [recv(router, _NOW)]
                except zmq.Again:
                    if self.gateway is not None and not more_remote:
                        n = self.gateway.read()
                        if n:
                            # a batch of the agents' messages (it may have queued more to
                            # send); past a full batch, the rest waits for the next round,
                            # so a flooding agent cannot hold the hub from the clients
                            more_remote = n >= self.gateway.BATCH
                            continue
                    if not self._outbox and not self._cancel_box:
                        return
                    continue
                # a multipart message arrives whole: its other frames are there already
                while get(router, _RCVMORE):
                    frames.append(recv(router, _NOW, False))
                try:
                    self._on_message(frames)
                except Exception:
                    log.exception("Dropped a malformed message from a worker")
                if self.dispatcher._shed or self.dispatcher._cancels:
                    self.settle()
        finally:
            self._in_round = False
            if more_remote and self._read_scheduled is None:
                self._read_scheduled = eventlet.hubs.get_hub().schedule_call_global(0, self.read_router)

    def _on_message(self, frames: list[Any]) -> None:
        """``frames``: the routing id (bytes), then Frames: a head and a body."""
        rid, head = frames[0], frames[1].bytes
        kind = head[:1]
        if kind == _REPLY:
            req_id = int.from_bytes(head[1:9], "big")
            req = self.dispatcher.pending.get(req_id)
            pending, assignments = self.dispatcher.complete(rid, req_id)
            frame = frames[2]
            if req is not None and req_id not in self.dispatcher.pending:  # it was this worker's
                self._record_reply(req, head, frame)
            if pending is not None:
                body = frame.bytes if len(frame) < _LARGE else frame.buffer
                if head[9] != Status.OK:  # the log had the traceback; the client, as error_detail says
                    body = error_for_client(body, self.settings.error_detail)
                self._resolve(pending, head[9], body)
            if assignments:
                self._outbox.extend(assignments)
            worker = self.dispatcher.workers.get(rid)
            if worker is not None and worker.retiring:
                self.manage_workers()
        elif kind == _SKIPPED:  # a revoked request, never started
            pending, assignments = self.dispatcher.complete(rid, int.from_bytes(head[1:9], "big"), ran=False)
            if pending is not None:  # shed while handed ahead (its deadline): answer it now
                self._answer_shed(pending, pending.revoked or "deadline", time.monotonic())
            if assignments:
                self._outbox.extend(assignments)
            worker = self.dispatcher.workers.get(rid)
            if worker is not None and worker.retiring:
                self.manage_workers()
        elif kind == Kind.HELLO.value:
            self.supervisor.on_hello(rid, frames[2].bytes)
        elif kind == Kind.ACK.value:
            if head[9] != Status.OK:
                log.error("A worker's on_broadcast failed: %s", frames[2].bytes.decode("utf-8", "replace"))

    # -- what it is doing -------------------------------------------------------------------

    def _worker_pids(self) -> list[int]:
        return self.supervisor.worker_pids()

    def _stats(self) -> dict[str, Any]:
        """Everything ``gaspar stats``, ``/metrics`` and ``gaspar top`` show
        (docs/monitoring.rst documents each field). Per-process CPU and memory are read now."""
        d = self.dispatcher
        now, wall = time.monotonic(), time.time()
        none = ([], dict.fromkeys(WORKER_STATES, 0))
        workers, states = self.supervisor.snapshot(now) if self.supervisor is not None else none
        front = proc_usage(os.getpid())
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(wall - self.started_at, 3) if hasattr(self, "started_at") else 0.0,
            "time": round(wall, 3),
            "target_workers": self.target,
            "workers": workers,
            "worker_states": states,
            "booting": states["booting"],
            "queued": d.queued,
            "held": d.held,
            "running": d.running,
            "prefetched": d.prefetched,
            "pending": len(d.pending),
            "connections": len(getattr(self, "connections", ())),
            "restarts": self.supervisor.restarts if self.supervisor is not None else 0,
            "agents": self.gateway.agents.snapshot() if getattr(self, "gateway", None) is not None else [],
            "remote": self.gateway.snapshot() if getattr(self, "gateway", None) is not None else None,
            "front_end": {"cpu_seconds": round(front[0], 3), "rss_bytes": front[1]} if front else None,
            **self.telemetry.snapshot(),
            "counters": {**vars(d.counters), **vars(self.counters)},
            "overload": {
                "standing": d.control.standing,
                "overloaded": d.control.overloaded,
                "handler_ms": round(d.control.service * 1000, 3),
                "buffered_bytes": self.budget.used,
                "buffered_peak": self.budget.peak,
                "waiting_for_memory": self.budget.waiting,
                "committed_bytes": self.budget.committed,
                "stalled": self.stalled(now),
            },
        }

    def healthy(self) -> bool:
        """The daemon serves: it has not begun to stop its workers."""
        return not self.stopping

    def ready(self) -> bool:
        """Worth sending requests to: a worker is ready, no stop has begun, and requests
        are moving (not stalled: see :meth:`stalled`)."""
        if self.draining or self.stopping or not any(not w.retiring for w in self.dispatcher.workers.values()):
            return False
        return self.stalled(time.monotonic()) is None

    def stalled(self, now: float) -> str | None:
        """Why no request has made progress for a while though work waits (``memory``,
        ``workers``), or None (``gaspar.core.admission.Stall``)."""
        d = self.dispatcher
        return self.stall.reason(now, self.budget.waiting, d.queued, d.control.service)

    # -- the pool -----------------------------------------------------------------------------

    @property
    def fork_server(self) -> ForkServer | None:
        """The current fork server of this host's workers."""
        return self.supervisor.fork_server if self.supervisor is not None else None

    @property
    def target(self) -> int:
        """How many worker processes this host runs (workers elsewhere are the agents')."""
        return self.supervisor.target if self.supervisor is not None else self.processes

    def owner(self, worker: WorkerSlot) -> Any:
        """Who acts on a worker (kill, tell_exit, broadcast): the supervisor for a local
        process, the gateway for one on another host."""
        return self.supervisor if worker.agent is None else self.gateway

    def manage_workers(self) -> None:
        """Tell retiring idle workers to exit, wherever they are; bring the pool to size."""
        self.supervisor.manage()
        if self.gateway is not None:
            self.gateway.manage()

    def _on_pool_ready(self) -> None:
        """Every local worker is ready (or there are none to wait for): serve."""
        if not self.running.is_set():
            self.running.set()
            self.supervisor.notify_ready()

    def _on_fatal(self, exit_code: int, failure: BaseException | None) -> None:
        """The pool cannot go on (its fork server died, its workers cannot boot): stop."""
        self.exit_code = exit_code
        if failure is not None:
            self._failure = failure
        eventlet.spawn_n(self.begin_stop, False)

    def stats_json(self) -> bytes:
        return json.dumps(self._stats()).encode()
