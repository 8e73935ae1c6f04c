"""The hand-over of fork servers across a reload (gaspar.process.forks.ForkServers), shared by
the front end's Supervisor and the agent. Its processes are exercised by the reload tests
(test_ops, test_supervision, test_remote); here its rules, over stand-ins that record what
they were asked (a fork server's pipes and processes play no part in them)."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest

from gaspar.process.forks import ForkServers


class Stand:
    """What ForkServers asks of a fork server, recorded."""

    def __init__(self, name: str, spec: str | None = "app:handler", start_error: Exception | None = None) -> None:
        self.name, self.spec, self.pid = name, spec, hash(name) % 10_000
        self.children: dict[int, int] = {}  # pid -> number
        self.start_error = start_error
        self.settings = SimpleNamespace(timeout=30.0)
        self.asked: list[tuple] = []

    def successor(self) -> Stand:
        if not self.spec:
            raise ValueError("the consumer was given as a Python object")
        return Stand(self.name + "'", self.spec, self.start_error)

    def start(self) -> None:
        if self.start_error is not None:
            raise self.start_error
        self.asked.append(("start",))

    def kill(self, pid: int, sig: int, dump: bool = False) -> None:
        self.asked.append(("kill", pid, sig))

    def reload(self) -> None:
        self.asked.append(("reload",))

    def retire(self) -> None:
        self.asked.append(("retire",))

    def abandon(self) -> None:
        self.asked.append(("abandon",))

    def close(self) -> None:
        self.asked.append(("close",))

    def __repr__(self) -> str:
        return self.name


def test_a_reload_that_imports_hands_over_and_retires_the_old_one_once_the_new_code_boots():
    first = Stand("a")
    forks = ForkServers(first)
    fresh, error = forks.start_next()
    assert error is None and fresh is forks.next and ("start",) in fresh.asked
    assert forks.all() == [first, fresh]
    forks.settle(True, fresh)
    assert forks.current is fresh and forks.next is None and forks.standby is first
    assert ("retire",) not in first.asked  # not until a worker of the new code is ready
    forks.proven()
    assert forks.standby is None and forks.old == [first]
    assert ("retire",) in first.asked and ("retire",) not in fresh.asked
    assert forks.gone(first, Book()) == (None, [])  # its last worker gone, it exits
    assert forks.all() == [fresh] and ("close",) in first.asked


def test_a_reload_whose_workers_cannot_boot_goes_back_to_the_standby():
    first = Stand("a")
    forks = ForkServers(first)
    fresh, _ = forks.start_next()
    forks.settle(True, fresh)
    fresh.children[77] = 1  # a new worker still booting
    why = forks.rollback("they failed", [77])
    assert why == "they failed; back to the old code"
    assert forks.current is first and forks.standby is None and forks.old == [fresh]
    assert ("kill", 77, signal.SIGKILL) in fresh.asked  # through the fork server that forked it
    assert ("retire",) in fresh.asked and ("retire",) not in first.asked


def test_a_second_reload_before_the_first_boots_keeps_the_proven_standby():
    first = Stand("a")
    forks = ForkServers(first)
    second, _ = forks.start_next()
    forks.settle(True, second)
    third, _ = forks.start_next()
    forks.settle(True, third)
    assert forks.current is third and forks.standby is first and forks.old == [second]
    assert ("retire",) in second.asked
    forks.rollback("x", [])
    assert forks.current is first and forks.old == [second, third]


def test_a_reload_in_place_has_nothing_to_go_back_to():
    first = Stand("a", spec=None)
    forks = ForkServers(first)
    assert forks.start_next() == (None, None)
    assert "new ones run the reloaded module" in forks.rollback("x", [])
    assert forks.current is first


def test_a_reload_that_fails_to_import_keeps_the_current_one():
    first = Stand("a")
    forks = ForkServers(first)
    fresh, _ = forks.start_next()
    forks.settle(False, fresh)
    assert forks.current is first and forks.next is None and forks.old == [fresh]
    assert ("retire",) not in first.asked
    assert forks.gone(fresh, Book()) == (None, []) and forks.all() == [first]


def test_a_fresh_fork_server_that_dies_before_it_reports_is_a_failed_reload():
    first = Stand("a")
    forks = ForkServers(first)
    fresh, _ = forks.start_next()
    failed, _ = forks.gone(fresh, Book())
    assert failed is not None and "exited before it was ready" in failed and str(fresh.pid) in failed
    assert forks.next is None and forks.all() == [first] and ("close",) in fresh.asked
    forks.settle(False, fresh)  # the owner's on_reloaded(False, ...) that follows changes nothing
    assert forks.current is first and forks.old == []


def test_an_unnamed_consumer_is_reloaded_in_place():
    first = Stand("a", spec=None)
    forks = ForkServers(first)
    assert forks.start_next() == (None, None)
    assert ("reload",) in first.asked and forks.next is None
    forks.settle(True, first)  # its "reloaded" event comes from the current one: nothing to hand over
    assert forks.current is first and forks.old == [] and ("retire",) not in first.asked


def test_a_fork_server_that_cannot_start_is_an_error_and_nothing_changes():
    first = Stand("a", start_error=OSError("too many open files"))
    forks = ForkServers(first)
    fresh, error = forks.start_next()
    assert fresh is None and "cannot start a fork server: too many open files" in error
    assert forks.all() == [first]


@pytest.mark.parametrize("pid, owner", [(11, "old"), (22, "current"), (33, "current")])
def test_a_kill_goes_through_the_fork_server_that_forked_the_worker(pid, owner):
    first = Stand("a")
    forks = ForkServers(first)
    fresh, _ = forks.start_next()
    forks.settle(True, fresh)
    first.children, fresh.children = {11: 1}, {22: 2}
    forks.kill(pid, signal.SIGKILL)  # 33: nobody's (already reaped): the current one says so
    expected = first if owner == "old" else fresh
    assert expected.asked[-1] == ("kill", pid, signal.SIGKILL)


def test_a_second_reload_waits_for_the_first():
    """The owners refuse a reload while ``next`` is set; a failed one leaves it clear."""
    forks = ForkServers(Stand("a"))
    fresh, _ = forks.start_next()
    assert forks.next is fresh
    forks.settle(False, fresh)
    again, _ = forks.start_next()
    assert again is not None and forks.next is again


def test_a_fresh_fork_server_still_importing_past_its_bound_is_abandoned_once():
    """A hung import: past the bound (the ``timeout`` setting, at least 10 s) the next fork
    server is SIGKILLed and the owner is told why; settled as failed, nothing more is due,
    and a new reload may begin."""
    forks = ForkServers(Stand("first"))
    before = time.monotonic()
    fresh, _ = forks.start_next()
    assert forks.next_due - before >= 30.0
    assert forks.overdue(forks.next_due - 0.001) is None and ("abandon",) not in fresh.asked
    late = forks.overdue(forks.next_due)
    assert late is not None and late[0] is fresh and ("abandon",) in fresh.asked
    assert "had not imported app:handler after 30s" in late[1]
    forks.settle(False, fresh)  # the owner's on_reloaded(False, why, fresh)
    assert forks.next is None and forks.overdue(forks.next_due + 60) is None
    assert forks.start_next()[0] is not None  # the next reload is taken


def test_a_reload_in_place_is_never_overdue():
    forks = ForkServers(Stand("first", spec=None))
    assert forks.start_next() == (None, None)
    assert forks.overdue(time.monotonic() + 3600) is None


class Book:
    """What ForkServers.replace asks of the pool book: why each worker was killed."""

    def __init__(self) -> None:
        self.killed: dict[int, str] = {}

    def killing(self, pid: int, why: str) -> None:
        self.killed[pid] = why


def test_a_dead_current_fork_server_is_replaced_and_its_workers_reported_five_times_a_minute():
    forks = ForkServers(Stand("a"))
    book = Book()
    for i in range(5):
        dead = forks.current
        dead.children = {100 + i: 1, 200 + i: 2}
        fresh, workers = forks.replace(dead, book)
        assert fresh is forks.current and fresh is not dead and fresh.replacing
        assert ("start",) in fresh.asked and ("close",) in dead.asked
        assert workers == [(100 + i, 1), (200 + i, 2)]
        assert book.killed[100 + i] == f"its fork server (pid:{dead.pid}) died"
        assert forks.replaced(fresh, True) and not fresh.replacing
        assert not forks.replaced(fresh, True)  # a later "reloaded" is a reload's in place
    fresh, workers = forks.replace(forks.current, book)  # the sixth within a minute
    assert fresh is None and workers == []


def test_a_dead_fork_server_of_a_consumer_object_cannot_be_replaced():
    forks = ForkServers(Stand("a", spec=None))
    assert forks.replace(forks.current, Book()) == (None, [])
