"""The autoscaling rule (gaspar.core.autoscale), driven by a fake clock."""

from __future__ import annotations

import pytest

from gaspar.core.autoscale import Autoscaler, parse_range


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(
    scaler: Autoscaler, clock: Clock, size: int, seconds: float, delay: float, idle: int, may_fork=True, shedding=False
):
    """Tick every 0.1 s for ``seconds``; the sizes it went through."""
    sizes = [size]
    for _ in range(round(seconds * 10)):
        clock.now += 0.1
        size = scaler.decide(size, delay, idle, may_fork, shedding)
        if size != sizes[-1]:
            sizes.append(size)
    return sizes


@pytest.mark.parametrize(
    "value, expected",
    [(3, (3, 3)), ("1:4", (1, 4)), ((0, 2), (0, 2)), ("0:1", (0, 1))],
)
def test_ranges(value, expected):
    assert parse_range(value) == expected


@pytest.mark.parametrize("value", ["4:1", "a:b", "1:", True, 1.5, -1])
def test_bad_ranges(value):
    with pytest.raises(ValueError):
        parse_range(value)


def test_it_grows_one_at_a_time_while_requests_wait_and_never_past_max():
    clock = Clock()
    s = Autoscaler(1, 3, target=0.05, grow_after=0.5, idle_after=5, cooldown=1.0, clock=clock)
    assert run(s, clock, 1, 0.4, delay=0.2, idle=0) == [1]  # not for a blip
    assert run(s, clock, 1, 10, delay=0.2, idle=0) == [1, 2, 3]  # then one a step, up to max
    assert run(s, clock, 3, 1.0, delay=0.01, idle=0) == [3]  # waits under the target: no growth


def test_shedding_counts_as_waiting_however_short_the_delay():
    """Overload control sheds what waits past its target, so under a flood the delay can stay
    under the autoscaler's: the pool still grows, and does not shrink while it sheds."""
    clock = Clock()
    s = Autoscaler(1, 3, target=0.05, grow_after=0.5, idle_after=1, cooldown=1.0, clock=clock)
    assert run(s, clock, 1, 0.4, delay=0.01, idle=0, shedding=True) == [1]  # not for a blip
    assert run(s, clock, 1, 3, delay=0.01, idle=0, shedding=True) == [1, 2, 3]
    assert run(s, clock, 3, 5, delay=0.0, idle=1, shedding=True) == [3]  # idle workers, yet shedding


def test_it_shrinks_after_idle_time_down_to_min():
    clock = Clock()
    s = Autoscaler(1, 3, target=0.05, grow_after=0.5, idle_after=2, cooldown=1.0, clock=clock)
    assert run(s, clock, 3, 1.9, delay=0.0, idle=1) == [3]
    assert run(s, clock, 3, 10, delay=0.0, idle=1) == [3, 2, 1]
    assert run(s, clock, 1, 5, delay=0.0, idle=1) == [1]


def test_a_load_that_comes_and_goes_does_not_flap():
    """Load for 0.3 s in every 1 s: never long enough to grow, never idle long enough to shrink."""
    clock = Clock()
    s = Autoscaler(1, 4, target=0.05, grow_after=0.5, idle_after=2, cooldown=1.0, clock=clock)
    sizes = [2]
    for _ in range(20):
        sizes += run(s, clock, sizes[-1], 0.3, delay=0.2, idle=0)[1:]
        sizes += run(s, clock, sizes[-1], 0.7, delay=0.0, idle=0)[1:]
    assert sizes == [2]


def test_a_pool_that_may_not_fork_does_not_grow_and_sizes_come_back_into_range():
    clock = Clock()
    s = Autoscaler(2, 3, clock=clock)
    assert run(s, clock, 2, 5, delay=1.0, idle=0, may_fork=False) == [2]  # flapping: the policy wins
    assert run(s, clock, 5, 0.1, delay=0.0, idle=0) == [5, 3]
    assert run(s, clock, 1, 1.1, delay=0.0, idle=0) == [1, 2]
