"""The front end's book of remote agents, with no I/O: who joined, who is alive, who is lost.

An **agent** (``gaspar worker ... --connect``, :mod:`gaspar.process.agent`) runs a pool of workers
on another host and joins the front end over one 0MQ connection. :class:`Agents` decides,
from the messages and an injected clock, what the front end's gateway then does with its
socket:

* ``join``: a JOIN is accepted as a new **session**, or refused with a reason. Refused: a
  name that is not the one its CURVE key was issued for, and a name that a live agent
  holds (two hosts given the same name must not share its identity). The same agent
  process joining again (a new session after it lost the front end) replaces its old
  session, which is lost at once: what ran there is reported lost.
* ``heard``: any message from an agent renews it; the front end pings every agent each
  ``heartbeat`` seconds, and the agent answers at once, so a live agent is heard at
  least that often, and the ping's round trip is measured. The answer (``pong``) also
  carries the CPU seconds and resident memory of the agent and its workers, read on its
  host: what ``gaspar stats``, ``gaspar top`` and ``/metrics`` show for them.
* ``overdue``: agents silent for longer than ``liveness``: a crash without a FIN, a
  partition, a frozen (SIGSTOPped) host. 0MQ's own ZMTP heartbeats tear the TCP
  connection down; this layer also sees an agent whose process is stuck, and says which.
* ``end``: a session is over (lost, left, or replaced). Ended sessions are kept, a few, so
  ``gaspar stats`` can show what happened; a message from one is *stale*: counted, and
  dropped by the caller, never delivered.

The workers of an agent are :class:`gaspar.core.records.WorkerSlot` s like local ones, with
``agent`` set: the dispatcher never looks at where a worker lives.

**Bounds on an authenticated agent.** A key lets an agent in; it does not make it honest.
Every control message is parsed here (:func:`parse_control`, :func:`parse_hello`), capped
in size before it is decoded (:data:`MAX_CONTROL`, :data:`MAX_HELLO`) and checked field by
field; a PONG's usage is read for the agent's own pids only, at most one entry more than
it has workers. An agent has at most as many worker slots as its JOIN announced (plus one,
for the replacement a reload forks before an old worker leaves), and never more than
``max_agent_workers`` (:meth:`Agents.may_add_worker`). What breaks a rule is refused,
counted and logged (rate-limited); the agent's other messages go on.
"""

from __future__ import annotations

import errno
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The states of a session; only "joined" and "leaving" are live.
JOINED, LEAVING, LOST, LEFT, REPLACED = "joined", "leaving", "lost", "left", "replaced"
LIVE = (JOINED, LEAVING)
MAX_NAME = 64
MAX_POOLS = 16  # pools of MIN:MAX workers one agent may announce
#: The largest control message (JOIN, PONG, EXITED...) decoded, in bytes: a PONG for 1,024
#: workers is about 40 KiB. Larger ones are refused unread.
MAX_CONTROL = 256 * 1024
#: The largest worker HELLO relayed by an agent (a worker's is about 80 bytes).
MAX_HELLO = 4096


class Refused(ValueError):
    """A message from an agent that breaks a rule: ``kind`` says which, for the counters
    (``oversize``, ``malformed``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_control(message: bytes) -> tuple[bytes, dict[str, Any]]:
    """A control message's kind and JSON object, or :class:`Refused`."""
    if len(message) > MAX_CONTROL:
        raise Refused("oversize", f"a control message of {len(message)} bytes (at most {MAX_CONTROL})")
    try:
        body = json.loads(message[1:] or b"{}")
    except ValueError as exc:
        raise Refused("malformed", f"a control message that is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refused("malformed", f"a control message carries a JSON object, not {type(body).__name__}")
    return message[:1], body


def parse_hello(payload: bytes) -> tuple[int, int, int, str]:
    """A relayed worker HELLO's ``(pid, number, generation, pool)``, or :class:`Refused`."""
    if len(payload) > MAX_HELLO:
        raise Refused("oversize", f"a worker HELLO of {len(payload)} bytes (at most {MAX_HELLO})")
    try:
        hello = json.loads(payload)
    except ValueError as exc:
        raise Refused("malformed", f"a worker HELLO that is not JSON: {exc}") from None
    if not isinstance(hello, dict):
        raise Refused("malformed", "a worker HELLO carries a JSON object")
    values = [hello.get(k) for k in ("pid", "number", "generation")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in values):
        raise Refused("malformed", "a worker HELLO needs a pid, a number and a generation (positive integers)")
    pool = hello.get("pool", "default")
    if not isinstance(pool, str) or not 0 < len(pool) <= 255:
        raise Refused("malformed", "a worker HELLO's pool is a name of 1 to 255 characters")
    return values[0], values[1], values[2], pool


def count(value: Any, low: int, high: int) -> int | None:
    """``value`` if it is an integer within [low, high], else None."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def parse_ranges(value: Any, most: int) -> dict[str, tuple[int, int]] | None:
    """A JOIN's pools of ``MIN:MAX`` workers, ``{pool: [MIN, MAX]}``; None when malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_POOLS:
        return None
    ranges = {}
    for pool, pair in value.items():
        if not isinstance(pool, str) or not 0 < len(pool) <= MAX_NAME or not isinstance(pair, list) or len(pair) != 2:
            return None
        low, high = count(pair[0], 0, most), count(pair[1], 1, most)
        if low is None or high is None or low > high:
            return None
        ranges[pool] = (low, high)
    return ranges


def seconds(value: Any) -> float | None:
    """``value`` if it is a finite number (a ping's timestamp), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def reconnect_delay(
    attempt: int, base: float = 0.25, cap: float = 5.0, rng: Callable[[], float] = random.random
) -> float:
    """Seconds an agent waits before its ``attempt``-th join in a row (1 for the first after
    a loss): doubling from ``base`` up to ``cap``, each drawn from its upper half ("equal
    jitter"), so agents that lost the front end together do not all come back together,
    and a refused agent knocks at most once per ``cap / 2`` seconds."""
    step = min(cap, base * 2 ** max(0, attempt - 1))
    return step / 2 + step / 2 * rng()


@dataclass(eq=False)
class Agent:
    """One session of one agent, as the front end sees it."""

    rid: bytes  # its connection's routing id on the front end's remote socket
    name: str
    host: str
    instance: str  # random per agent process: the same process rejoining, or another one
    pid: int
    session: int
    joined_at: float
    last_heard: float
    user: str = ""  # the CURVE key's NAME, "" without CURVE
    state: str = JOINED
    rtt: float | None = None  # the last ping's round trip, seconds
    workers: dict[bytes, Any] = field(default_factory=dict)  # its worker's routing id -> WorkerSlot
    done: int = 0  # replies relayed
    lost: int = 0  # requests that were running there when it was lost
    ended_at: float | None = None
    why: str = ""  # why the session ended
    usage: dict[int, tuple[float, int]] = field(default_factory=dict)  # pid -> (cpu s, rss), its last pong
    waits: dict[int, float] = field(default_factory=dict)  # pid -> seconds waited for a CPU, its last pong
    announced: int = 1  # the workers its JOIN said it runs (at most)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # its pools of MIN:MAX workers
    sizes: dict[str, int] = field(default_factory=dict)  # their sizes now (the front end decides)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.current is not None)


class Agents:
    """Sessions by routing id; live names; the last ``keep`` ended sessions."""

    def __init__(
        self,
        liveness: float,
        clock: Callable[[], float] = time.monotonic,
        keep: int = 16,
        max_workers: int = 1024,
    ) -> None:
        self.liveness = liveness
        self.max_workers = max_workers  # worker slots per agent (max_agent_workers)
        self.clock = clock
        self.by_rid: dict[bytes, Agent] = {}  # live sessions
        self.ended: deque[Agent] = deque(maxlen=keep)
        self._session = 0
        self.refused = 0
        self.stale = 0  # messages from ended sessions, dropped
        self._told: dict[bytes, float] = {}  # rid -> when it was last told GONE (see note_stale)
        self.lost_total = 0

    def join(self, rid: bytes, hello: dict[str, Any], user: str = "") -> tuple[Agent | None, str, Agent | None]:
        """A JOIN from connection ``rid``. Returns ``(agent, "", replaced)`` when accepted
        (``replaced``: this process's previous session, to end as lost), or
        ``(None, reason, None)`` when refused."""
        name, instance = hello.get("name"), hello.get("instance")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not isinstance(instance, str):
            return self.refuse("a JOIN needs a name of 1 to 64 characters and an instance")
        if user and name != user:
            return self.refuse(f"name {name!r} is not the one this key was issued for ({user!r})")
        announced = count(hello.get("workers"), 1, self.max_workers)
        if announced is None:
            return self.refuse(f"a JOIN announces its workers, from 1 to {self.max_workers} (max_agent_workers)")
        ranges = parse_ranges(hello.get("ranges"), announced)
        if ranges is None:
            return self.refuse(f"a JOIN's ranges are {{pool: [MIN, MAX]}}, {MAX_POOLS} at most, within its workers")
        sizes = hello.get("sizes") if isinstance(hello.get("sizes"), dict) else {}
        replaced = self.by_rid.get(rid)
        holder = next((a for a in self.by_rid.values() if a.name == name), None)
        if holder is not None and holder is not replaced:
            if holder.instance != instance:
                where = f"{holder.host} (pid {holder.pid})"
                return self.refuse(f"name {name!r} is held by another live agent, on {where}")
            replaced = holder  # the same process, joining again from a new connection
        now = self.clock()
        self._session += 1
        agent = Agent(
            rid=rid,
            name=name,
            host=str(hello.get("host", "?"))[:255],
            instance=instance,
            pid=count(hello.get("pid"), 0, 2**31) or 0,
            session=self._session,
            joined_at=now,
            last_heard=now,
            user=user,
            announced=announced,
            ranges=ranges,
            sizes={p: count(sizes.get(p), low, high) or low for p, (low, high) in ranges.items()},  # else MIN
        )
        if replaced is not None:
            self.end(replaced, REPLACED, "the agent joined again as a new session")
        self.by_rid[rid] = agent
        return agent, "", replaced

    def refuse(self, reason: str) -> tuple[None, str, None]:
        """Count a refused JOIN (the checks above, or the caller's own)."""
        self.refused += 1
        return None, reason, None

    def may_add_worker(self, agent: Agent) -> bool:
        """Room for one more worker slot: fewer than its JOIN announced (plus one, a
        reload's replacement) not retiring, and fewer than ``max_workers`` in all."""
        if len(agent.workers) >= self.max_workers:
            return False
        return sum(1 for w in agent.workers.values() if not w.retiring) < agent.announced + 1

    def get(self, rid: bytes) -> Agent | None:
        return self.by_rid.get(rid)

    def note_stale(self, rid: bytes) -> bool:
        """Note a message from ``rid``: counted when it has no session (the caller drops it);
        True when the caller should tell it GONE: once a second per peer at most, so a peer
        flooding without a session costs a count, not an answer each (QA: 41,000 a second
        slowed every client a hundredfold). False for a live session. A verb: it counts."""
        if rid in self.by_rid:
            return False
        self.stale += 1
        now = self.clock()
        if now - self._told.get(rid, -1.0) < 1.0:
            return False
        if len(self._told) >= 1024:  # peers come and go: forget the old ones
            self._told.clear()
        self._told[rid] = now
        return True

    def heard(self, agent: Agent, now: float | None = None) -> None:
        agent.last_heard = self.clock() if now is None else now

    def pong(self, agent: Agent, sent: float, usage: Any = None, waits: Any = None) -> None:
        """An answer to a ping sent at ``sent``; ``usage`` maps pids (as text) to
        ``[cpu seconds, resident bytes]``, ``waits`` to seconds waited for a CPU: kept for
        the agent and its known workers only."""
        now = self.clock()
        agent.last_heard = now
        if 0 <= now - sent <= self.liveness:  # an answer to a ping of ours, not nonsense
            agent.rtt = now - sent
        figures = _own(agent, usage, _figures)
        if figures is not None:  # a pong replaces the figures; one without them leaves the last
            agent.usage = {pid: (float(f[0]), int(f[1])) for pid, f in figures.items()}
        seconds = _own(agent, waits, _number)
        if seconds is not None:
            agent.waits = {pid: float(w) for pid, w in seconds.items()}

    def overdue(self) -> list[Agent]:
        """Live sessions silent for longer than ``liveness``: to end as lost."""
        now = self.clock()
        return [a for a in self.by_rid.values() if now - a.last_heard > self.liveness]

    def end(self, agent: Agent, state: str, why: str) -> None:
        """The session is over. Its workers are the caller's to remove from the dispatcher."""
        if self.by_rid.get(agent.rid) is agent:
            del self.by_rid[agent.rid]
        agent.state, agent.why, agent.ended_at = state, why, self.clock()
        if state in (LOST, REPLACED):
            self.lost_total += 1
        self.ended.append(agent)

    def live(self) -> list[Agent]:
        return list(self.by_rid.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Each live session, then the ended ones kept, newest first: what ``gaspar stats``
        and ``gaspar top`` show."""
        now = self.clock()
        rows = []
        for a in [*self.by_rid.values(), *reversed(self.ended)]:
            workers = sorted(a.workers.values(), key=lambda w: w.number)
            rows.append(
                {
                    "name": a.name,
                    "host": a.host,
                    "pid": a.pid,
                    "session": a.session,
                    "state": a.state,
                    "why": a.why,
                    "user": a.user,
                    "joined_seconds_ago": round(now - a.joined_at, 3),
                    "last_heard_seconds_ago": round(now - a.last_heard, 3),
                    "rtt_ms": None if a.rtt is None else round(a.rtt * 1000, 3),
                    "slots": len(a.workers),
                    "busy": a.busy(),
                    "done": a.done,
                    "lost": a.lost,
                    "cpu_seconds": _cpu(a.usage.get(a.pid)),
                    "rss_bytes": _rss(a.usage.get(a.pid)),
                    "cpu_wait_seconds": a.waits.get(a.pid),
                    "autoscale": {p: {"size": a.sizes[p], "min": lo, "max": hi} for p, (lo, hi) in a.ranges.items()},
                    "workers": [
                        {
                            "pid": w.pid,
                            "number": w.number,
                            "state": "retiring" if w.retiring else "busy" if w.current is not None else "idle",
                            "handled": w.handled,
                            "prefetched": len(w.ahead),
                            "cpu_seconds": _cpu(a.usage.get(w.pid)),
                            "rss_bytes": _rss(a.usage.get(w.pid)),
                            "cpu_wait_seconds": a.waits.get(w.pid),
                        }
                        for w in workers
                    ],
                }
            )
        return rows


def _own(agent: Agent, values: Any, sane: Callable[[Any], bool]) -> dict[int, Any] | None:
    """The sane ones of a pong's ``values`` (pid as text -> value) for the agent's own pids;
    None if it is not a map. Looked up one by one: a field of any size costs at most one
    lookup per pid we know."""
    if not isinstance(values, dict):
        return None
    found = {}
    for pid in (agent.pid, *(w.pid for w in agent.workers.values())):
        value = values.get(str(pid))
        if value is not None and sane(value):
            found[pid] = value
    return found


def _figures(value: Any) -> bool:
    """``[cpu seconds, resident bytes]`` as an agent reports them, and sane."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value)


def _number(value: Any) -> bool:
    """A figure an agent reports, and sane: a number, not a bool, 0 or more, finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e15


def _cpu(figures: tuple[float, int] | None) -> float | None:
    return None if figures is None else round(figures[0], 3)


def _rss(figures: tuple[float, int] | None) -> int | None:
    return None if figures is None else figures[1]


def send_failed(code: int | None, exc: Any = "") -> str:
    """Why a send to an agent failed (``code``: its errno), in words an operator can act on."""
    if code == errno.EHOSTUNREACH:  # ROUTER_MANDATORY: no such peer any more
        return "its connection closed: the agent exited or was killed, or the network closed it"
    if code == errno.EAGAIN:
        return "it stopped reading: its high-water mark was reached"
    return f"a send to it failed: {exc}"
