"""The front end's state as one dict: what ``gaspar stats``, ``/metrics``, statsd and
``gaspar top`` read (docs/monitoring.rst documents each field).

Counters are the dispatcher's, the connections' and the telemetry's; the workers' states
the supervisor's; the agents' the gateway's. Per-process CPU and memory are read now, so a
snapshot costs a few ``/proc`` reads: the metrics server renders at most once a second.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gaspar.frontend import upkeep
from gaspar.ops.procstat import CpuWaits, cpu_wait, proc_usage
from gaspar.ops.telemetry import WORKER_STATES
from gaspar.version import __version__

#: The front end's own wait for a CPU, over all its threads: one per process (a figure of the
#: process, whichever Producer in it asks).
_FRONT_WAITS = CpuWaits()


def local_workers(supervisor: Any, telemetry: Any, now: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each of this host's workers as ``gaspar stats`` shows it (CPU and memory read now),
    and how many are in each state."""
    workers = []
    for w in sorted(supervisor.local_workers() if supervisor is not None else (), key=lambda w: w.number):
        state = "retiring" if w.retiring else "busy" if w.current is not None else "idle"
        usage, wait = proc_usage(w.pid), cpu_wait(w.pid)
        workers.append(
            {
                "pid": w.pid,
                "number": w.number,
                "pool": w.pool,
                "generation": w.generation,
                "state": state,
                "handled": w.handled,
                "busy": w.current is not None,
                "retiring": w.retiring,
                "prefetched": len(w.ahead),
                "age_seconds": round(now - w.started, 3),
                "cpu_seconds": round(usage[0], 3) if usage else None,
                "rss_bytes": usage[1] if usage else None,
                "cpu_wait_seconds": _r(wait) if usage else None,
                **telemetry.worker(w.number).snapshot(),
            }
        )
    states = dict.fromkeys(WORKER_STATES, 0)
    for w in workers:
        states[w["state"]] += 1
    states["booting"] = len(supervisor.booting) if supervisor is not None else 0
    return workers, states


def snapshot(front: Any) -> dict[str, Any]:
    """``front``: the Producer, started or not."""
    d, supervisor, gateway, budget = front.dispatcher, front.supervisor, front.gateway, front.budget
    now, wall = time.monotonic(), time.time()
    workers, states = local_workers(supervisor, front.telemetry, now)
    usage, wait = proc_usage(os.getpid()), _FRONT_WAITS.read(os.getpid())
    backlog = front.acceptor.backlog() if front.acceptor is not None else None
    return {
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(wall - front.started_at, 3) if front.started_at else 0.0,
        "time": round(wall, 3),
        "target_workers": front.target,
        "workers": workers,
        "worker_states": states,
        "booting": states["booting"],
        "queued": d.queued,
        "held": d.held,
        "running": d.running,
        "prefetched": d.prefetched,
        "pending": len(d.pending),
        "connections": len(front.connections),
        "restarts": (supervisor.restarts if supervisor is not None else 0) + (gateway.restarts if gateway else 0),
        "pools": d.snapshot() if d.routes else {},
        "autoscale": upkeep.scaling(supervisor) if supervisor is not None else {},
        "agents": gateway.agents.snapshot() if gateway is not None else [],
        "remote": gateway.snapshot() if gateway is not None else None,
        "front_end": _front_end(usage, wait),
        **front.telemetry.snapshot(),
        "counters": {**vars(d.counters), **vars(front.counters)},
        "overload": {
            "standing": d.control.standing,
            "overloaded": d.control.overloaded,
            "handler_ms": round(d.control.service * 1000, 3),
            "buffered_bytes": budget.used,
            "buffered_peak": budget.peak,
            "waiting_for_memory": budget.waiting,
            "committed_bytes": budget.committed,
            "unsent_reply_bytes": budget.replies,
            "replies_hold_memory": budget.over,
            "stalled": front.stalled(now),
            "accept_backlog": backlog[0] if backlog else 0,
            "accept_backlog_limit": backlog[1] if backlog else None,
        },
    }


def _front_end(usage: tuple[float, int, float] | None, wait: float | None) -> dict[str, Any] | None:
    """The front end's own CPU, memory and wait for a CPU (all its threads)."""
    if usage is None:
        return None
    return {"cpu_seconds": round(usage[0], 3), "rss_bytes": usage[1], "cpu_wait_seconds": _r(wait)}


def _r(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
