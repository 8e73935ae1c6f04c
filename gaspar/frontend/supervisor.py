"""Supervision of this host's worker processes, in the front end's hub: gunicorn's arbiter, green.

An object of its own (as gunicorn's dirty arbiter and loky keep theirs), handed what it
needs and nothing more: the settings, the dispatcher (workers join and leave it), the
telemetry, and four callables of the front end (``send`` queues requests for workers,
``fail`` answers a request with an error, ``on_ready`` says the pool is up,
``on_fatal`` ends the daemon). The front end hands it messages and asks it to act on a
worker; workers on other hosts are the gateway's (:mod:`gaspar.frontend.gateway`), with the same
three verbs for a worker: :meth:`kill`, :meth:`tell_exit`, :meth:`broadcast`.

Its loop reads as its verbs: a worker says HELLO (:meth:`on_hello`) or exits
(:meth:`on_exit`, reported by the fork server with its wait status); :meth:`manage`
brings the pool back to its target; :meth:`reload` and :meth:`scale` change it. What each
event means and what to fork or retire is the pool book's (:mod:`gaspar.core.pool`), which the
agent shares; this is its green shell.

What each fault costs:

* a worker that dies mid-request fails that request (``WorkerDied``, with the pid and the
  exit code or signal); queued requests wait for the next idle worker; a new worker is
  forked at once;
* a request past its timeout fails (``WorkerTimeout``, the front end's ticker) and its
  worker is SIGKILLed (:meth:`kill`);
* a worker that dies before it is ready counts towards flapping: back off, then give up;
* ``max_requests``, a reload or a scale-down retire a worker only once it is idle, and a
  replacement is forked first, so no request fails;
* a reload whose code does not import, hangs importing past its bound (``timeout``, at
  least 10 s: :func:`gaspar.process.forks.import_bound`) or whose workers cannot boot,
  fails; the old workers serve on;
* a fork server that dies takes its workers along (their requests fail ``WorkerDied``);
  a fresh one takes its place, as a reload's does (five times a minute at most).

Its upkeep from the main loop (autoscaling, memory limits) is :mod:`gaspar.frontend.upkeep`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

with __import__("warnings").catch_warnings():
    __import__("warnings").simplefilter("ignore")
    import eventlet
    import eventlet.hubs
    from eventlet.event import Event as GreenEvent

import zmq

from gaspar.app import PoolPlan
from gaspar.core.autoscale import Autoscaler
from gaspar.core.pool import HALT_FLAPPING, Exit, FlapPolicy, PoolBook, flapping
from gaspar.core.records import WorkerSlot, draw_limit
from gaspar.errors import GasparError, WorkerDied
from gaspar.frontend.hub import watch_fd
from gaspar.ops import sdnotify
from gaspar.ops.reloads import Reloads
from gaspar.ops.telemetry import LogLimiter
from gaspar.process.forks import ForkServer, ForkServers
from gaspar.process.worker import WORKER_BOOT_ERROR
from gaspar.wire.envelope import Kind, pack_id

log = logging.getLogger("gaspar")


class Supervisor:
    """``target`` worker processes of ``consumer`` on this host, and as many as ``plan`` (the
    front end's :class:`gaspar.app.PoolPlan`) gives an App's pools of their own."""

    def __init__(
        self,
        consumer: Any,
        app_spec: str | None,
        settings: Any,
        dispatcher: Any,
        telemetry: Any,
        target: int,
        *,
        plan: PoolPlan,
        send: Callable[[list[Any]], None],
        take: Callable[[], None] = lambda: None,
        fail: Callable[..., None],
        on_ready: Callable[[], None],
        on_fatal: Callable[[int, BaseException | None], None],
    ) -> None:
        self.consumer, self.app_spec, self.settings = consumer, app_spec, settings
        self.dispatcher, self.telemetry = dispatcher, telemetry
        self._send, self._fail, self._on_ready, self._on_fatal = send, fail, on_ready, on_fatal
        self._take = take  # the router's round: take every message waiting from the workers
        s = settings
        self.book = PoolBook(target, FlapPolicy.of(s))
        self.book.sizes, self.book.max_memory, self.book.memory = plan.sizes, s.max_worker_memory, plan.memory
        self.autoscalers = {pool: Autoscaler.of(low, high, s) for pool, (low, high) in plan.ranges.items()}
        self.reloading: str | None = None  # "importing", then "replacing" until READY=1 (systemd)
        self.reloads = Reloads()  # the outcome of each, for gaspar ctl
        self.restarts = 0
        self.stopping = False
        self.router: Any = None  # the front end's ROUTER, once bound (see attach)
        self.forks: ForkServers | None = None  # the current fork server, a reload's next, old ones
        self.gone = GreenEvent()  # once stopping: every worker has exited
        self.churn = LogLimiter(burst=120, period=60.0)  # workers' boot, ready and exit lines

    def log(self, level: int, message: str, *args: Any) -> None:
        """A worker's boot, ready or exit line: 120 a minute at most, the rest summed up (a crash loop's flood)."""
        allowed, held = self.churn.allow()
        if allowed:
            log.log(level, message + (f" ({held} more worker lines not logged)" if held else ""), *args)

    @property
    def target(self) -> int:
        """Workers of every pool (an App's pools besides the default: ``book.sizes``)."""
        return self.book.total

    @property
    def booting(self) -> dict[int, Any]:
        return self.book.booting

    # -- start and stop --------------------------------------------------------------------

    def start_fork_server(self) -> None:
        """Fork the fork server: before any 0MQ context or hub exists in this process."""
        fs = ForkServer(self.consumer, self.settings, self.app_spec)
        fs.start()
        self.forks = ForkServers(fs)

    @property
    def fork_server(self) -> ForkServer | None:
        """The fork server that forks new workers (None before :meth:`start_fork_server`)."""
        return self.forks.current if self.forks is not None else None

    def attach(self, router: Any) -> None:
        """The front end's ROUTER is bound: workers connect to it. Start forking (in the hub)."""
        self.router = router
        self.fork_server.endpoint = router.last_endpoint.decode()
        self.watch_fork_server(self.fork_server)
        self.manage()

    def stop(self, graceful: bool, running: set[bytes]) -> None:
        """Stop every worker: tell idle ones to exit (``graceful``), kill the rest (those
        in ``running`` still run a handler) and those booting. :attr:`gone` fires after."""
        self.stopping = True
        self.reloads.settle(False, "the daemon stopped before the reload finished", time.time())
        for w in self.local_workers():
            if graceful and w.routing_id not in running:
                self.tell_exit(w)
            else:  # a fast stop, or a handler still running past graceful_timeout
                self.kill(w, signal.SIGKILL, "the daemon is stopping")
        for pid in self.book.stop():
            self.kill_pid(pid, signal.SIGKILL, "the daemon is stopping")
        self._check_gone()

    def waiting_for(self) -> bool:
        """Processes are still to exit (worth waiting for :attr:`gone`)."""
        return bool(self.local_workers()) or bool(self.book.pids())

    def close(self) -> None:
        """Reap every fork server (each kills what is left of its workers), bounded."""
        for fs in self.fork_servers():
            self.unwatch_fork_server(fs)
        for fs in self.fork_servers():
            if fs.pid is not None:
                fs.close()

    def _check_gone(self) -> None:
        if self.stopping and not self.local_workers() and not self.booting and not self.gone.ready():
            self.gone.send()

    # -- what it holds ---------------------------------------------------------------------

    def local_workers(self) -> list[WorkerSlot]:
        """The live worker processes of this host (the dispatcher also holds remote ones)."""
        return [w for w in self.dispatcher.workers.values() if w.agent is None]

    def ready_count(self) -> int:
        return sum(1 for w in self.local_workers() if not w.retiring)

    def worker_pids(self) -> list[int]:
        """The pids of every worker process, booting ones included."""
        return sorted([w.pid for w in self.local_workers()] + self.book.pids())

    def consumer_name(self) -> str:
        return self.fork_server.consumer_name()

    # -- a worker's life -------------------------------------------------------------------

    def on_hello(self, rid: bytes, payload: bytes) -> None:
        hello = json.loads(payload)
        pid = hello["pid"]
        boot = self.book.hello(hello["token"], pid)
        if boot is None:  # already counted as dead, or we are stopping
            return
        s = self.settings
        limit = draw_limit(s.max_requests, s.max_requests_jitter)
        slot = WorkerSlot(pid, boot.number, boot.generation, rid, max_requests=limit, pool=boot.pool)
        self.log(logging.INFO, "Worker %s (pid:%s) ready", slot.number, pid)
        if boot.proves:  # the reload's code boots: the old fork server may go
            self.forks.proven()
        self._send(self.dispatcher.add_worker(slot))
        self.manage()  # a rolling reload: an old worker goes for each new one ready
        if self.ready_count() >= self.target:
            self._on_ready()
        if self.reloading == "replacing":
            self.notify_if_reloaded()

    def on_exit(self, pid: int, number: int | None, status: int) -> None:
        # its last messages first: a reply sent just before it died answers its request (the
        # request it had started next is the one that dies with it); a booting worker's
        # FAILED says why it could not boot (not read once stopping: no boot matters then)
        slot = next((w for w in self.local_workers() if w.pid == pid), None)
        if slot is not None or not self.stopping:
            self._take()
        out = self.book.exited(pid, status)
        exitcode, sig, text = out.exitcode, out.signal, out.text
        if slot is not None:
            expected, reason = slot.exit_meaning(exitcode)
            req = self.dispatcher.remove_worker(slot.routing_id)
            if req is not None:
                facts = {"pid": pid, "exitcode": exitcode, "signal": sig}
                self._fail(req, WorkerDied, f"worker {number} (pid {pid}) {text}", **facts)
            self._send(self.dispatcher.dispatch())  # its prefetched request, if any, to an idle worker
            if not self.stopping:
                self.telemetry.restarted(slot.number, reason)
            if self.reloading == "replacing":  # an old worker scaled away may be the last one
                self.notify_if_reloaded()
            if expected or self.stopping:
                self.log(logging.INFO, "Worker %s (pid:%s) exited", number, pid)
            else:
                self.restarts += 1
                self.log(logging.ERROR, "Worker %s (pid:%s) %s", number, pid, text)
        elif out.boot_failure:
            said = out.booting is not None and out.booting.error
            why = (
                "its post_fork hook or the App's setup failed (above)"
                if exitcode == WORKER_BOOT_ERROR and not said
                else text
            )
            log.error("Worker %s (pid:%s) died before it was ready: %s", number, pid, why)
            self.telemetry.restarted(number, "died")
            self.on_boot_failure(out)
        self.manage()
        self._check_gone()

    def on_boot_failure(self, out: Exit) -> None:
        if out.rollback:  # a reload's workers cannot boot: it fails, the old workers stay
            self.on_reloaded(False, self.forks.rollback(out.rollback, out.abandoned))
        elif out.flap == FlapPolicy.GIVE_UP:
            log.critical(self.book.flap.gave_up())
            self._on_fatal(HALT_FLAPPING, GasparError(f"workers keep failing to boot; gave up (the last {out.text})"))
        elif out.flap == FlapPolicy.BACKOFF:
            log.warning("%s", flapping(out))
            eventlet.hubs.get_hub().schedule_call_global(out.backoff, eventlet.spawn_n, self.manage)

    def manage(self) -> None:
        """Bring the pool to its target: fork what is missing, retire what is extra."""
        if self.stopping:
            return
        d = self.dispatcher
        for w in d.retiring_idle():
            if w.agent is None:
                self.tell_exit(w)
        plan = self.book.plan(self.local_workers())
        for w in plan.retire:
            reason = "reload" if w.generation < self.book.generation else "scale"
            if d.retire(w.routing_id, reason):
                self.tell_exit(w)
        for boot in plan.spawn:
            fs = self.forks.forking(boot.generation < self.book.generation)
            fs.spawn(boot.number, boot.generation, boot.token, boot.pool)

    # -- acting on a worker (the gateway has the same three for remote ones) ---------------

    def kill(self, worker: WorkerSlot, sig: int, why: str, dump: bool = False) -> None:
        self.kill_pid(worker.pid, sig, why, dump)

    def kill_soon(self, worker: WorkerSlot, why: str, grace: float = 1.0) -> None:
        """SIGKILL a worker that is dying anyway (its 0MQ pipe is gone) unless it has exited
        within ``grace``: a handler's ``sys.exit`` or uncaught KeyboardInterrupt then keeps
        its own exit code and traceback (QA: a kill at once took both, under load)."""

        def still_there() -> None:  # its slot goes at its exit (a recycled pid has another)
            if self.dispatcher.workers.get(worker.routing_id) is worker:
                self.kill_pid(worker.pid, signal.SIGKILL, why)

        eventlet.hubs.get_hub().schedule_call_global(grace, still_there)

    def kill_pid(self, pid: int, sig: int, why: str, dump: bool = False) -> None:
        """Signal a worker through its fork server, remembering why for its exit's log line
        (a worker we SIGKILLed for a timeout was not out of memory); with ``dump``, its
        stack is logged first (a hang leaves a traceback)."""
        self.book.killing(pid, why)
        self.forks.kill(pid, sig, dump)

    def tell_exit(self, worker: WorkerSlot) -> None:
        """Ask an idle worker to exit cleanly (it has nothing in hand)."""
        if worker.told_exit:
            return
        worker.told_exit = True
        try:
            self.router.send_multipart([worker.routing_id, Kind.EXIT.value], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.kill(worker, signal.SIGTERM, "it could not be told to exit")

    def broadcast(self, worker: WorkerSlot, message: bytes) -> bool:
        try:
            self.router.send_multipart([worker.routing_id, Kind.BROADCAST.value + pack_id(0), message], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("Broadcast to worker %s (pid:%s) failed: %s", worker.number, worker.pid, exc)
            return False

    # -- reload and scale ----------------------------------------------------------------

    def reload(self, producer: Any = None) -> None:
        """Load the code afresh (a fresh fork server when the app has a name), then replace
        the workers one by one; ``producer`` is passed to the ``on_reload`` hook."""
        if self.stopping:
            return
        if self.forks.next is not None:
            log.warning("A reload is already under way; ignoring this one")
            return
        log.info("Reloading %s", self.fork_server.consumer_name())
        if self.settings.on_reload is not None:
            self.settings.on_reload(producer)
        self.reloads.begin(self.fork_server.consumer_name(), time.time())
        self.reloading = "importing"  # READY=1 again once on_reloaded and the workers settle it
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={sdnotify.monotonic_usec()}\nSTATUS=Reloading")
        fresh, error = self.forks.start_next()
        if error is not None:
            self.on_reloaded(False, error)
        elif fresh is not None:
            self.watch_fork_server(fresh)

    def on_reloaded(self, ok: bool, error: str | None, fs: ForkServer | None = None) -> None:
        """The fork server ``fs`` imported the new code (``ok``) or could not (or, ``fs``
        None, the new code's workers cannot boot). A fresh one that did becomes the current
        one, and the old one stands by until a new worker is ready."""
        self.forks.settle(ok, fs)
        self.reloading = "replacing"
        if not ok:
            log.error("Reload failed; keeping the current workers: %s", error)
            self.reloads.settle(False, error, time.time())
            self.notify_if_reloaded("Reload failed; ")
            return
        generation = self.book.reloaded()
        log.info("Reloaded; replacing the workers one by one (generation %s)", generation)
        self.manage()
        self.notify_if_reloaded()  # settled at once when no worker here is to be replaced (workers 0)

    def check_import(self) -> None:
        """A reload's fork server still importing past its bound is killed: the reload failed
        (every second, from the main loop)."""
        if self.forks is not None:
            self.forks.check_import(self.on_reloaded)

    def scale(self, n: int, least: int = 1) -> None:
        if n > self.settings.max_workers:
            raise ValueError(f"cannot scale to {n} workers: max_workers is {self.settings.max_workers}")
        self.book.target = max(least, int(n))  # the default pool
        log.info("Scaling to %s workers", self.book.target)
        self.manage()

    # -- systemd ---------------------------------------------------------------------------

    def notify_ready(self, status: str = "") -> None:
        """Tell systemd (``Type=notify``) that we serve; a no-op without ``$NOTIFY_SOCKET``."""
        n = self.ready_count()
        summary = f"{n} worker{'s' if n != 1 else ''} ready"
        sdnotify.notify(f"READY=1\nSTATUS={status}{summary}\nMAINPID={os.getpid()}")

    def notify_if_reloaded(self, status: str = "") -> None:
        """READY=1 again once a reload has settled: every worker ready and of the new generation."""
        live = [w for w in self.local_workers() if not w.retiring]
        if len(live) < self.target or any(w.generation < self.book.generation for w in live):
            return
        self.reloading = None
        self.reloads.settle(True, None, time.time(), self.book.generation)
        self.notify_ready(status)

    # -- fork servers: the current one, the next (a reload importing), old ones retiring --

    def fork_servers(self) -> list[ForkServer]:
        return self.forks.all() if self.forks is not None else []

    def watch_fork_server(self, fs: ForkServer) -> None:
        fs.listener = watch_fd(eventlet.hubs.get_hub(), fs.events_fd, self.on_fork_server_events)

    def unwatch_fork_server(self, fs: ForkServer) -> None:
        if fs.listener is not None:
            eventlet.hubs.get_hub().remove(fs.listener)
            fs.listener = None

    def on_fork_server_events(self, fd: int) -> None:
        fs = next((f for f in self.fork_servers() if f.events_fd == fd), None)
        if fs is None:
            return
        events = fs.read_events()
        if events is None:
            self.unwatch_fork_server(fs)
            if fs is not self.fork_server:
                eventlet.spawn_n(self.on_fork_server_gone, fs)
            elif not self.stopping:
                self.on_fork_server_lost(fs)
            return
        eventlet.spawn_n(self._handle_events, events, fs)

    def on_fork_server_gone(self, fs: ForkServer) -> None:
        """A fork server other than the current one exited: an old one whose workers are
        all gone, or a new one that could not import the application. Reap it."""
        pid = fs.pid
        failed, dead = self.forks.gone(fs, self.book)  # a standby's workers die with it
        (log.error if dead else log.info)("Fork server (pid:%s) exited%s", pid, ", its workers with it" * bool(dead))
        for child, number in dead:
            self.on_exit(child, number, signal.SIGKILL)
        if failed is not None:  # a reload's, before it said whether the import worked
            self.on_reloaded(False, failed, fs)

    def on_fork_server_lost(self, fs: ForkServer) -> None:
        """The current fork server died, and its workers with it, unreported: each counts
        as killed (its request WorkerDied), and a fresh fork server forks their successors."""
        fresh, dead = self.forks.replace(fs, self.book)
        if fresh is None:
            return self._on_fatal(1, None)
        self.watch_fork_server(fresh)
        for pid, number in dead:
            self.on_exit(pid, number, signal.SIGKILL)

    def _handle_events(self, events: list[dict[str, Any]], fs: ForkServer | None = None) -> None:
        for event in events:
            try:
                self._handle_event(event, fs or self.fork_server)
            except Exception:  # one bad event must not lose the others (a worker's exit...)
                log.exception("Error handling fork server event %r; carrying on", event)

    def _handle_event(self, event: dict[str, Any], fs: ForkServer) -> None:
        kind = event["ev"]
        if kind == "spawned":
            self.log(logging.INFO, "Booting worker %s (pid:%s)", event["number"], event["pid"])
            why = self.book.spawned(event["token"], event["pid"])  # forked just as we stopped...
            if why:
                self.kill_pid(event["pid"], signal.SIGKILL, why)
        elif kind == "exited":
            self.on_exit(event["pid"], event["number"], event["status"])
        elif kind == "reloaded" and not self.forks.replaced(fs, event["ok"]):
            self.on_reloaded(event["ok"], event["error"], fs)
