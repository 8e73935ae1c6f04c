"""A pool that sizes itself: ``workers=MIN:MAX`` grows while requests wait, shrinks when idle.

The rule, pure and clock-injected (``tests/test_autoscale.py``), in the manner of uWSGI's
``cheaper`` and Celery's ``--autoscale``, driven by what the pool's users feel, the *queue
delay* (how long the oldest queued request has waited), rather than by CPU:

* **Grow** by one worker when requests have waited longer than ``target`` for ``grow_after``
  seconds running, up to ``high``, and only while the pool book may fork (a pool that is
  flapping, or has given up, does not grow: the flapping policy wins). A pool whose overload
  control is shedding counts as waiting: shedding keeps the delay short, so the delay alone
  would never say that the pool is too small; it grows before it sheds for long.
* **Shrink** by one worker when some workers have been idle, with nothing queued, for
  ``idle_after`` seconds running, down to ``low``.
* After any change, nothing for ``cooldown`` seconds, and each step needs its condition to
  hold for its whole period again: a load that comes and goes every few seconds moves the
  pool at most once per period, never back and forth at every tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def parse_range(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """``N``, ``"MIN:MAX"`` or ``(MIN, MAX)`` as ``(low, high)``; ``ValueError`` otherwise."""
    if isinstance(value, tuple):
        low, high = value
    elif isinstance(value, str) and ":" in value:
        a, _, b = value.partition(":")
        if not (a.isdigit() and b.isdigit()):
            raise ValueError(f"a pool's workers are N or MIN:MAX, not {value!r}")
        low, high = int(a), int(b)
    elif isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    else:
        raise ValueError(f"a pool's workers are N or MIN:MAX, not {value!r}")
    if not 0 <= low <= high:
        raise ValueError(f"a pool's workers MIN:MAX need 0 <= MIN <= MAX, not {low}:{high}")
    return low, high


class Autoscaler:
    """Decides a pool's size from its queue delay and its idle workers; see the module."""

    def __init__(
        self,
        low: int,
        high: int,
        target: float = 0.05,
        grow_after: float = 0.5,
        idle_after: float = 30.0,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.low, self.high = low, high
        self.target, self.grow_after, self.idle_after, self.cooldown = target, grow_after, idle_after, cooldown
        self.clock = clock
        self.waiting_since: float | None = None  # requests have waited past target since
        self.idle_since: float | None = None  # some worker idle, nothing queued, since
        self.changed = -float("inf")

    @classmethod
    def of(cls, low: int, high: int, settings: Any) -> Autoscaler:
        """One with the daemon's ``scale_up_wait``, ``scale_up_after`` and ``scale_down_idle``."""
        return cls(low, high, settings.scale_up_wait, settings.scale_up_after, settings.scale_down_idle)

    def follow(self, size: int, lane: Any, may_fork: bool = True) -> int:
        """:meth:`decide` from the pool's dispatcher (``lane``): its queue delay, its idle
        workers, and whether its overload control sheds."""
        return self.decide(size, lane.queue_delay(self.clock()), lane.idle_count, may_fork, lane.control.overloaded)

    def decide(self, size: int, delay: float, idle: int, may_fork: bool = True, shedding: bool = False) -> int:
        """The pool's size now: ``size`` as it is, ``delay`` the oldest queued request's
        wait (0: nothing queued), ``idle`` its idle workers, ``may_fork`` the pool book's,
        ``shedding`` its overload control's (it stands, and sheds)."""
        now = self.clock()
        if delay > self.target or shedding:
            self.waiting_since = now if self.waiting_since is None else self.waiting_since
        else:
            self.waiting_since = None
        if idle > 0 and delay == 0 and not shedding:
            self.idle_since = now if self.idle_since is None else self.idle_since
        else:
            self.idle_since = None
        if now - self.changed < self.cooldown:
            return size
        if size < self.low:
            return self._changed(now, self.low)
        if size > self.high:
            return self._changed(now, self.high)
        if self.waiting_since is not None and now - self.waiting_since >= self.grow_after:
            if size < self.high and may_fork:
                return self._changed(now, size + 1)
        elif self.idle_since is not None and now - self.idle_since >= self.idle_after and size > self.low:
            return self._changed(now, size - 1)
        return size

    def _changed(self, now: float, size: int) -> int:
        self.changed = now
        self.waiting_since = self.idle_since = None  # the next step needs its whole period again
        return size


__all__ = ["Autoscaler", "parse_range"]
