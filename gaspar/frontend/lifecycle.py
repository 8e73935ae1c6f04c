"""The front end's life: its phases, the loop that runs each turn, its signals and its stop.

::

    STARTING ──(every local worker ready)──▶ SERVING ──(stop)──▶ DRAINING ──▶ STOPPING ──▶ STOPPED
                                                        graceful: accepted requests finish

The hot path (requests in, replies out) runs in the I/O loop and the router's rounds. What
runs on a clock is here, in one place, in the manner of gunicorn's arbiter: :func:`run_ticker`
is the main loop, and :func:`turn` is what it does every 0.1 s.

``front`` is the Producer (``gaspar.frontend.producer``); these functions use its
dispatcher, router, outcomes, supervisor, gateway and connections, and change only its phase.
"""

from __future__ import annotations

import enum
import logging
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice; see README
    import eventlet

from gaspar.errors import ServerUnavailable, WorkerDied
from gaspar.frontend import upkeep
from gaspar.frontend.sweep import stalled_streams, sweep
from gaspar.ops import sdnotify
from gaspar.ops.humanize import human_mib
from gaspar.ops.logs import log_held_back
from gaspar.ops.procstat import give_back_memory

log = logging.getLogger("gaspar")

#: Memory freed (bytes of requests and replies) after which an idle front end gives the
#: allocator's free pages back to the system.
TRIM_EVERY = 64 << 20


class Phase(enum.IntEnum):
    """Where the front end is in its life; each phase includes the ones before it, so
    ``phase >= Phase.DRAINING`` reads "a stop has begun"."""

    STARTING = 0  # opening ports, forking the first workers
    SERVING = 1
    DRAINING = 2  # no longer accepting; in a graceful stop, accepted requests finish
    STOPPING = 3  # failing what is left, stopping the workers
    STOPPED = 4


def run_ticker(front: Any) -> None:
    """The main loop. Every 10 ms while requests are queued: shed what waited too long.
    Every 0.1 s (:func:`turn`): shed requests whose client's deadline cannot be met, fail
    what ran past its timeout and kill its worker, ping the agents and lose the silent ones;
    every 0.5 s, end connections idle past ``idle_timeout``; and read the ROUTER, as a
    backstop. An idle daemon wakes ten times a second. How late each wake-up comes is the
    hub's lag (``gaspar_hub_lag_seconds``)."""
    rounds, next_slow, gated = 0, time.monotonic() + 0.1, False
    lag, dispatcher, router = front.telemetry.hub_lag, front.dispatcher, front.router
    while True:
        nap = 0.01 if dispatcher.queued else max(0.0, next_slow - time.monotonic())
        due = time.monotonic() + nap
        eventlet.sleep(nap)
        lag.observe(max(0.0, time.monotonic() - due))  # how late the hub woke us
        try:
            slow = time.monotonic() >= next_slow
            if gated or front.budget.over:  # before the sweep, which would shed that wait
                gated = replies_gate(front, gated)
            dispatcher.sweep(deadlines=slow)
            router.settle()
            if slow:
                rounds += 1
                next_slow = time.monotonic() + 0.1
                turn(front, rounds)
        except Exception:  # the ticker must outlive any one bad round
            log.exception("Error in the front end's tick; carrying on")


def replies_gate(front: Any, gated: bool) -> bool:
    """While unsent replies hold the byte budget (``ByteBudget.over``) no request starts
    (the dispatcher's rule); say so when it begins, and dispatch once they went (read by
    their clients, or dropped with the connections that did not read them)."""
    budget = front.budget
    if budget.over and not gated:
        log.warning(
            "Unsent replies hold %s of max_buffered_bytes (%s): no request starts until clients read "
            "them or are reset for not reading",
            human_mib(budget.replies),
            human_mib(budget.limit),
        )
    elif gated and not budget.over:
        log.info("Unsent replies down to %s: requests start again", human_mib(budget.replies))
        front.router.send(front.dispatcher.dispatch(waited_for_memory=True))
    return budget.over


def turn(front: Any, rounds: int) -> None:
    """What the main loop does every 0.1 s (``rounds``: how many turns so far)."""
    front.router.round()
    if front.gateway is not None:
        front.gateway.tick()
        front.gateway.scaling.tick(front.gateway.agents.live())  # agents' pools of MIN:MAX workers
    now = time.monotonic()
    upkeep.autoscale(front.supervisor)  # pools of MIN:MAX workers
    if rounds % 10 == 0:  # workers past their memory limit, every second
        upkeep.check_memory(front.supervisor)
        front.supervisor.check_import()  # a reload's import that hangs
    if rounds % 100 == 0 and front.budget.trim_due(TRIM_EVERY):  # every 10 s, after a burst
        give_back_memory()
    if rounds % 5 == 0:  # slow request bodies and idle connections, every 0.5 s
        sweep(list(front.connections), now, front.settings, front.budget)
    d = front.dispatcher
    front.stall.sample(now, front.budget.freed, d.counters.started + d.counters.completed)
    front.outcomes.report(now)
    log_held_back(front.supervisor.churn, "worker boot, ready and exit lines", logging.INFO)
    stalled_streams(front, now)  # before expire, which would kill their workers
    answered, killed = d.expire()
    front.outcomes.expired(answered, killed, front.owner)
    if killed:
        front.router.send(d.dispatch())
        front.manage_workers()


def signal_actions(front: Any) -> dict[int, Callable[[], Any]]:
    """One small action per signal, as gunicorn's arbiter."""
    return {
        signal.SIGTERM: lambda: begin_stop(front, True),
        signal.SIGINT: lambda: begin_stop(front, False),
        signal.SIGQUIT: lambda: begin_stop(front, False),
        signal.SIGHUP: front.do_reload,
        signal.SIGTTIN: lambda: front.do_scale(min(front.supervisor.book.target + 1, front.settings.max_workers)),
        signal.SIGTTOU: lambda: front.do_scale(front.supervisor.book.target - 1),
    }


def busy(front: Any) -> bool:
    """Accepted work remains: a request queued or running, one being read, or a new
    connection's first request, not read yet (its client is in: it must be served).
    A persistent connection waiting for more is not busy."""
    return bool(front.dispatcher.pending) or any(c.busy or c.awaiting_first for c in front.connections)


def begin_stop(front: Any, graceful: bool) -> None:
    """Stop accepting; a graceful stop lets accepted requests finish (up to
    ``graceful_timeout``); then fail what is left, stop the workers, and end the hub.
    A fast stop during a graceful one hurries it. Every wait is bounded."""
    if front.phase >= Phase.DRAINING:
        if not graceful:
            front.hurry = True  # a fast stop during a graceful one: finish now
        return
    front.phase = Phase.DRAINING
    how = "graceful" if graceful else "fast"
    log.info("Stopping (%s)", how)
    sdnotify.notify(f"STOPPING=1\nSTATUS=Stopping ({how})")
    if graceful:  # take the connections the kernel accepted for us: their clients are in
        front.acceptor.accept_all()
    front.acceptor.close()
    if graceful:
        deadline = time.monotonic() + front.settings.graceful_timeout
        while not front.hurry and time.monotonic() < deadline and busy(front):
            eventlet.sleep(0.02)
    front.phase = Phase.STOPPING
    d = front.dispatcher
    running = {w.routing_id for w in d.workers.values() if w.current is not None}
    ran = "the server stopped while its handler ran (it may have run; its worker is stopped)"
    for req in d.fail_all():  # ServerUnavailable says "never ran": only for those that did not start
        if req.started and req.worker is not None:
            front.outcomes.fail(req, WorkerDied, ran, pid=req.worker.pid, exitcode=None, signal=None)
        else:
            front.outcomes.fail(req, ServerUnavailable, "the server stopped before the request started")
    if front.gateway is not None:
        front.gateway.stop()  # every agent's session ends; their workers leave the pool
    for conn in list(front.connections):
        # A connection that owes its client nothing is closed; one that owes a reply, an
        # error or (a plain request's error) a reset keeps its write side until it is paid.
        if not conn.busy:
            conn.close()
        elif conn.partial:
            conn.abort()
    front.supervisor.stop(graceful and not front.hurry, running)
    if front.supervisor.waiting_for():
        front.supervisor.gone.wait(5.0 if graceful else 2.0)
    deadline = time.monotonic() + 1.0
    while front.connections and time.monotonic() < deadline:
        eventlet.sleep(0.01)  # let connections write their last replies
    front.phase = Phase.STOPPED
    front.done.send()
