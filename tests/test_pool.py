"""The pool book without I/O: every rule the front end's and the agent's pools share, as
rows. Each race or fault either copy was once fixed for has its row here."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import pytest

from gaspar.core.pool import BOOT_ERROR_CHARS, FlapPolicy, PoolBook, describe_exit, flapping


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class W:
    """A ready worker as a shell records it."""

    pid: int
    number: int
    generation: int = 1
    retiring: bool = False
    busy: bool = False
    pool: str = "default"


def booted(book: PoolBook, ready: list[W], pid0: int = 1000) -> list[W]:
    """Run one plan: its forks are spawned and say HELLO; its retirements are applied."""
    plan = book.plan(ready)
    for w in plan.retire:
        w.retiring = True
    for boot in plan.spawn:
        pid = pid0 + boot.token
        book.spawned(boot.token, pid)
        got = book.hello(boot.token, pid)
        assert got is boot
        ready.append(W(pid, boot.number, boot.generation, pool=boot.pool))
    return ready


def exit_status(code: int) -> int:
    return code << 8


KILLED = signal.SIGKILL  # a wait status: killed by SIGKILL


# -- numbering and scale --------------------------------------------------------------------


def test_a_pool_starts_with_its_target_numbered_from_one():
    book = PoolBook(3)
    plan = book.plan([])
    assert [(b.number, b.generation) for b in plan.spawn] == [(1, 1), (2, 1), (3, 1)]
    assert book.plan([]).spawn == []  # booting ones count: nothing forked twice


@pytest.mark.parametrize(
    "ready, booting, target, spawn_numbers, retire_pids",
    [
        # a replacement takes the lowest free number
        ([W(1, 1), W(3, 3)], 0, 3, [2], []),
        # a retiring worker's number is free for its replacement
        ([W(1, 1, retiring=True), W(2, 2), W(3, 3)], 0, 3, [1], []),
        # scale down: the extra go, idle ones first
        ([W(1, 1, busy=True), W(2, 2), W(3, 3, busy=True), W(4, 4)], 0, 2, [], [2, 4]),
        # scale down with one booting: it counts
        ([W(1, 1), W(2, 2)], 1, 2, [], [1]),
        # scale up
        ([W(1, 1)], 0, 3, [2, 3], []),
    ],
)
def test_numbers_and_scale(ready, booting, target, spawn_numbers, retire_pids):
    book = PoolBook(target)
    used = {w.number for w in ready if not w.retiring}
    for _ in range(booting):
        book._fork([w for w in ready if not w.retiring] + [W(0, n) for n in used])
    plan = book.plan(ready)
    assert [b.number for b in plan.spawn] == spawn_numbers
    assert sorted(w.pid for w in plan.retire) == retire_pids


# -- rolling reload -------------------------------------------------------------------------


def test_a_rolling_reload_forks_one_new_worker_before_each_old_one_goes():
    book = PoolBook(3)
    ready = booted(book, [])
    assert len(ready) == 3
    book.reloaded()
    ready[1].busy = True
    seen = []
    for _ in range(10):
        live = [w for w in ready if not w.retiring]
        assert len(live) >= 3  # capacity never drops
        plan = book.plan(ready)
        assert len(plan.spawn) <= 1 and len(book.booting) <= 1
        seen.append(([b.number for b in plan.spawn], [w.pid for w in plan.retire]))
        for w in plan.retire:
            w.retiring = True
        for boot in plan.spawn:
            book.spawned(boot.token, 2000 + boot.token)
            book.hello(boot.token, 2000 + boot.token)
            ready.append(W(2000 + boot.token, boot.number, boot.generation))
        ready = [w for w in ready if not (w.retiring and not w.busy)]  # idle retirees exit
        if all(w.generation == 2 for w in ready if not w.retiring) and not book.booting:
            break
    live = [w for w in ready if not w.retiring]
    assert len(live) == 3 and {w.generation for w in live} == {2}
    assert seen[0] == ([4], [])  # the first new worker comes before any old one goes
    retired = [pid for _, pids in seen for pid in pids]
    assert sorted(retired) == [1001, 1002, 1003] and retired[-1] == 1002  # the busy one last


def test_a_reload_that_failed_keeps_the_generation():
    book = PoolBook(2)
    ready = booted(book, [])
    assert book.plan(ready).spawn == [] and book.generation == 1


# -- HELLO, spawned, exits ------------------------------------------------------------------


def test_a_hello_that_outruns_spawned_still_finds_its_fork():
    """The race fixed in f25c182 (the agent's copy only): on a busy host a worker's HELLO can
    come before the fork server's "spawned" event."""
    book = PoolBook(1)
    [boot] = book.plan([]).spawn
    assert book.hello(boot.token, 4242) is boot  # HELLO first
    assert book.spawned(boot.token, 4242) == ""  # then spawned: nothing more happens
    assert book.booting == {} and book.plan([W(4242, 1)]).spawn == []
    # and its later exit is a ready worker's, not a boot failure
    out = book.exited(4242, exit_status(1))
    assert not out.boot_failure and out.booting is None


def test_a_hello_from_an_unknown_fork_or_while_stopping_is_not_taken():
    book = PoolBook(2)
    a, b = book.plan([]).spawn
    assert book.hello(999, 1) is None  # no such fork (counted dead already)
    book.spawned(a.token, 11)
    assert book.stop() == [11]  # booting pids, to kill
    assert book.hello(b.token, 12) is None
    assert book.spawned(a.token, 11) == "the daemon is stopping"  # forked as the stop began: kill it


def test_dying_before_hello_is_a_boot_failure_and_a_ready_exit_is_not():
    book = PoolBook(1)
    [boot] = book.plan([]).spawn
    book.spawned(boot.token, 7)
    out = book.exited(7, exit_status(4))
    assert out.boot_failure and out.booting is boot and out.flap == FlapPolicy.RESPAWN
    assert out.exitcode == 4 and out.text == "exited with code 4"
    assert [b.number for b in book.plan([]).spawn] == [1]  # forked again at once
    stranger = book.exited(8, exit_status(0))  # not ours: described, nothing else
    assert not stranger.boot_failure and stranger.booting is None


def test_an_exit_we_caused_says_why():
    book = PoolBook(1)
    book.killing(55, "it ran past the timeout (the timeout setting)")
    out = book.exited(55, KILLED)
    assert out.signal == signal.SIGKILL and "because it ran past the timeout" in out.text
    assert "out of memory" in book.exited(56, KILLED).text  # once only: the reason is spent
    assert describe_exit(exit_status(3), "ignored for a clean exit") == (3, None, "exited with code 3")


# -- flapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failures, spacing, verdicts",
    [
        (4, 0.1, ["respawn"] * 4),
        (5, 0.1, ["respawn"] * 4 + ["backoff"]),
        (5, 3.0, ["respawn"] * 5),  # spread over more than the window: not flapping
        (20, 0.01, (["respawn"] * 4 + ["backoff"]) * 3 + ["respawn"] * 4 + ["give up"]),
    ],
)
def test_flapping(failures, spacing, verdicts):
    clock = Clock()
    book = PoolBook(1, FlapPolicy(5, 10.0, 1.0, 3), clock)
    got = []
    for i in range(failures):
        plan = book.plan([])
        if not plan.spawn:  # backing off
            clock.now = max(clock.now, book.backoff_until)
            plan = book.plan([])
        [boot] = plan.spawn
        book.spawned(boot.token, 100 + i)
        got.append(book.exited(100 + i, exit_status(1)).flap)
        clock.now += spacing if spacing < 3.0 else 3.0
    assert got == verdicts
    if verdicts[-1] == "give up":
        assert book.given_up and book.backoff_until == math.inf
        clock.now += 1e6
        assert book.plan([]).spawn == []  # never again
    if verdicts[-1] == "backoff":
        assert book.plan([]).spawn == [] and book.backoff_until == pytest.approx(clock.now - spacing + 1.0)


def test_a_ready_worker_resets_flapping():
    clock = Clock()
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 0), clock)
    [boot] = book.plan([]).spawn
    book.spawned(boot.token, 1)
    assert book.exited(1, exit_status(1)).flap == "respawn"
    [boot] = book.plan([]).spawn
    book.hello(boot.token, 2)  # one boots: the count starts over
    [boot] = book.plan([]).spawn  # (target 1, nothing ready passed: one more fork)
    book.spawned(boot.token, 3)
    assert book.exited(3, exit_status(1)).flap == "respawn"


# -- a reload whose workers cannot boot -----------------------------------------------------


def fail_boots(book: PoolBook, ready: list[W], n: int, pid0: int) -> list:
    """Fork what the book plans and have each die before its HELLO, ``n`` times."""
    outs = []
    for i in range(n):
        [boot] = book.plan(ready).spawn
        book.spawned(boot.token, pid0 + i)
        outs.append(book.exited(pid0 + i, exit_status(1)))
    return outs


def test_a_booting_workers_error_is_in_its_exit_and_in_the_reload_given_up_for_it():
    """A worker whose setup raised says why before it exits (Kind.FAILED): the book puts it
    in the exit's text, and so in a reload's verdict, cut to BOOT_ERROR_CHARS. A token or pid
    of no fork here changes nothing."""
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 0), Clock())
    ready = booted(book, [])
    book.reloaded()
    texts = []
    for i, error in enumerate(["its setup raised OSError: no disk", "x" * 1000]):
        [boot] = book.plan(ready).spawn
        book.spawned(boot.token, 700 + i)
        book.boot_error(boot.token + 99, 700 + i, "not this fork's")  # unknown token
        book.boot_error(boot.token, 9999, "another process's")  # the token, not its pid
        book.boot_error(boot.token, 700 + i, error)
        out = book.exited(700 + i, exit_status(3))
        texts.append(out.text)
    assert texts[0] == "exited with code 3: its setup raised OSError: no disk"
    assert texts[1] == "exited with code 3: " + "x" * BOOT_ERROR_CHARS
    assert out.rollback.startswith("the new code's workers failed to boot 2 times, none was ready (the last exited")
    book.reloaded()
    [boot] = book.plan(ready).spawn  # a fork that says nothing, or nothing that parses
    book.spawned(boot.token, 800)
    for junk in (b"", b"[]", b"{}", b'{"token": "x", "pid": 800, "error": "e"}', b"\xff"):
        book.failed_message(junk)
    assert book.exited(800, exit_status(3)).text == "exited with code 3"


def test_a_reload_whose_workers_cannot_boot_goes_back_and_never_gives_up_the_daemon():
    """QA: a reload to code whose setup raised flapped, gave up and stopped a serving daemon
    (exit 3). Its new generation is given up instead: the old workers stay."""
    clock = Clock()
    book = PoolBook(2, FlapPolicy(5, 10.0, 1.0, 0), clock)  # max_retry 0: one episode gives up
    ready = booted(book, [])
    assert book.proven == 1  # its first start proved generation 1
    assert book.reloaded() == 2
    outs = fail_boots(book, ready, 5, 500)
    assert [o.boot_failure for o in outs] == [True] * 5
    assert [o.flap for o in outs] == [""] * 5 and not book.given_up  # no flapping verdict
    assert [bool(o.rollback) for o in outs] == [False] * 4 + [True]
    assert "failed to boot 5 times" in outs[-1].rollback and "exited with code 1" in outs[-1].rollback
    assert book.generation == 1  # back: the old workers are current again
    plan = book.plan(ready)
    assert plan.spawn == [] and plan.retire == []  # nothing replaced, nothing forked
    # the next reload starts afresh, and its code may boot
    assert book.reloaded() == 2
    assert len(fail_boots(book, ready, 4, 600)) == 4 and book.generation == 2
    [boot] = book.plan(ready).spawn
    book.spawned(boot.token, 700)
    assert book.hello(boot.token, 700).proves  # the first ready worker of the new code
    assert book.unproven_failures == 0 and book.proven == 2


def test_slow_boot_failures_of_a_reload_count_without_a_window():
    clock = Clock()
    book = PoolBook(1, FlapPolicy(3, 10.0, 1.0, 3), clock)
    ready = booted(book, [])
    book.reloaded()
    outs = []
    for i in range(3):  # a setup that fails after 20 s each time
        clock.now += 20.0
        outs += fail_boots(book, ready, 1, 800 + i)
    assert outs[-1].rollback and book.generation == 1


def test_a_given_up_reload_kills_its_workers_still_booting():
    """Each pool tries the new code one worker at a time: with three pools, three trials
    boot at once, and giving the generation up kills the others (or, not yet spawned, as
    they are)."""
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 3))
    book.sizes = {"p2": 1, "p3": 1}
    ready = booted(book, [])
    book.reloaded()
    a, b, c = sorted(book.plan(ready).spawn, key=lambda x: x.pool)  # default, p2, p3
    assert (a.generation, b.generation, c.generation) == (2, 2, 2)
    book.spawned(a.token, 901)
    book.spawned(b.token, 902)  # c is not spawned yet
    assert not book.exited(901, exit_status(1)).rollback
    [d] = book.plan(ready).spawn  # the default pool's next trial
    book.spawned(d.token, 903)
    out = book.exited(903, exit_status(1))
    assert out.rollback and out.abandoned == [902]  # to kill; c has no pid yet
    assert "because its reload was given up" in book.exited(902, KILLED).text
    assert book.spawned(c.token, 904) == "its reload was given up"  # killed when it comes
    assert not book.exited(904, KILLED).boot_failure
    assert book.booting == {} and book.generation == 1
    assert book.plan(ready).spawn == []  # the old workers are current again


def test_while_a_reload_is_unproven_a_worker_that_leaves_is_replaced_with_the_old_code():
    """QA: with --max-requests, both old workers were recycled into new-code workers that
    could not boot: no worker for 60 s. Until the new code is seen booting, what is missing
    is forked of the proven generation (the shell: from the old fork server)."""
    book = PoolBook(2)
    ready = booted(book, [])
    book.reloaded()
    [trial] = book.plan(ready).spawn  # one new worker at a time
    assert trial.generation == 2
    ready = ready[1:]  # one old worker left (recycled, died)
    [again] = book.plan(ready).spawn
    assert again.generation == 1 and again.number == 1  # its place, with the old code
    ready = []  # the other too
    assert [b.generation for b in book.plan(ready).spawn] == [1]
    book.hello(trial.token, 500)  # the new code boots: proven, no more old forks
    assert book.proven == 2 and book.plan([W(500, trial.number, 2)]).spawn == []


def test_the_first_start_still_flaps_and_gives_up():
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 0))
    outs = fail_boots(book, [], 2, 10)
    assert [o.flap for o in outs] == ["respawn", "give up"] and not outs[-1].rollback


def test_a_pool_that_has_served_backs_off_alone_and_never_gives_up_the_daemon():
    """QA: a pool whose replacements could not boot (its model file went away) flapped,
    gave up, and stopped a serving daemon, its healthy pools with it (exit 3). A pool that
    has had a ready worker now waits twice as long each episode past flap_max_retry, up to
    a minute, alone: the other pools fork on. One that never served still gives up."""
    clock = Clock()
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 1), clock)
    book.sizes = {"gpu": 1}
    ready = booted(book, [])
    assert book.served == {"default", "gpu"}
    gpu = next(w for w in ready if w.pool == "gpu")
    ready.remove(gpu)  # it died; its replacements cannot boot
    book.exited(gpu.pid, exit_status(1))
    waits = [0.0]
    for i in range(14):
        clock.now += waits[-1] + 0.01  # just past the last wait
        [boot] = book.plan(ready).spawn
        assert boot.pool == "gpu"
        book.spawned(boot.token, 500 + i)
        out = book.exited(500 + i, exit_status(3))
        assert out.boot_failure and out.served and out.flap != FlapPolicy.GIVE_UP
        waits.append(out.backoff if out.flap == FlapPolicy.BACKOFF else 0)
    assert not book.given_up
    assert waits[1:7] == [0, 1.0, 0, 2.0, 0, 4.0] and waits[-1] == FlapPolicy.MAX_WAIT  # doubling, capped
    assert "gpu are flapping (the last exited with code 3)" in flapping(out) and "does not give up" in flapping(out)
    assert "keep failing to boot (the last exited with code 3); the next fork in 60.0s" in book.why_none()
    # while gpu waits, the default pool forks a replacement for its worker at once
    default = next(w for w in ready if w.pool == "default")
    ready.remove(default)
    book.exited(default.pid, exit_status(1))
    assert [b.pool for b in book.plan(ready).spawn] == ["default"]
    # a pool that never served gives the daemon up, as at a start
    book = PoolBook(1, FlapPolicy(2, 10.0, 1.0, 0), clock)
    book.sizes = {"new": 1}
    ready = []
    for i, boot in enumerate(book.plan(ready).spawn):
        book.spawned(boot.token, 900 + i)
        if boot.pool == "default":
            book.hello(boot.token, 900 + i)
    outs = [book.exited(901, exit_status(3))]
    [boot] = book.plan([W(900, 1)]).spawn
    book.spawned(boot.token, 902)
    outs.append(book.exited(902, exit_status(3)))
    assert [o.flap for o in outs] == ["respawn", "give up"] and book.given_up


def test_stopping_forks_nothing_and_a_booting_death_is_no_failure():
    book = PoolBook(2)
    a, _ = book.plan([]).spawn
    book.spawned(a.token, 9)
    book.stop()
    assert book.plan([]).spawn == [] and book.plan([W(1, 1, busy=True)]).retire == []
    assert not book.exited(9, KILLED).boot_failure


# -- pools (an App's handlers with pools of their own) ------------------------------------


def test_each_pool_is_brought_to_its_own_size_and_numbers_are_shared():
    book = PoolBook(2)
    book.sizes = {"embed": 1}
    ready = booted(book, [])
    assert sorted((w.pool, w.number) for w in ready) == [("default", 1), ("default", 2), ("embed", 3)]
    assert book.total == 3
    ready[2].retiring = True  # the embed worker goes (max_requests): only embed is refilled
    ready = booted(book, [w for w in ready if not w.retiring])
    assert sorted((w.pool, w.number) for w in ready) == [("default", 1), ("default", 2), ("embed", 3)]
    book.target = 1  # scale acts on the default pool only
    plan = book.plan(ready)
    assert [w.pool for w in plan.retire] == ["default"] and not plan.spawn


def test_a_pool_that_is_gone_is_retired_and_a_reload_rolls_every_pool():
    book = PoolBook(1)
    ready = [W(1001, 1, pool="default"), W(1002, 2, pool="old")]
    plan = book.plan(ready)
    assert [w.pid for w in plan.retire] == [1002] and not plan.spawn
    book.sizes = {"embed": 1}
    ready = booted(book, [ready[0]])
    book.reloaded()
    plan = book.plan(ready)
    assert sorted(b.pool for b in plan.spawn) == ["default", "embed"]  # one new worker per pool
    assert not plan.retire  # before any old one goes


def test_workers_past_their_memory_limit_are_named_with_their_pool_limit():
    book = PoolBook(2)
    book.max_memory, book.memory = 100, {"embed": 1000}
    ready = [W(1, 1), W(2, 2, pool="embed"), W(3, 3, retiring=True), W(4, 4)]
    rss = {1: 150, 2: 500, 3: 900, 4: None}
    assert [(w.pid, used, limit) for w, used, limit in book.over_memory(ready, rss.get)] == [(1, 150, 100)]
    book.max_memory = 0
    assert book.over_memory(ready, rss.get) == []  # only embed has a limit, and it is under it
