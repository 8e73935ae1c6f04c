"""The client's retry rule, with no I/O: a request shed under overload never started, so a
retry is safe; a client retries at most once, and only while its retries stay under ~10% of
its requests (:class:`RetryBudget`, the gRPC/Finagle retry budget), after the server's
``retry_after`` with jitter (:func:`backoff`): retries cannot multiply an overload.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class RetryBudget:
    """At most one retry per shed request, and retries at most ``ratio`` of the requests.

    Each request deposits ``ratio`` of a token (up to ``cap``); a retry spends one. A client
    starts with one token, so its first refusal can be retried.
    """

    def __init__(self, ratio: float = 0.1, cap: float = 10.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = 1.0

    def on_request(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_retry(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def backoff(retry_after: float | None, left: float | None, rng: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before the one retry of a shed request: the server's ``retry_after``
    (at least 5 ms, at most 1 s) with full jitter, ``None`` if the client's time ``left``
    would not cover the wait plus that much again for the request itself."""
    base = min(1.0, max(0.005, retry_after or 0.0))
    delay = base * (0.5 + rng())  # jitter: 0.5x to 1.5x, so retries do not arrive together
    if left is not None and left < delay + base:
        return None
    return delay


__all__ = ["RetryBudget", "backoff"]
