"""The Producer: gaspar's eventlet front end, the public API, and the owner of its lifecycle.

::

    clients ──TCP──▶ IOLoop, Acceptor, Connection (hub.py, connection.py) ──submit──▶ Dispatcher
    workers ◀──0MQ── Router (router.py): requests out, replies in, once per round ◀─┘
    replies ──▶ Outcomes (outcomes.py): to the client, the telemetry and the logs

**Rooms.** This module holds the public API (any thread; calls are handed to the hub by
``gaspar.frontend.handoff``), the start and the end (``ports.py`` opens and closes what
clients and operators connect to), and what a connection needs of the front end
(``contract.FrontEnd``). The phases, the main loop and the stop are in ``lifecycle.py``; this
host's workers are the Supervisor's (``supervisor.py``, a green shell over
``gaspar.core.pool``), workers on other hosts the Gateway's (``gateway.py``); :meth:`owner`
says which of the two acts on a worker. Workers are forked by the fork server
(``gaspar.process.forks``), never by this process.

**Concurrency.** One OS thread, one eventlet hub. The hot path is not green threads: client
sockets, the listening socket and the ROUTER's fd sit in one epoll whose callbacks run in
batches, each batch ending with a round of 0MQ work. Green threads do the rest: the fork
server's events, signals and calls from other threads, stops, and the 0.1 s main loop.

**Dispatch and faults** (``gaspar.core.dispatch``): fair, a request never waits behind a busy
worker while another is idle; under overload a busy worker is given its next request ahead.
A worker that dies fails only the request it held (``WorkerDied``); past its timeout a
request fails with ``WorkerTimeout`` and its worker is SIGKILLed and replaced.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import select
import signal
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

from gaspar.app import pool_plan
from gaspar.config import Settings, check_workers, fewest_workers
from gaspar.core.admission import ByteBudget, Stall
from gaspar.core.dispatch import Dispatcher
from gaspar.core.overload import QueueControl
from gaspar.core.pools import DEFAULT_POOL, Pools
from gaspar.core.records import WorkerOwner, WorkerSlot
from gaspar.errors import GasparError
from gaspar.frontend.connection import Connection
from gaspar.frontend.contract import ConnectionCounters
from gaspar.frontend.handoff import Control
from gaspar.frontend.hub import Acceptor, IOLoop, Waker
from gaspar.frontend.lifecycle import Phase, begin_stop, run_ticker, signal_actions
from gaspar.frontend.outcomes import Outcomes
from gaspar.frontend.ports import Ports
from gaspar.frontend.router import Router
from gaspar.frontend.stats import snapshot
from gaspar.frontend.supervisor import Supervisor
from gaspar.loading import as_consumer
from gaspar.ops.telemetry import Telemetry
from gaspar.process.forks import ForkServer
from gaspar.process.worker import Consumer
from gaspar.version import __version__
from gaspar.wire.framing import Request, Status

log = logging.getLogger("gaspar")


class Producer:
    """Listens on ``host:port`` and runs each request on one of ``processes`` workers
    (None: one per CPU; ``"MIN:MAX"``: as many as the queue asks, in that range).

    ``consumer`` is a Consumer, a Consumer subclass or a plain function (wrapped in
    ``Consumer(handler=...)``). ``options`` are the names of :class:`gaspar.config.Settings`
    (``timeout``, ``max_requests``, hooks...). Nothing happens until :meth:`start`.
    """

    def __init__(
        self,
        consumer: Consumer | Callable[[bytes], bytes | str],
        port: int,
        processes: int | str | None = None,
        host: str = "127.0.0.1",
        **options: Any,
    ) -> None:
        consumer = as_consumer(consumer)
        self.settings = Settings(**options)
        low, high = check_workers(processes, self.settings)  # "MIN:MAX": the default pool sizes itself
        self.consumer = consumer
        #: The consumer's ``module:attr``, when it was loaded by name (the CLI sets it): a
        #: reload then imports the application afresh, every module, in a new fork server.
        #: None (a Consumer given as an object): a reload re-imports the handler's module only.
        self.app_spec: str | None = None
        self.host = host
        self.port = port
        self.processes = low  # the default pool's size at the start
        self.supervisor: Supervisor | None = None  # made by start(), in the hub's thread
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.server_addr: tuple[str, int] | None = None
        self.exit_code = 0
        s = self.settings
        self.pool_plan = plan = pool_plan(consumer, s.pools)  # an App's pools besides the default
        if high != low:
            plan.ranges[DEFAULT_POOL] = (low, high)

        self.budget = ByteBudget(s.max_buffered_bytes)

        def dispatcher() -> Dispatcher:
            control = QueueControl(s.queue_timeout, s.queue_target, s.queue_interval, workers=max(1, self.processes))
            return Dispatcher(prefetch=s.prefetch, control=control, max_queued=s.max_queued, memory=self.budget)

        self.dispatcher: Any = Pools(dispatcher, plan.most, plan.handlers) if plan.sizes else dispatcher()
        self.counters = ConnectionCounters()  # abandoned, refused, idle and slow resets
        self.telemetry = Telemetry({h: plan.handlers.get(h, DEFAULT_POOL) for h in getattr(consumer, "handlers", ())})
        self.outcomes = Outcomes(s, self.dispatcher, self.telemetry, lambda: self.supervisor.book.why_none())
        self.stall = Stall()
        self._control = Control()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        # what the hub thread opens (``_setup``) and closes (``_teardown``); None until then
        self.router = Router(self.dispatcher, self.outcomes, None, self.manage_workers)
        # FrontEnd's verbs that are the router's: stream credits, replies written at the end
        # of the round, a connection that stopped or resumed reading its replies
        self.credit, self.write_soon, self.hold = self.router.credit, self.router.write_soon, self.router.hold
        self.connections: set[Connection] = set()
        self.phase = Phase.STARTING
        self.hurry = False  # a fast stop came during a graceful one
        self.started_at = 0.0
        self.waker: Waker | None = None
        self.ports = Ports(self.settings)
        self.gateway: Any = None  # agents on other hosts (remote_bind)
        self.ioloop: IOLoop | None = None
        self.acceptor: Acceptor | None = None
        self.metrics_addr: tuple[str, int] | None = None
        self.metrics_server: Any = None
        self.control_server: Any = None
        self._greenlets: list[Any] = []

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
        return self._control.call(lambda: self.supervisor.worker_pids())

    def stats(self) -> dict[str, Any]:
        """Counters and the workers' state, as a dict (also served over the wire)."""
        return self._control.call(self._stats)

    # -- the hub thread -----------------------------------------------------------------

    def _run(self, install_signals: bool = False) -> None:
        self._setup()
        try:
            if self._failure is None:
                self._control.attach(install_signals, self.on_signal)
                self.done.wait()
        finally:
            self._teardown()

    def _setup(self) -> None:
        s = self.settings
        self.supervisor = self.router.supervisor = Supervisor(
            self.consumer,
            self.app_spec,
            s,
            self.dispatcher,
            self.telemetry,
            self.processes,
            plan=self.pool_plan,
            send=self.router.send,
            take=self.router.round,
            fail=self.outcomes.fail,
            on_ready=self._on_pool_ready,
            on_fatal=self._on_fatal,
        )
        self.started_at = time.time()
        self.done = GreenEvent()
        ports = self.ports
        try:
            if s.on_starting is not None:
                s.on_starting(self)
            log.info("Starting gaspar %s", __version__)
            self.supervisor.start_fork_server()  # before any 0MQ context or hub exists here
            endpoint = ports.open_context()
            self.router.open(ports.ctx, endpoint)
            if s.remote_bind:
                from gaspar.frontend.gateway import Gateway

                r, d, fail = self.router, self.dispatcher, self.outcomes.fail
                self.gateway = r.gateway = Gateway(ports.ctx, s, d, self.telemetry, r.send, fail, r.on_message)
                ports.step = f": cannot bind remote_bind {s.remote_bind}"
                self.gateway.open()
                ports.step = ""
            ports.open(self.host, self.port)
        except BaseException as exc:
            self._failure = exc
            self.exit_code = self.exit_code or 1
            return
        self.server_addr, self.metrics_addr = ports.server_addr, ports.metrics_addr
        self.control_server, self.outcomes.access_log = ports.control_server, ports.access_log
        ports.announce(self.target, self.gateway)
        self.ioloop = self.router.loop = IOLoop(eventlet.hubs.get_hub(), self.router.round)
        # the ROUTER's fd only wakes the loop: a 0MQ round runs after every round of the loop
        self.ioloop.register(self.router.socket.fd, select.EPOLLIN, lambda _events: None)
        for fd, callback in self.gateway.fds() if self.gateway is not None else ():
            self.ioloop.register(fd, select.EPOLLIN, callback)
        self.acceptor = Acceptor(ports.listener, self.ioloop, self)
        self.waker = Waker(self.budget, self.ioloop.hub)
        self._greenlets.append(eventlet.spawn(self.tick))
        if ports.metrics_listener is not None:
            from gaspar.ops import metrics

            self.metrics_server = metrics.make_server(ports.metrics_listener, self._stats, self.healthy, self.ready)
            self._greenlets.append(eventlet.spawn(self.metrics_server.serve))
        if ports.statsd_addr is not None:
            from gaspar.ops.statsd import StatsdPusher

            pusher = StatsdPusher(self._stats, ports.statsd_addr, s.statsd_prefix, s.statsd_interval)
            self._greenlets.append(eventlet.spawn(pusher.run, eventlet.sleep))
        if self.control_server is not None:
            from gaspar.frontend.ctlserver import producer_commands

            self._greenlets.append(eventlet.spawn(self.control_server.serve, producer_commands(self)))
        self.supervisor.attach(self.router.socket)  # the first forks
        if self.processes == 0:  # remote workers only: serving now, whether agents have joined or not
            self._on_pool_ready()

    def _teardown(self) -> None:
        for g in self._greenlets:
            g.kill()
        for conn in list(self.connections):
            conn.abort()
        if self.ioloop is not None:
            self.acceptor.close()
            self.ioloop.close()
        self.outcomes.access_log = None
        self.ports.close_listeners(listener_closed=self.ioloop is not None)
        self.supervisor.close()
        self.router.close()
        if self.gateway is not None:
            self.gateway.close()
        self.ports.close_context()
        self._control.detach()
        self.running.clear()
        if self._failure is not None:
            exc = self._failure
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            where = self.ports.step if isinstance(exc, (OSError, zmq.ZMQError)) else ""
            what = "stopped" if self.supervisor.book.served else "did not start"  # a pool of it had served
            log.error("Shutting down: gaspar (exit code %s, %s%s: %s)", self.exit_code, what, where, why)
        else:
            log.info("Shutting down: gaspar (exit code %s)", self.exit_code)
        self.stopped.set()

    # -- the phases, the main loop, signals ------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where it is in its life (``lifecycle.Phase``); setting it sets what is read per request,
        as plain attributes: ``draining`` (a stop has begun) and ``stopping`` (past draining)."""
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self._phase, self.draining, self.stopping = phase, phase >= Phase.DRAINING, phase >= Phase.STOPPING

    def tick(self) -> None:
        """The main loop (``gaspar.frontend.lifecycle.run_ticker``)."""
        run_ticker(self)

    def on_signal(self, signum: int) -> None:
        """One small action per signal, as gunicorn's arbiter."""
        log.info("Handling signal: %s", signal.Signals(signum).name[3:].lower())
        action = signal_actions(self).get(signum)
        if action is not None:
            action()

    def begin_stop(self, graceful: bool) -> None:
        """Stop accepting; a graceful stop lets accepted requests finish; then stop workers."""
        begin_stop(self, graceful)

    def do_reload(self) -> None:
        if not self.stopping:
            if self.gateway is not None:
                self.gateway.reload_keys()  # who may join from other hosts
            self.supervisor.reload(self)

    def do_scale(self, n: int) -> None:
        self.supervisor.scale(n, least=fewest_workers(self.settings.remote_bind))

    def do_broadcast(self, message: bytes) -> int:
        sent = 0
        for w in list(self.dispatcher.workers.values()):
            if not w.retiring:
                sent += self.owner(w).broadcast(w, message)
        self.router.read_soon()
        return sent

    # -- requests -----------------------------------------------------------------------

    def submit(self, conn: Connection, request: Request) -> None:
        """Queue a request for a worker; its outcome is delivered to ``conn``."""
        if request.stats:
            return conn.deliver(request, Status.OK, self.stats_json())
        if self.stopping:
            return self.outcomes.refused(conn, request)
        # the operator's timeout bounds the handler; the client may only ask for less
        pool, handler = DEFAULT_POOL, self.consumer.handler_of(request.body) if request.call else ""
        if request.call and not handler and (refused := self.consumer.refusal(request.body)):
            return self.outcomes.refused_call(conn, request, *refused)
        if handler and self.dispatcher.routes:  # an App's handler with a pool of its own
            pool = self.dispatcher.handlers.get(handler, DEFAULT_POOL)
            if not self.dispatcher.serves(pool):
                why = f"no worker serves pool {pool!r}: none on this host and no agent's"
                return self.outcomes.refused(conn, request, why)
        owner = conn if conn.keepalive else None  # a connection that may pipeline: one share of the queue
        r, timeout = request, self.settings.timeout
        pending, assignments = self.dispatcher.submit(r.body, (conn, r), timeout, r.deadline, r.timeout, owner, pool)
        if request.call:
            pending.call, pending.stream, pending.handler = b"s" if request.stream else b"c", request.stream, handler
        conn.requests.add(pending)
        self.router.send(assignments)

    def saturated(self) -> bool:
        return not self.dispatcher.idle_count and self.dispatcher.queued > 0

    def settle(self) -> None:
        """Act on the dispatcher's decisions: shed requests answered, cancels queued."""
        self.router.settle()

    def log_refusal(self, message: str, *args: Any) -> None:
        """A refused or reset request or connection, rate-limited (``Outcomes.log_refusal``)."""
        self.outcomes.log_refusal(message, *args)

    def wake_starved(self, conns: list[Connection]) -> None:
        """Connections that may read again now that budget bytes were freed (``Waker``)."""
        self.waker.wake(conns)

    # -- what it is doing -------------------------------------------------------------------

    def _stats(self) -> dict[str, Any]:
        """Everything ``gaspar stats``, ``/metrics`` and ``gaspar top`` show (``gaspar.frontend.stats``)."""
        return snapshot(self)

    def healthy(self) -> bool:
        """The daemon serves: it has not begun to stop its workers."""
        return not self.stopping

    def ready(self) -> bool:
        """Worth sending requests to: a worker is ready, not stopping, not :meth:`stalled`."""
        if self.draining or self.stopping or not any(not w.retiring for w in self.dispatcher.workers.values()):
            return False
        return self.stalled(time.monotonic()) is None

    def stalled(self, now: float) -> str | None:
        """Why work waits without progress (``memory``, ``workers``; ``admission.Stall``), or None."""
        d = self.dispatcher
        return self.stall.reason(now, self.budget.pressed, d.queued, d.control.service)

    # -- the pool -----------------------------------------------------------------------------

    @property
    def fork_server(self) -> ForkServer | None:
        """The current fork server of this host's workers."""
        return self.supervisor.fork_server if self.supervisor is not None else None

    @property
    def target(self) -> int:
        """How many worker processes this host runs (workers elsewhere are the agents')."""
        return self.supervisor.target if self.supervisor is not None else self.processes

    def owner(self, worker: WorkerSlot) -> WorkerOwner:
        """Who acts on a worker (kill, tell_exit, broadcast): the supervisor or the gateway."""
        return self.supervisor if worker.agent is None else self.gateway

    def manage_workers(self) -> None:
        """Tell retiring idle workers to exit, wherever they are; bring the pool to size."""
        self.supervisor.manage()
        if self.gateway is not None:
            self.gateway.manage()

    def _on_pool_ready(self) -> None:
        """Every local worker is ready (or there are none to wait for): serve."""
        if not self.running.is_set():
            if self.phase == Phase.STARTING:
                self.phase = Phase.SERVING
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
