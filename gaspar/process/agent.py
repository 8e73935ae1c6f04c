"""The agent: a pool of workers on another host, joined to a front end over 0MQ.

``gaspar worker MODULE:CALLABLE --connect tcp://HOST:PORT --workers N`` runs this::

    front end ◀══ one DEALER, CURVE ══▶ agent ──ROUTER (ipc)──▶ N workers
                 JOIN / WELCOME, PING / PONG,     fork server: forks, reaps, flapping
                 workers' messages relayed whole

**Only the agent speaks to the network.** Its workers are the same processes as a local
pool's (forked by a fork server before any 0MQ context exists, hooks, ``max_requests``,
flapping), connected to the agent's own ROUTER; the agent relays their messages to the
front end and back, frames as they are (a large payload is not copied). A handler that
holds the GIL for minutes delays nothing here, so it never looks like a dead host.

**Sessions.** The agent sends JOIN (its name, host, a random instance id); the front end
answers WELCOME with a session number and its heartbeat and liveness settings, or REFUSE.
Then the agent announces its ready workers and relays. The front end pings; the agent
answers each ping at once. An agent that hears nothing from the front end for ``liveness``
seconds (or that is told GONE) has lost it: it SIGKILLs the workers that were running a
request (the front end has failed those requests as ``WorkerLost`` or will), keeps the idle
ones, drops its connection and joins again, as a new session, after a capped, jittered
back-off (:func:`gaspar.core.agents.reconnect_delay`): a front end that comes back is not met by
every agent at once. Replies of the old session are never delivered: its connection is gone,
and the front end drops what arrives from an ended session.

**Why a join fails.** While joining, the agent listens to libzmq's events on its
connection (a socket monitor), so a JOIN that gets no answer is logged with the likely cause
(``gaspar.process.uplink.join_trouble``): nothing listens there, the front end refused its CURVE key, CURVE on
one side only, or the wrong ``--curve-server`` key.

**Reloading.** SIGHUP: a fresh fork server imports the application (every module) anew;
then the workers of the older code are replaced one at a time: the agent asks the front end
to retire one (RETIRE), the front end tells it to exit once it is idle, and a new one is
forked. No request is lost, and the session goes on.

**Stopping.** SIGTERM: LEAVE (the front end sends nothing more), let running requests finish
(up to ``graceful_timeout``), then exit. SIGINT or SIGQUIT: at once. The workers die with
the agent, as a local pool's die with the front end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import time
from typing import Any

import zmq

from gaspar.app import DEFAULT_POOL, pool_plan
from gaspar.core.autoscale import parse_range
from gaspar.core.pool import HALT_FLAPPING, Exit, FlapPolicy, PoolBook, flapping
from gaspar.core.records import LocalWorker
from gaspar.ops import sdnotify
from gaspar.ops.ipcdir import make_ipc_dir
from gaspar.ops.procstat import resident_bytes
from gaspar.process.forks import ForkServer, ForkServers
from gaspar.process.forkserver import drain
from gaspar.process.uplink import Uplink
from gaspar.process.worker import set_proctitle
from gaspar.version import __version__
from gaspar.wire.envelope import ID, Kind, Link
from gaspar.wire.framing import Status, error_body

log = logging.getLogger("gaspar")

_HELLO, _REQUEST, _AHEAD = Kind.HELLO.value[0], Kind.REQUEST.value[0], Kind.AHEAD.value[0]
_FAILED = Kind.FAILED.value[0]
_REPLY, _SKIPPED = Kind.REPLY.value[0], Kind.SKIPPED.value[0]


class Agent(Uplink):
    """Runs ``workers`` workers of ``consumer`` and joins them to the front end at ``connect``."""

    def __init__(
        self,
        consumer: Any,
        settings: Any,
        connect: str,
        workers: int | str,
        name: str | None = None,
        spec: str | None = None,
        curve_secret: str | None = None,
        curve_server: str | None = None,
        reconnect_max: float = 5.0,
    ) -> None:
        if (curve_secret is None) != (curve_server is None):
            raise ValueError("--curve-secret and --curve-server go together (this agent's key, the server's)")
        low, high = parse_range(workers)  # N, or MIN:MAX: the front end sizes it by its queue
        if high == 0 and not settings.pools:
            raise ValueError(f"an agent runs at least 1 worker (0 with --pool), not {workers}")
        self.consumer, self.settings, self.spec = consumer, settings, spec
        self.connect = connect
        self.host = socket.gethostname()
        # with CURVE the front end knows an agent by its key's NAME: that is its name
        keyname = os.path.basename(curve_secret or "").removesuffix(".key_secret") if curve_secret else ""
        self.name = name or keyname or self.host
        self.instance = secrets.token_hex(8)
        self.curve = (curve_secret, curve_server) if curve_secret else None
        self.reconnect_max = reconnect_max
        self.liveness = settings.agent_liveness  # the front end's, once it has welcomed us
        self.max_reply: int | None = None  # the front end's max_message_size, once welcomed
        self.state = "idle"  # idle (waiting to join), joining, joined, leaving
        self.session = 0
        self.attempt = 0  # joins since the last WELCOME: the back-off grows with it
        self.next_join = 0.0
        self.last_lost: str | None = None  # why the last session ended (a new reason is a WARNING)
        self.last_heard = 0.0
        self.link: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None  # libzmq's events on the link, while joining
        self.seen: set[int] = set()
        self.stop_mode: str | None = None  # "graceful" or "fast", from a signal
        self.leave_deadline = math.inf
        self.leave_acked = False  # the front end answered our LEAVE: it sends no more requests
        self.exit_code = 0
        self.book = PoolBook(low, FlapPolicy.of(settings))  # booting, numbers, generations, flapping
        plan = pool_plan(consumer, settings.pools)  # an App's pools, if --pool says
        self.ranges = {**plan.ranges, **({DEFAULT_POOL: (low, high)} if high != low else {})}  # see uplink.resize
        self.book.sizes, self.book.max_memory, self.book.memory = plan.sizes, settings.max_worker_memory, plan.memory
        self.next_memory_check = 0.0
        self.by_pid: dict[int, LocalWorker] = {}  # ready workers
        self.by_wid: dict[bytes, LocalWorker] = {}
        self.forks: ForkServers | None = None  # the current fork server, a reload's next, old ones
        self.reload_requested = False
        self._poller: zmq.Poller | None = None
        self._watched: tuple[Any, ...] = ()

    @property
    def target(self) -> int:
        return self.book.total

    # -- the main loop ---------------------------------------------------------------------

    def run(self) -> int:
        """The agent's whole life; returns its exit code."""
        fs = ForkServer(self.consumer, self.settings, self.spec)
        fs.start()  # before any 0MQ context exists in this process
        self.forks = ForkServers(fs)
        self.ipc_dir = None
        self.ctx = zmq.Context(1)
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {
            signal.SIGTERM: lambda *_: self.request_stop("graceful"),
            signal.SIGINT: lambda *_: self.request_stop("fast"),
            signal.SIGQUIT: lambda *_: self.request_stop("fast"),
            signal.SIGHUP: lambda *_: setattr(self, "reload_requested", True),
            # not "one worker more/fewer" here (its size is --workers), and never the default
            # action, which stops the process: a frozen agent would be lost
            signal.SIGTTIN: lambda *_: log.warning("SIGTTIN ignored: an agent runs --workers"),
            signal.SIGTTOU: lambda *_: log.warning("SIGTTOU ignored: an agent runs --workers"),
        }
        old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
        set_proctitle(f"{self.settings.proc_name}: agent {self.name} for {self.connect}")
        try:
            self.open_workers_socket()
            facts = (self.name, __version__, os.getpid(), self.target, self.connect)
            log.info("Agent %s (gaspar %s, pid:%s) with %s workers for %s", *facts)
            self.manage_workers()
            while not self.advance_stop():
                self.poll_once()
            return self.exit_code
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            signal.set_wakeup_fd(old_wakeup)
            self.close()
            os.close(wake_w)

    def open_workers_socket(self) -> None:
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.workers_sock.linger = 0
        self.workers_sock.router_mandatory = 1
        if self.settings.transport == "ipc":
            self.ipc_dir = make_ipc_dir()
            self.workers_sock.bind(f"ipc://{self.ipc_dir}/workers")
        else:
            self.workers_sock.bind("tcp://127.0.0.1:*")
        self.forks.current.endpoint = self.workers_sock.last_endpoint.decode()

    def advance_stop(self) -> bool:
        """Move a requested stop along (LEAVE, then the wait for running requests, up to
        ``graceful_timeout``); True once the agent may exit. Not a predicate: it sends."""
        if self.exit_code and self.stop_mode is None:
            self.request_stop("fast")
        if self.stop_mode is None:
            return False
        if self.stop_mode == "graceful" and self.state == "joined":
            self.send_control(Link.LEAVE, final=False)
            self.state = "leaving"
            self.leave_deadline = time.monotonic() + self.settings.graceful_timeout
            log.info("Leaving: no new requests; waiting for %s running", self.running())
        # every request sent before the front end's answer to LEAVE has arrived by then
        unsettled = not self.leave_acked or self.running()
        if self.state == "leaving" and unsettled and time.monotonic() < self.leave_deadline:
            return False
        if self.state in ("joined", "leaving"):
            self.send_control(Link.LEAVE, final=True)
            if self.link is not None:
                self.link.linger = 1000  # let the LEAVE go out before the socket closes
        return True

    def poll_once(self) -> None:
        watched = (self.link, *(fs.events_fd for fs in self.fork_servers()))
        if self._poller is None or self._watched != watched:  # made anew when these change
            self._poller = zmq.Poller()
            for item in (self.workers_sock, self.wake_r, *watched):
                if item is not None:
                    self._poller.register(item, zmq.POLLIN)
            self._watched = watched
        ready = dict(self._poller.poll(100))
        if self.wake_r in ready:
            drain(self.wake_r)
        for fs in self.fork_servers():
            if fs.events_fd in ready:
                self.on_fork_server_events(fs)
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        if self.workers_sock in ready:  # replies before control: a late one still reaches the front end, counted stale
            self.read_workers()
        if self.link is not None and self.link in ready:
            self.read_link()
        self.keep_alive()
        self.check_memory()
        if self.forks is not None:  # a reload's import that hangs: killed, the reload failed
            self.forks.check_import(self.on_reloaded)
        if len(self.by_pid) + len(self.book.booting) < self.target:
            self.manage_workers()  # a back-off that ended

    def request_stop(self, mode: str) -> None:
        if self.stop_mode is None:
            sdnotify.notify(f"STOPPING=1\nSTATUS=Stopping ({mode})")
        if self.stop_mode != "fast":
            self.stop_mode = mode

    def to_worker(self, wid: bytes, frames: list[Any]) -> None:
        """A message for one of our workers: ``[wid, head, body...]``, relayed as it is."""
        w = self.by_wid.get(wid)
        head = frames[1].bytes
        if w is not None and head[0] in (_REQUEST, _AHEAD):
            w.requests.add(head[ID])
        try:
            self.workers_sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # the worker is gone: its EXITED tells the front end, which fails the request

    # -- the workers ------------------------------------------------------------------------

    def read_workers(self) -> None:
        sock = self.workers_sock
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            wid, head = frames[0].bytes, frames[1].bytes
            kind = head[0]
            if kind == _HELLO:
                self.on_hello(wid, frames[2].bytes)
                continue
            if kind == _FAILED:  # why a booting worker cannot boot: for its exit's line
                self.book.failed_message(frames[2].bytes)
                continue
            w = self.by_wid.get(wid)
            if w is not None and kind in (_REPLY, _SKIPPED):
                w.requests.discard(head[ID])
            if kind == _REPLY and self.max_reply and len(frames) > 2 and len(frames[2]) > self.max_reply:
                # the front end drops a connection that sends past its limit: answer for the worker
                size, limit = len(frames[2]), self.max_reply
                text = f"the reply of {size} bytes is over the front end's max_message_size ({limit})"
                frames = [wid, head[: ID.stop] + bytes([Status.HANDLER_ERROR]), error_body("ReplyTooLarge", text)]
            if self.state in ("joined", "leaving"):  # else no session can carry it: dropped
                self.send_link(frames)

    def on_hello(self, wid: bytes, payload: bytes) -> None:
        hello = json.loads(payload)
        pid = hello["pid"]
        boot = self.book.hello(hello["token"], pid)  # it may outrun the fork server's "spawned"
        if boot is None:  # reaped already
            return
        w = LocalWorker(pid, boot.number, boot.generation, wid, payload, boot.pool)
        self.by_pid[pid] = self.by_wid[wid] = w
        log.info("Worker %s (pid:%s) ready", w.number, w.pid)
        if boot.proves:  # the reload's code boots: the old fork server may go
            self.forks.proven()
        self.announce(w)
        self.manage_workers()  # a rolling reload: an old worker goes for each new one ready

    def announce(self, w: LocalWorker) -> None:
        if self.state == "joined" and w.hello is not None and not w.announced:
            w.announced = self.send_link([w.wid, Kind.HELLO.value, w.hello])

    def on_fork_server_events(self, fs: ForkServer) -> None:
        events = fs.read_events()
        if events is None:  # it exited
            if fs is self.forks.current:  # its workers died with it: reported, and a fresh one forks theirs
                fresh, dead = self.forks.replace(fs, self.book)
                for pid, number in dead:
                    self.on_exit(pid, number, signal.SIGKILL)
                if fresh is None:
                    self.exit_code = 1
            else:  # a standby's workers die with it too
                failed, dead = self.forks.gone(fs, self.book)
                for pid, number in dead:
                    self.on_exit(pid, number, signal.SIGKILL)
                if failed is not None:
                    self.on_reloaded(False, failed, fs)
            return
        for event in events:
            if event["ev"] == "spawned":
                log.info("Booting worker %s (pid:%s)", event["number"], event["pid"])
                if self.book.spawned(event["token"], event["pid"]):  # stopping, or its reload given up
                    self.forks.kill(event["pid"], signal.SIGKILL)
            elif event["ev"] == "exited":
                self.on_exit(event["pid"], event["number"], event["status"])
            elif event["ev"] == "reloaded" and not self.forks.replaced(fs, event["ok"]):
                self.on_reloaded(event["ok"], event["error"], fs)
        self.manage_workers()

    # -- reload (SIGHUP): new code, the workers replaced one by one -------------------------

    def fork_servers(self) -> list[ForkServer]:
        return self.forks.all() if self.forks is not None else []

    def reload(self) -> None:
        """Import the application afresh in a new fork server (or, for a consumer without a
        name, re-import its module), then replace the workers one by one."""
        if self.forks.next is not None or self.stop_mode is not None:
            log.warning("A reload is already under way, or we are stopping; ignoring this one")
            return
        log.info("Reloading %s", self.forks.current.consumer_name())
        _, error = self.forks.start_next()  # its events are polled with the others'
        if error is not None:
            self.on_reloaded(False, error, None)

    def on_reloaded(self, ok: bool, error: str | None, fs: ForkServer | None) -> None:
        self.forks.settle(ok, fs)
        if not ok:
            log.error("Reload failed; keeping the current workers: %s", error)
            return
        generation = self.book.reloaded()
        log.info("Reloaded; replacing the workers one by one (generation %s)", generation)
        self.manage_workers()

    def check_memory(self) -> None:
        """Once a second: workers past their memory limit are retired (the front end lets
        each finish its request) and replaced (``max_worker_memory``, as the front end's)."""
        now = time.monotonic()
        if now < self.next_memory_check or not (self.book.max_memory or self.book.memory):
            return
        self.next_memory_check = now + 1.0
        for w, used, limit in self.book.over_memory(list(self.by_pid.values()), resident_bytes):
            log.info("Worker %s (pid:%s) holds %s MiB, past %s MiB: replaced", w.number, w.pid, used >> 20, limit >> 20)
            self.retire(w, "memory")
            self.manage_workers()

    def retire(self, w: LocalWorker, why: str = "reload") -> None:
        """Have a worker leave once idle: retired by the front end (so no request is lost),
        or, with no session, told to exit at once (nothing can be sent to it meanwhile)."""
        w.retiring = True
        if w.announced and self.state == "joined":
            self.send_control(Link.RETIRE, wid=w.wid.decode(), why=why)
        else:
            try:
                self.workers_sock.send_multipart([w.wid, Kind.EXIT.value], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.kill(w, signal.SIGTERM)

    def kill(self, w: LocalWorker, sig: int, dump: bool = False, why: str = "") -> None:
        """Signal a worker through its fork server (``dump``: log its stack; ``why``: logged at its exit)."""
        self.book.killing(w.pid, why)  # "": none of ours, the exit line guesses
        self.forks.kill(w.pid, sig, dump)

    def on_exit(self, pid: int, number: int, status: int) -> None:
        self.read_workers()  # its last replies go out before the news of its death; or its FAILED
        out = self.book.exited(pid, status)
        w = self.by_pid.pop(pid, None)
        if w is not None:
            self.by_wid.pop(w.wid, None)
            if w.announced:
                why = {"why": out.why} if out.why else {}  # the front end's log and client say it too
                self.send_control(Link.EXITED, wid=w.wid.decode(), pid=pid, number=number, status=status, **why)
            if self.stop_mode is not None:
                return
            if out.exitcode == 0:
                log.info("Worker %s (pid:%s) exited", number, pid)
            else:
                log.error("Worker %s (pid:%s) %s", number, pid, out.text)
        elif out.boot_failure and self.stop_mode is None:
            log.error("Worker %s (pid:%s) died before it was ready: %s", number, pid, out.text)
            self.on_boot_failure(out)

    def on_boot_failure(self, out: Exit) -> None:
        if out.rollback:  # a reload's workers cannot boot: it fails, the old workers stay
            self.on_reloaded(False, self.forks.rollback(out.rollback, out.abandoned), None)
        elif out.flap == FlapPolicy.GIVE_UP:
            log.critical(self.book.flap.gave_up())
            self.exit_code = HALT_FLAPPING
        elif out.flap == FlapPolicy.BACKOFF:
            log.warning("%s", flapping(out))

    def manage_workers(self) -> None:
        """Bring the pool to its size (the agent's; the front end only uses it), as the pool
        book plans: fork what is missing, retire old and extra workers."""
        if self.stop_mode is not None or self.exit_code:
            return
        plan = self.book.plan(list(self.by_pid.values()))
        for w in plan.retire:
            self.retire(w)
        for boot in plan.spawn:
            fs = self.forks.forking(boot.generation < self.book.generation)
            fs.spawn(boot.number, boot.generation, boot.token, boot.pool)

    def running(self) -> int:
        return sum(1 for w in self.by_pid.values() if w.requests)

    def close(self) -> None:
        for pid in self.book.stop():  # booting: killed
            self.forks.kill(pid, signal.SIGKILL)
        for w in self.by_pid.values():  # idle workers exit cleanly (worker_exit hooks run)
            if not w.requests and self.stop_mode == "graceful":
                try:
                    self.workers_sock.send_multipart([w.wid, Kind.EXIT.value], zmq.NOBLOCK)
                    continue
                except zmq.ZMQError:
                    pass
            self.kill(w, signal.SIGKILL)
        self.drop_link()
        if getattr(self, "workers_sock", None) is not None:
            self.workers_sock.close(linger=0)
        for fs in self.fork_servers():
            fs.close()  # the workers first: they hold connections to our socket
        self.ctx.term()
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        os.close(self.wake_r)
        log.info("Agent %s stopped (exit code %s)", self.name, self.exit_code)


__all__ = ["Agent"]
