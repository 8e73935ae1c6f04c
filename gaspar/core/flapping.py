"""Flapping: workers that die before they are ready, again and again, as a pure rule.

gaffer's flapping detection: ``attempts`` boot failures within ``window`` seconds are an
episode, after which the pool waits before forking again; after ``max_retry`` episodes the
daemon gives up (exit 3), unless the failing pool has served (:class:`FlapPolicy`). The pool
book (``gaspar.core.pool``) applies it; its clock is the caller's.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class FlapPolicy:
    """gaffer's flapping detection, as a pure rule.

    ``attempts`` boot failures within ``window`` seconds are a flapping episode: wait
    ``retry_in`` seconds before forking again. After ``max_retry`` episodes, give up. A
    worker that boots resets the count. With the defaults (5, 10 s, 1 s, 3) a hopeless
    start costs at most 5 x 4 = 20 forks.

    Giving up stops the daemon: right for a start that cannot work, not for a pool that has
    ``served`` (its replacements cannot boot: a model file went away), which would take the
    other pools down with it; past ``max_retry`` it waits twice as long each time, up to MAX_WAIT.
    """

    RESPAWN, BACKOFF, GIVE_UP = "respawn", "backoff", "give up"
    MAX_WAIT = 60.0  # seconds between two episodes of a pool that has served, at most

    def __init__(self, attempts: int = 5, window: float = 10.0, retry_in: float = 1.0, max_retry: int = 3) -> None:
        self.attempts, self.window, self.retry_in, self.max_retry = attempts, window, retry_in, max_retry
        self.failures: deque[float] = deque()
        self.episodes = 0

    @classmethod
    def of(cls, settings: Any) -> FlapPolicy:
        """The policy a daemon's or an agent's ``flap_*`` settings ask for."""
        return cls(settings.flap_attempts, settings.flap_window, settings.flap_retry_in, settings.flap_max_retry)

    def boot_failed(self, now: float, served: bool = False) -> tuple[str, float]:
        """Record a worker that died before it was ready (of a pool that has ``served``, or
        not yet); say what to do next."""
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window:
            self.failures.popleft()
        if len(self.failures) < self.attempts:
            return self.RESPAWN, 0.0
        self.failures.clear()
        self.episodes += 1
        if self.episodes > self.max_retry:
            if served:
                return self.BACKOFF, min(self.MAX_WAIT, max(self.retry_in, 0.5) * 2 ** (self.episodes - self.max_retry))
            return self.GIVE_UP, 0.0
        return self.BACKOFF, self.retry_in

    def gave_up(self) -> str:
        """The log's line when giving up."""
        times = f"{self.attempts} times within {self.window}s, {self.max_retry + 1} times over"
        return f"Workers failed to boot {times}; giving up"

    def booted(self) -> None:
        """A worker became ready: the start is not hopeless."""
        self.failures.clear()
        self.episodes = 0


__all__ = ["FlapPolicy"]
