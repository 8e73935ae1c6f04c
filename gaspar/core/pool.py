"""The pool book: the rules of one host's pool of worker processes, with no I/O.

The front end's :class:`~gaspar.frontend.supervisor.Supervisor` (green) and a remote host's
:class:`~gaspar.process.agent.Agent` (blocking) supervise the same kind of pool: workers forked by a
fork server, each saying HELLO once it is ready. Both are thin shells over this book, which
decides and remembers; the shells read sockets and pipes, and do what it says (fork, retire,
signal, log). As gunicorn's arbiter does, one pass (:meth:`PoolBook.plan`) brings the pool to
its target; loky's crash table is the model for what an exit means (:meth:`PoolBook.exited`).

What it keeps:

* **Booting workers**, by the token of the fork that asked for each: number and generation
  from the start, pid once the fork server says "spawned". A worker's HELLO names its
  token, so a HELLO that outruns "spawned" (a busy host) still finds its fork.
* **The generation** (each successful reload makes a new one), the **target**, and
  **flapping** (:class:`FlapPolicy`): back-off, then giving up.
* **Why we signalled** a process (:meth:`PoolBook.killing`), so its exit is not logged as a
  mystery ("killed by SIGKILL because it ran past the timeout", not "out of memory?").

Ready workers are not kept here: they are the shell's records (the dispatcher's
:class:`~gaspar.core.records.WorkerSlot`, the agent's ``LocalWorker``), passed in as
:class:`Ready` views, so a worker is described once.

The rules, each a row of ``tests/test_pool.py``:

* **Numbers** are the lowest free among ready workers not retiring and those booting (a
  replacement takes the number of the worker it replaces; logs read ``Worker 1``, ``2``...).
* **Rolling reload.** While a ready worker is of an older generation, one new worker is
  forked at a time, *before* an old one is retired: capacity never drops, and no request is
  lost (an old worker leaves once idle). Idle old workers go first.
* **Scale.** Fork what is missing; past the target, retire the extra, idle ones first.
* **Flapping.** A worker that dies before its HELLO is a boot failure: ``flap_attempts``
  within ``flap_window`` mean waiting ``flap_retry_in`` before forking again; after
  ``flap_max_retry`` such episodes, give up (the daemon exits 3), unless the pool has served:
  then wait twice as long each episode (at most a minute) and go on. A ready worker resets it.
* **A reload whose workers cannot boot.** A new generation is *proven* once one of its
  workers is ready. Until then, ``flap_attempts`` boot failures of its workers (no window:
  a slow ``setup`` fails slowly) give it up instead of counting as flapping: back to the
  proven one, whose workers serve on, and the shell fails the reload (:attr:`Exit.rollback`).
  Meanwhile a worker that leaves is replaced with the proven generation (from the old fork
  server), so the pool stays full while the new code is tried one worker at a time.
* **Stopping.** Nothing is forked; a worker forked as the stop began is to be killed.
* **Pools.** An App's handlers may have pools of their own (``gaspar.app``): each pool is
  brought to its own size by the rules above (a reload rolls each pool one worker at a
  time); numbers are shared, lowest free across the host. ``target`` is the default pool's
  size (``--workers``, scale); :attr:`PoolBook.sizes` the other pools'.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gaspar.core.flapping import FlapPolicy

HALT_FLAPPING = 3  # the exit code of a daemon or agent whose workers cannot boot
DEFAULT_POOL = "default"


def describe_exit(status: int, killed_because: str = "") -> tuple[int | None, int | None, str]:
    """``(exitcode, signal, text)`` for a wait status, in words an operator can act on;
    ``killed_because``: why we signalled it ourselves (then no "out of memory?" guess)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if killed_because:
            return None, sig, f"killed by {name} because {killed_because}"
        hint = " Perhaps out of memory?" if sig == signal.SIGKILL else ""
        return None, sig, f"killed by {name}.{hint}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return code, None, f"exited with code {code}"


class Ready(Protocol):
    """A ready worker as the book reads it: the shell's own record."""

    pid: int
    number: int
    generation: int
    pool: str

    @property
    def retiring(self) -> bool: ...

    @property
    def busy(self) -> bool: ...


#: A worker's boot error (``Kind.FAILED``) is kept to this many characters.
BOOT_ERROR_CHARS = 300


@dataclass
class Booting:
    """A fork asked of the fork server, until its worker says HELLO or dies."""

    token: int
    number: int
    generation: int
    pid: int | None = None  # once the fork server said "spawned" (or its HELLO came first)
    pool: str = DEFAULT_POOL
    proves: bool = False  # its HELLO was its generation's first: the reload's code boots
    error: str = ""  # why it cannot boot, as its worker said before it exited (Kind.FAILED)


@dataclass
class Plan:
    """What to do now: fork these, retire those (idle ones are told to exit by the shell)."""

    spawn: list[Booting] = field(default_factory=list)
    retire: list[Ready] = field(default_factory=list)


@dataclass
class Exit:
    """What a process's exit means (see :meth:`PoolBook.exited`)."""

    exitcode: int | None
    signal: int | None
    text: str  # "exited with code 1", "killed by SIGKILL because ..."
    why: str = ""  # why we signalled it, if we did
    booting: Booting | None = None  # it died before its HELLO: this was its fork
    boot_failure: bool = False  # ...and that counts towards flapping
    flap: str = ""  # then FlapPolicy's verdict: respawn, backoff or give up
    backoff: float = 0.0  # seconds before the next fork (backoff)
    served: bool = False  # its pool has had a ready worker: flapping backs off, never gives up
    rollback: str = ""  # a reload's new generation is given up: why (see PoolBook.rollback)
    abandoned: list[int] = field(default_factory=list)  # its booting workers' pids, to kill


def flapping(out: Exit) -> str:
    """The log's line for a flapping episode (``backoff``): whose, why, how long until the next fork."""
    pool = f" of pool {out.booting.pool}" if out.booting and out.booting.pool != DEFAULT_POOL else ""
    note = "; they have served, so gaspar does not give up" if out.served else ""
    return f"Workers{pool} are flapping (the last {out.text}); waiting {out.backoff:g}s before the next fork{note}"


class PoolBook:
    """The book of one host's pool; ``clock`` is injected (tests drive time)."""

    def __init__(
        self, target: int, flap: FlapPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.target = target  # the default pool's size
        self.sizes: dict[str, int] = {}  # other pools' sizes (an App's)
        self.max_memory = 0  # resident bytes past which a worker is recycled (0: never)
        self.memory: dict[str, int] = {}  # a pool's own limit, over max_memory
        self.flap = flap or FlapPolicy()
        self.clock = clock
        self.generation = 1
        self.proven = 0  # the last generation one of whose workers was ready (0: none yet)
        self.unproven_failures = 0  # boot failures of a newer generation than that
        self.served: set[str] = set()  # the pools that have had a ready worker (FlapPolicy)
        self._proving: set[str] = set()  # the pools where the current generation has booted
        self.last_failure = ""  # how the last worker that failed to boot ended
        self.pool_waits: dict[str, float] = {}  # a pool that has served and flaps: no fork of it before
        self.booting: dict[int, Booting] = {}  # token -> its fork
        self.backoff_until = 0.0  # no fork before this (math.inf: given up)
        self.stopping = False
        self._tokens = 0
        self._by_pid: dict[int, int] = {}  # a booting worker's pid -> its token
        self._killed: dict[int, str] = {}  # pid -> why we signalled it
        self._abandoned: set[int] = set()  # tokens of forks given up before they were spawned

    # -- events ---------------------------------------------------------------------------

    def spawned(self, token: int, pid: int) -> str:
        """The fork server forked ``token`` as ``pid``. Why it is to be killed at once, if it
        is (the stop began, or its reload was given up, after the fork was asked): else ""."""
        boot = self.booting.get(token)
        if boot is not None and boot.pid is None:
            boot.pid = pid
            self._by_pid[pid] = token
        if token in self._abandoned:
            self._abandoned.discard(token)
            self._killed[pid] = "its reload was given up"
            return self._killed[pid]
        return "the daemon is stopping" if self.stopping else ""

    def hello(self, token: int, pid: int) -> Booting | None:
        """A worker said it is ready: its fork (None if it is not to join: its fork is
        unknown, or the pool is stopping). It may come before "spawned"."""
        boot = self.booting.pop(token, None)
        self._by_pid.pop(pid, None)
        if boot is None or self.stopping:
            return None
        boot.pid = pid
        self.served.add(boot.pool)
        self.flap.booted()
        if boot.generation == self.generation and self.proven < self.generation:
            self._proving.add(boot.pool)  # proven once it boots in every pool that has workers here
            if self._proving >= self._pools_here():
                boot.proves = self.proven > 0  # a reload's code boots (the first start's: no news)
                self.proven, self.unproven_failures = self.generation, 0
        return boot

    def boot_error(self, token: int, pid: int, error: str) -> None:
        """A booting worker said why it cannot boot (then exits): its exit's text says it too,
        and so does a reload given up for it. A token or pid of no fork here is ignored."""
        boot = self.booting.get(token)
        if boot is not None and boot.pid in (None, pid):
            boot.error = str(error)[:BOOT_ERROR_CHARS]

    def failed_message(self, payload: bytes) -> None:
        """A worker's ``FAILED`` message (JSON: pid, token, error): :meth:`boot_error`. One
        that does not parse is ignored: the exit code still says that the boot failed."""
        try:
            said = json.loads(payload)
            self.boot_error(int(said["token"]), int(said["pid"]), said["error"])
        except (ValueError, KeyError, TypeError):
            pass

    def killing(self, pid: int, why: str) -> None:
        """We are signalling ``pid``, because ``why``: its exit is described so."""
        self._killed[pid] = why

    def exited(self, pid: int, status: int) -> Exit:
        """A process of this pool exited with wait ``status``. A booting one is a boot failure
        (unless stopping) and the verdict on flapping is applied: the next fork waits for
        :attr:`backoff_until` (forever once given up), or its pool's :attr:`pool_waits`."""
        why = self._killed.pop(pid, "")
        out = Exit(*describe_exit(status, why), why=why)
        token = self._by_pid.pop(pid, None)
        if token is None:
            return out
        out.booting = self.booting.pop(token, None)
        if out.booting is None or self.stopping:
            return out
        out.boot_failure = True
        if out.booting.error:
            out.text = f"{out.text}: {out.booting.error}"
        self.last_failure = out.text
        if out.booting.generation > self.proven > 0:  # a reload's code, never seen booting
            self.unproven_failures += 1
            if self.unproven_failures >= self.flap.attempts:
                out.rollback, out.abandoned = self.rollback(out.text)
            return out
        if self.given_up:  # nothing more to decide
            return out
        out.served = (pool := out.booting.pool) in self.served
        out.flap, out.backoff = self.flap.boot_failed(self.clock(), out.served)
        if out.flap == FlapPolicy.GIVE_UP:
            self.backoff_until = math.inf
        elif out.flap == FlapPolicy.BACKOFF and out.served:  # it waits alone: the other pools fork on
            self.pool_waits[pool] = self.clock() + out.backoff
        elif out.flap == FlapPolicy.BACKOFF:
            self.backoff_until = self.clock() + out.backoff
        return out

    def reloaded(self) -> int:
        """The new code imported: a new generation, to replace the workers one by one."""
        self.generation += 1
        self.unproven_failures, self._proving = 0, set()
        return self.generation

    def rollback(self, last: str) -> tuple[str, list[int]]:
        """Give up the generations newer than the proven one (their workers fail to boot;
        ``last``: how the last one died): back to the proven one, whose workers are then no
        longer old. Returns why, and the pids of their workers still booting, to kill (a
        fork not yet spawned is killed when it is, see :meth:`spawned`)."""
        failures, self.unproven_failures = self.unproven_failures, 0
        pids = []
        for token, boot in list(self.booting.items()):
            if boot.generation > self.proven:
                del self.booting[token]
                if boot.pid is None:
                    self._abandoned.add(token)
                else:
                    self._by_pid.pop(boot.pid, None)
                    self._killed[boot.pid] = "its reload was given up"
                    pids.append(boot.pid)
        self.generation, ready = self.proven, self._proving
        where = f" in pool {', '.join(sorted(self._pools_here() - ready))}" if ready else ""
        self._proving = set()
        return f"the new code's workers failed to boot {failures} times, none was ready{where} (the last {last})", pids

    def _pools_here(self) -> set[str]:
        return {p for p, n in ((DEFAULT_POOL, self.target), *self.sizes.items()) if n > 0}

    def stop(self) -> list[int]:
        """The pool stops: nothing more is forked. The pids of booting workers, to kill."""
        self.stopping = True
        return [b.pid for b in self.booting.values() if b.pid is not None]

    # -- the pass that brings the pool to its target --------------------------------------

    @property
    def given_up(self) -> bool:
        return self.backoff_until == math.inf

    def may_fork(self, pool: str = "") -> bool:
        now = self.clock()
        return not self.stopping and now >= self.backoff_until and now >= self.pool_waits.get(pool, 0.0)

    @property
    def total(self) -> int:
        """Workers of every pool, as sized now."""
        return self.target + sum(self.sizes.values())

    def size(self, pool: str) -> int:
        """How many workers ``pool`` should have on this host (the default pool: ``target``)."""
        return self.target if pool == DEFAULT_POOL else self.sizes[pool]

    def resize(self, pool: str, n: int) -> None:
        """Set ``pool``'s size; :meth:`plan` then forks or retires toward it."""
        if pool == DEFAULT_POOL:
            self.target = n
        else:
            self.sizes[pool] = n

    def plan(self, ready: Sequence[Ready]) -> Plan:
        """What to fork and what to retire now, given the ready workers (retiring ones
        included), pool by pool. Forks are recorded as booting; the shell asks the fork
        server for them."""
        plan = Plan()
        if self.stopping:
            return plan
        live = [w for w in ready if not w.retiring]
        sizes = {DEFAULT_POOL: self.target, **self.sizes}
        for pool in {w.pool for w in live} - set(sizes):  # a pool that is gone: none of it
            sizes[pool] = 0
        for pool, size in sizes.items():
            self._plan_pool(pool, size, [w for w in live if w.pool == pool], live, plan)
        return plan

    def _plan_pool(self, pool: str, size: int, live: list[Ready], every: list[Ready], plan: Plan) -> None:
        booting = [b for b in self.booting.values() if b.pool == pool]
        if 0 < self.proven < self.generation and self.may_fork(pool):  # a reload's code, not yet seen booting:
            tried = [b for b in booting if b.generation > self.proven]  # its trial may never boot
            for _ in range(size - len(live) - len(booting) + len(tried)):  # so the old code fills the pool
                booting.append(self._fork(every, pool, self.proven))
                plan.spawn.append(booting[-1])
        old = [w for w in live if w.generation != self.generation]  # newer: of a reload given up
        if old:  # rolling: one new worker at a time, and an old one out for each that is ready
            retire: list[Ready] = []
            if len(live) > size:
                old.sort(key=lambda w: w.busy)  # idle ones first
                retire = old[: len(live) - size]
                plan.retire += retire
            if len(old) > len(retire) and not booting and self.may_fork(pool):
                plan.spawn.append(self._fork([w for w in every if w not in plan.retire], pool))
            return
        missing = size - len(live) - len(booting)
        if missing > 0 and self.may_fork(pool):
            for _ in range(missing):
                plan.spawn.append(self._fork(every, pool))
        elif missing < 0:
            live.sort(key=lambda w: w.busy)
            plan.retire += live[:-missing]

    def _fork(self, live: Sequence[Any], pool: str = DEFAULT_POOL, generation: int = 0) -> Booting:
        used = {w.number for w in live} | {b.number for b in self.booting.values()}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        self._tokens += 1
        boot = Booting(self._tokens, number, generation or self.generation, pool=pool)
        self.booting[self._tokens] = boot
        return boot

    def over_memory(self, ready: Sequence[Ready], rss: Callable[[int], int | None]) -> list[tuple[Ready, int, int]]:
        """Ready workers past their pool's memory limit, with their resident bytes and the
        limit: to retire now, so each is replaced at once and leaves after its request
        (Celery's ``max_memory_per_child``, uWSGI's ``reload-on-rss``). ``rss(pid)`` reads one."""
        out = []
        for w in ready:
            limit = self.memory.get(w.pool, self.max_memory)
            if limit and not w.retiring:
                used = rss(w.pid)
                if used is not None and used > limit:
                    out.append((w, used, limit))
        return out

    def pids(self) -> list[int]:
        """The pids of booting workers known so far."""
        return [b.pid for b in self.booting.values() if b.pid is not None]

    def why_none(self) -> str:
        """Why the pool has no worker, for a client refused for it and the log."""
        if (wait := max([self.backoff_until, *self.pool_waits.values()]) - self.clock()) > 0:  # flapping
            return f"its workers keep failing to boot (the last {self.last_failure}); the next fork in {wait:.1f}s"
        if self.booting:
            return f"{len(self.booting)} worker(s) booting"
        if self.total == 0:
            return "this front end runs no worker itself (workers 0) and no agent's worker has joined"
        return "none is running; new ones are being forked"


__all__ = [
    "DEFAULT_POOL",
    "Booting",
    "Exit",
    "FlapPolicy",
    "HALT_FLAPPING",
    "Plan",
    "PoolBook",
    "Ready",
    "describe_exit",
]
