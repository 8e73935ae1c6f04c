"""Agents' pools of ``MIN:MAX`` workers, sized from the front end, which holds their queue.

An agent started with ``--pool NAME=MIN:MAX`` (or ``--workers MIN:MAX``) runs MIN workers of
that pool and says so in its JOIN (``ranges``, and the ``sizes`` it runs now). The rule is the
local pools' (:mod:`gaspar.core.autoscale`): while the pool's calls wait, or its overload
control sheds them, one worker more; after idle time, one fewer; one step at a time. Each
session's pool has an :class:`~gaspar.core.autoscale.Autoscaler` of its own here; a decision
goes to the agent as SIZE ``{pool, size}``, and the agent forks or retires within the range it
announced (it never takes a size outside it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from gaspar.core.agents import JOINED, Agent
from gaspar.core.autoscale import Autoscaler
from gaspar.core.pools import DEFAULT_POOL, lane
from gaspar.wire.envelope import Link

log = logging.getLogger("gaspar")


class RemoteScaling:
    """The autoscalers of agents' pools; ``tell(agent, Link.SIZE, **body)`` sends a size."""

    def __init__(self, settings: Any, dispatcher: Any, tell: Callable[..., bool]) -> None:
        self.settings, self.dispatcher, self.tell = settings, dispatcher, tell
        self.scalers: dict[tuple[int, str], Autoscaler] = {}

    def tick(self, agents: Iterable[Agent]) -> None:
        """Every turn of the main loop: at most one step for each live agent's pool."""
        d = self.dispatcher
        seen = set()
        for agent in agents:
            if agent.state != JOINED:
                continue
            for pool, (low, high) in agent.ranges.items():
                if pool not in (d.by_pool if d.routes else (DEFAULT_POOL,)):
                    continue  # not a pool of this front end's App: nothing of its queue to go by
                key = (agent.session, pool)
                seen.add(key)
                scaler = self.scalers.get(key)
                if scaler is None:
                    scaler = self.scalers[key] = Autoscaler.of(low, high, self.settings)
                size = agent.sizes[pool]
                new = scaler.follow(size, lane(d, pool))
                if new != size and self.tell(agent, Link.SIZE, pool=pool, size=new):
                    agent.sizes[pool] = new
                    log.info(
                        "Agent %s, pool %s: %s -> %s workers (%s, MIN:MAX %s:%s)",
                        agent.name,
                        pool,
                        size,
                        new,
                        "for its queue delay" if new > size else "its workers idle",
                        low,
                        high,
                    )
        for key in set(self.scalers) - seen:  # sessions that ended
            del self.scalers[key]


__all__ = ["RemoteScaling"]
