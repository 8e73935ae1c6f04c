"""The supervisor's upkeep of its pool, from the front end's main loop: the pool's size
follows its queue (``--workers MIN:MAX``), and workers past their memory limit are
recycled. Each reads the pool book (:mod:`gaspar.core.pool`) and asks the
:class:`~gaspar.frontend.supervisor.Supervisor` to act (:meth:`manage`, :meth:`tell_exit`).
"""

from __future__ import annotations

import logging
from typing import Any

from gaspar.core.pools import lane
from gaspar.ops.procstat import resident_bytes

log = logging.getLogger("gaspar")


def autoscale(sup: Any) -> None:
    """Pools of ``MIN:MAX`` workers: one step at a time toward what their queue delay
    asks (every tick of the main loop; ``gaspar.core.autoscale``)."""
    if not sup.autoscalers or sup.stopping:
        return
    for pool, a in sup.autoscalers.items():
        size = sup.book.size(pool)
        new = a.follow(size, lane(sup.dispatcher, pool), sup.book.may_fork())
        if new != size:
            why = "for its queue delay" if new > size else "its workers idle"
            log.info("Pool %s: %s -> %s workers (%s, MIN:MAX %s:%s)", pool, size, new, why, a.low, a.high)
            sup.book.resize(pool, new)
            sup.manage()


def scaling(sup: Any) -> dict[str, dict[str, int]]:
    """Each self-sizing pool's size now and its range, for stats."""
    return {p: {"size": sup.book.size(p), "min": a.low, "max": a.high} for p, a in sup.autoscalers.items()}


def check_memory(sup: Any) -> None:
    """Recycle workers past their memory limit: each is replaced at once and leaves
    after its request (every second, from the main loop)."""
    if not (sup.book.max_memory or sup.book.memory) or sup.stopping:
        return
    for w, used, limit in sup.book.over_memory(sup.local_workers(), resident_bytes):
        facts = (w.label, w.pid, round(used / 2**20), round(limit / 2**20))
        log.info("Worker %s (pid:%s) holds %s MiB, past %s MiB: replaced; it leaves after its request", *facts)
        if sup.dispatcher.retire(w.routing_id, "memory"):
            sup.tell_exit(w)
    sup.manage()
