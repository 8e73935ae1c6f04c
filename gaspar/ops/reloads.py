"""What became of each reload: ``gaspar ctl reload`` waits for it, ``gaspar ctl status`` shows it.

A reload (SIGHUP, ``gaspar ctl reload``, ``Producer.reload()``) is *begun*, then *settles*
once:

* **failed**, with the reason: the application no longer imports (the error), the fresh
  fork server could not start, died before it said, or had not said within its import
  bound (then it is killed), or the daemon stopped first; the old workers stay;
* **ok** once every worker runs the new code (all of the new generation, as many as the
  target: at once when the front end runs none itself), which is also when systemd hears
  ``READY=1`` again.

A reload asked for while one is importing is not begun (the supervisor ignores it); its
asker is told about the one under way. One begun while the last is still replacing workers
settles that one as ok (its code imported; the next generation replaces it).

Pure: the caller passes the wall clock, and ``waiters`` are plain callables run when the
reload under way settles (the front end's green events).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Reload:
    """One reload: ``ok`` is None while it is under way."""

    seq: int
    consumer: str
    started: float
    finished: float | None = None
    ok: bool | None = None
    reason: str | None = None
    generation: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reloads:
    """The reload under way, if any, and the last one that settled."""

    seq: int = 0
    current: Reload | None = None
    last: Reload | None = None
    waiters: list[Callable[[], None]] = field(default_factory=list)

    def begin(self, consumer: str, now: float) -> Reload:
        if self.current is not None:
            self.settle(True, f"superseded by reload {self.seq + 1} before every worker was replaced", now)
        self.seq += 1
        self.current = Reload(self.seq, consumer, round(now, 3))
        return self.current

    def settle(self, ok: bool, reason: str | None, now: float, generation: int | None = None) -> None:
        """The reload under way ends (a no-op when none is)."""
        done, self.current = self.current, None
        if done is None:
            return
        done.ok, done.reason, done.finished, done.generation = ok, reason, round(now, 3), generation
        self.last = done
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()

    def snapshot(self) -> dict[str, Any]:
        """``{"under_way": ..., "last": ...}``, each a :class:`Reload` as a dict, or None."""
        return {
            "under_way": self.current.as_dict() if self.current else None,
            "last": self.last.as_dict() if self.last else None,
        }


def _clock(when: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "?"


def outcome_text(reload: dict[str, Any] | None, waited: float | None = None) -> tuple[bool, str]:
    """``gaspar ctl reload``'s verdict on a reload (a :class:`Reload` as a dict): (ok, words)."""
    if reload is None or reload.get("ok") is None:
        after = f" after {waited:g}s" if waited else ""
        return False, f"the reload is still under way{after} (gaspar ctl status shows how it ends)"
    took = f", {reload['finished'] - reload['started']:.1f}s" if reload.get("finished") else ""
    if not reload["ok"]:
        return False, f"reload failed, the old workers stay: {reload['reason']}"
    note = f"; {reload['reason']}" if reload.get("reason") else ""
    gen = reload["generation"]
    return True, f"reloaded {reload['consumer']}: every worker runs the new code (generation {gen}{took}){note}"


def status_line(snapshot: dict[str, Any] | None) -> str | None:
    """``gaspar ctl status``'s line about reloads, or None before the first one."""
    snapshot = snapshot or {}
    now, last = snapshot.get("under_way"), snapshot.get("last")
    if now:
        return f"reload under way since {_clock(now['started'])}"
    if not last:
        return None
    verdict = "ok" if last["ok"] else f"failed: {last['reason']}"
    return f"last reload {_clock(last['started'])}: {verdict}"
