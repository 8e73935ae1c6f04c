"""Supervision of the worker pool, in the front end's hub: gunicorn's arbiter, green.

The loop reads as its verbs: a worker says HELLO (``on_hello``) or exits (``on_exit``,
reported by the fork server with its wait status); ``manage_workers`` brings the pool back
to its target; ``tick`` kills what ran past its timeout; signals map to one small method
each (``handle_term``, ``handle_int``, ``handle_hup``...).

What each fault costs:

* a worker that dies mid-request fails that request (``WorkerDied``, with the pid and the
  exit code or signal); queued requests wait for the next idle worker; a new worker is
  forked at once;
* a request past its timeout fails (``WorkerTimeout``) and its worker is SIGKILLed;
* a worker that dies before it is ready counts towards flapping: back off, then give up;
* ``max_requests``, a reload or a scale-down retire a worker only once it is idle, and a
  replacement is forked first, so no request fails.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any

with __import__("warnings").catch_warnings():
    __import__("warnings").simplefilter("ignore")
    import eventlet
    import eventlet.hubs

import zmq

from . import sdnotify
from .arbiter import HALT_FLAPPING, FlapPolicy, ForkServer, describe_exit
from .connection import watch_fd
from .dispatch import WorkerSlot, draw_limit
from .errors import GasparError
from .framing import Kind, Status, pack_id
from .worker import WORKER_BOOT_ERROR

log = logging.getLogger("gaspar")


class Booting:
    """A fork asked of the fork server, until its worker says HELLO or dies."""

    __slots__ = ("number", "generation", "pid")

    def __init__(self, number: int, generation: int) -> None:
        self.number, self.generation, self.pid = number, generation, None


class Supervisor:
    """Mixed into Producer; relies on its dispatcher, router, fork_server and settings."""

    # -- worker lifecycle ----------------------------------------------------------------

    def on_hello(self, rid: bytes, payload: bytes) -> None:
        hello = json.loads(payload)
        pid, token = hello["pid"], hello["token"]
        boot = self.booting.pop(token, None)
        self.pid_token.pop(pid, None)
        if boot is None or self.stopping:  # already counted as dead, or we are stopping
            return
        s = self.settings
        limit = draw_limit(s.max_requests, s.max_requests_jitter)
        slot = WorkerSlot(pid, hello["number"], hello["generation"], rid, max_requests=limit)
        self.flap.booted()
        log.info("Worker %s (pid:%s) ready", slot.number, pid)
        self._send(self.dispatcher.add_worker(slot))
        if slot.generation == self.generation:
            old = [w for w in self.local_workers() if w.generation < self.generation and not w.retiring]
            if old:  # a rolling reload: one new worker in, one old worker out
                old.sort(key=lambda w: w.current is not None)
                self.dispatcher.retire(old[0].routing_id, "reload")
        self.manage_workers()
        if not self.running.is_set() and self.ready_count() >= self.target:
            self.running.set()
            self.notify_ready()
        elif self.reloading == "replacing":
            self.notify_if_reloaded()

    def local_workers(self) -> list[WorkerSlot]:
        """The live worker processes of this host (remote ones are the gateway's)."""
        return [w for w in self.dispatcher.workers.values() if w.agent is None]

    def ready_count(self) -> int:
        return sum(1 for w in self.local_workers() if not w.retiring)

    def notify_ready(self, status: str = "") -> None:
        """Tell systemd (``Type=notify``) that we serve; a no-op without ``$NOTIFY_SOCKET``."""
        n = self.ready_count()
        summary = f"{n} worker{'s' if n != 1 else ''} ready"
        sdnotify.notify(f"READY=1\nSTATUS={status}{summary}\nMAINPID={os.getpid()}")

    def notify_if_reloaded(self, status: str = "") -> None:
        """READY=1 again once a reload has settled: every worker ready and of the new generation."""
        live = [w for w in self.local_workers() if not w.retiring]
        if len(live) < self.target or any(w.generation < self.generation for w in live):
            return
        self.reloading = None
        self.notify_ready(status)

    # -- fork servers: the current one, the next (a reload importing), old ones retiring --

    def fork_servers(self) -> list[ForkServer]:
        return [fs for fs in (self.fork_server, self.next_fork_server, *self.old_fork_servers) if fs is not None]

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
                log.critical("The fork server died; stopping")
                self.exit_code = 1
                eventlet.spawn_n(self.begin_stop, False)
            return
        eventlet.spawn_n(self._handle_events, events, fs)

    def on_fork_server_gone(self, fs: ForkServer) -> None:
        """A fork server other than the current one exited: an old one whose workers are
        all gone, or a new one that could not import the application. Reap it."""
        pid = fs.pid
        if fs is self.next_fork_server:  # died before it said whether the import worked
            self.on_reloaded(False, f"the new fork server (pid:{pid}) exited before it was ready", fs)
        if fs in self.old_fork_servers:
            self.old_fork_servers.remove(fs)
        fs.close()
        log.info("Fork server (pid:%s) exited", pid)

    def _handle_events(self, events: list[dict[str, Any]], fs: ForkServer | None = None) -> None:
        for event in events:
            try:
                self._handle_event(event, fs or self.fork_server)
            except Exception:  # one bad event must not lose the others (a worker's exit...)
                log.exception("Error handling fork server event %r; carrying on", event)

    def _handle_event(self, event: dict[str, Any], fs: ForkServer) -> None:
        kind = event["ev"]
        if kind == "spawned":
            fs.children.add(event["pid"])
            boot = self.booting.get(event["token"])
            if boot is not None:
                boot.pid = event["pid"]
                self.pid_token[event["pid"]] = event["token"]
            log.info("Booting worker %s (pid:%s)", event["number"], event["pid"])
            if self.stopping:  # forked just as we stopped: begin_stop did not know its pid
                self.kill_worker(event["pid"], signal.SIGKILL, "the daemon is stopping")
        elif kind == "exited":
            fs.children.discard(event["pid"])
            self.on_exit(event["pid"], event["number"], event["status"])
        elif kind == "reloaded":
            self.on_reloaded(event["ok"], event["error"], fs)

    def on_exit(self, pid: int, number: int | None, status: int) -> None:
        exitcode, sig, text = describe_exit(status)
        why = self.kill_reasons.pop(pid, None)
        if why is not None and sig is not None:
            text = f"killed by {signal.Signals(sig).name} because {why}"
        slot = next((w for w in self.local_workers() if w.pid == pid), None)
        if slot is not None:
            expected = slot.retiring and exitcode == 0
            req = self.dispatcher.remove_worker(slot.routing_id)
            if req is not None:
                facts = {"pid": pid, "exitcode": exitcode, "signal": sig}
                self._fail(req, Status.WORKER_DIED, "WorkerDied", f"worker {number} (pid {pid}) {text}", **facts)
            self._send(self.dispatcher.dispatch())  # its prefetched request, if any, to an idle worker
            if not self.stopping:
                reason = slot.retire_reason if slot.retire_reason == "timeout" or expected else "died"
                self.telemetry.restarted(slot.number, reason or "scale")
            if expected or self.stopping:
                log.info("Worker %s (pid:%s) exited", number, pid)
            else:
                self.restarts += 1
                log.error("Worker %s (pid:%s) %s", number, pid, text)
        else:
            token = self.pid_token.pop(pid, None)
            if self.booting.pop(token, None) is not None and not self.stopping:
                why = "its post_fork hook failed" if exitcode == WORKER_BOOT_ERROR else text
                log.error("Worker %s (pid:%s) died before it was ready: %s", number, pid, why)
                self.telemetry.restarted(number, "died")
                self.on_boot_failure()
        self.manage_workers()
        if self.stopping and not self.dispatcher.workers and not self.booting and not self._workers_gone.ready():
            self._workers_gone.send()

    def on_boot_failure(self) -> None:
        if self.backoff_until == math.inf:  # already given up
            return
        action, delay = self.flap.boot_failed(time.monotonic())
        if action == FlapPolicy.GIVE_UP:
            f = self.flap
            log.critical(
                "Workers failed to boot %s times within %ss, %s times over; giving up",
                f.attempts,
                f.window,
                f.max_retry + 1,
            )
            self.exit_code = HALT_FLAPPING
            self.backoff_until = math.inf  # fork nothing more, even before begin_stop runs
            self._failure = GasparError("workers keep failing to boot; gave up (see the log)")
            eventlet.spawn_n(self.begin_stop, False)
        elif action == FlapPolicy.BACKOFF:
            log.warning("Workers are flapping; waiting %ss before the next fork", delay)
            self.backoff_until = time.monotonic() + delay
            eventlet.hubs.get_hub().schedule_call_global(delay, eventlet.spawn_n, self.manage_workers)

    def manage_workers(self) -> None:
        """Bring the pool to its target: fork what is missing, retire what is extra."""
        if self.stopping:
            return
        d = self.dispatcher
        for w in d.retiring_idle():
            self.tell_exit(w)
        if time.monotonic() < self.backoff_until:
            return
        live = [w for w in self.local_workers() if not w.retiring]
        if any(w.generation < self.generation for w in live):  # rolling: one extra at a time
            if not self.booting:
                self.spawn_worker()
            return
        missing = self.target - len(live) - len(self.booting)
        for _ in range(missing):
            self.spawn_worker()
        if missing < 0:
            live.sort(key=lambda w: w.current is not None)  # idle ones first
            for w in live[:-missing]:
                if d.retire(w.routing_id, "scale"):
                    self.tell_exit(w)

    def spawn_worker(self) -> None:
        used = {w.number for w in self.local_workers() if not w.retiring}
        used |= {b.number for b in self.booting.values()}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        self.spawn_seq += 1
        self.booting[self.spawn_seq] = Booting(number, self.generation)
        self.fork_server.spawn(number, self.generation, self.spawn_seq)

    def kill_worker(self, pid: int, sig: int, why: str) -> None:
        """Signal a worker through the fork server, remembering why for its exit's log line
        (a worker we SIGKILLed for a timeout was not out of memory)."""
        self.kill_reasons[pid] = why
        owner = next((fs for fs in self.fork_servers() if pid in fs.children), self.fork_server)
        owner.kill(pid, sig)

    def kill_slot(self, worker: WorkerSlot, sig: int, why: str) -> None:
        """Signal a worker of the pool, wherever it lives."""
        if worker.agent is not None:
            self.gateway.kill(worker, sig)
        else:
            self.kill_worker(worker.pid, sig, why)

    def tell_exit(self, worker: WorkerSlot) -> None:
        """Ask an idle worker to exit cleanly (it has nothing in hand)."""
        if worker.routing_id in self.exit_sent:
            return
        self.exit_sent.add(worker.routing_id)
        if worker.agent is not None:
            self.gateway.tell(worker, Kind.EXIT.value)
            return
        try:
            self.router.send_multipart([worker.routing_id, Kind.EXIT.value], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.kill_worker(worker.pid, signal.SIGTERM, "it could not be told to exit")

    def tick(self) -> None:
        """Every 10 ms while requests are queued: shed what waited too long. Every 0.1 s:
        shed requests whose client's deadline cannot be met, fail what ran past its timeout
        and kill its worker; every 0.5 s, end connections idle past ``idle_timeout``; and
        read the ROUTER, as a backstop. An idle daemon wakes ten times a second. How late
        each wake-up comes is the hub's lag (``gaspar_hub_lag_seconds``)."""
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
                log.exception("Error in the supervisor's tick; carrying on")

    def _tick(self, rounds: int) -> None:
        self.read_router()
        if self.gateway is not None:
            self.gateway.tick()
        idle = self.settings.idle_timeout
        if idle and rounds % 5 == 0:
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_idle(now, idle)
        expired = self.dispatcher.expire()
        for req in expired:
            worker = req.worker
            log.error("WORKER TIMEOUT (worker %s, pid:%s) after %ss", worker.label, worker.pid, req.timeout)
            msg = f"handler ran past {req.timeout}s; worker {worker.label} (pid {worker.pid}) killed"
            self._fail(req, Status.TIMEOUT, "WorkerTimeout", msg, timeout=req.timeout, pid=worker.pid)
            self.kill_slot(worker, signal.SIGKILL, f"its handler ran past {req.timeout}s")
        if expired:
            self._send(self.dispatcher.dispatch())
            self.manage_workers()

    # -- control ---------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("Handling signal: %s", name[3:].lower())
        handler = {
            signal.SIGTERM: lambda: self.begin_stop(True),
            signal.SIGINT: lambda: self.begin_stop(False),
            signal.SIGQUIT: lambda: self.begin_stop(False),
            signal.SIGHUP: self.do_reload,
            signal.SIGTTIN: lambda: self.do_scale(self.target + 1),
            signal.SIGTTOU: lambda: self.do_scale(self.target - 1),
        }.get(signum)
        if handler is not None:
            handler()

    def do_reload(self) -> None:
        if self.stopping:
            return
        if self.next_fork_server is not None:
            log.warning("A reload is already under way; ignoring this one")
            return
        log.info("Reloading %s", self.fork_server.consumer_name())
        if self.settings.on_reload is not None:
            self.settings.on_reload(self)
        self.reloading = "importing"  # READY=1 again once on_reloaded and the workers settle it
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={sdnotify.monotonic_usec()}\nSTATUS=Reloading")
        try:
            fresh = self.fork_server.successor()
        except ValueError as exc:  # re-import the handler's module in the running fork server
            if self.fork_server.spec:
                log.warning("Cannot start a fresh fork server (%s); re-importing the handler's module only", exc)
            self.fork_server.reload()
            return
        try:
            fresh.start()
        except OSError as exc:
            self.on_reloaded(False, f"cannot start a fork server: {exc}")
            return
        self.next_fork_server = fresh
        self.watch_fork_server(fresh)

    def on_reloaded(self, ok: bool, error: str | None, fs: ForkServer | None = None) -> None:
        """The fork server ``fs`` imported the new code (``ok``) or could not. A fresh one
        that did becomes the current one, and the old one retires."""
        if fs is not None and fs is self.next_fork_server:
            self.next_fork_server = None
            if ok:
                self.fork_server, fs = fs, self.fork_server
                fs.retire()
            self.old_fork_servers.append(fs)  # it exits once its workers are gone (none if refused)
        self.reloading = "replacing"
        if not ok:
            log.error("Reload failed; keeping the current workers: %s", error)
            self.notify_if_reloaded("Reload failed; ")
            return
        self.generation += 1
        log.info("Reloaded; replacing the workers one by one (generation %s)", self.generation)
        self.manage_workers()

    def do_scale(self, n: int) -> None:
        self.target = max(0 if self.gateway is not None else 1, int(n))
        log.info("Scaling to %s workers", self.target)
        self.manage_workers()

    def do_broadcast(self, message: bytes) -> int:
        sent = 0
        for w in list(self.dispatcher.workers.values()):
            if w.retiring:
                continue
            if w.agent is not None:
                sent += self.gateway.tell(w, Kind.BROADCAST.value + pack_id(0), message)
                continue
            try:
                self.router.send_multipart([w.routing_id, Kind.BROADCAST.value + pack_id(0), message], zmq.NOBLOCK)
                sent += 1
            except zmq.ZMQError as exc:
                log.warning("Broadcast to worker %s (pid:%s) failed: %s", w.number, w.pid, exc)
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
        overdue = {w.routing_id for w in self.dispatcher.workers.values() if w.current is not None}
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
        for w in self.local_workers():
            if graceful and not self.hurry and w.routing_id not in overdue:
                self.tell_exit(w)
            else:  # a fast stop, or a handler still running past graceful_timeout
                self.kill_worker(w.pid, signal.SIGKILL, "the daemon is stopping")
        for boot in self.booting.values():
            if boot.pid is not None:
                self.kill_worker(boot.pid, signal.SIGKILL, "the daemon is stopping")
        if self.dispatcher.workers or any(b.pid for b in self.booting.values()):
            self._workers_gone.wait(5.0 if graceful else 2.0)
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
