"""Scheduling policies: exact expectations (pure; no Ray, no torch)."""

import pytest

from xdit_multigpu.config import SchedulingStrategy
from xdit_multigpu.engine.scheduling import (
    Adaptive,
    LeastLoaded,
    RoundRobin,
    WeightedRoundRobin,
    make_policy,
    proportional_split,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (8, [1, 1], [4, 4]),
        (8, [2, 1], [5, 3]),  # 5.33 / 2.67: the larger remainder (.67) gets the extra item
        (7, [1, 1], [4, 3]),  # tie on remainder: lower index
        (8, [1, 1, 1], [3, 3, 2]),
        (0, [3, 1], [0, 0]),
        (5, [1, 0], [5, 0]),
        (10, [0.5, 0.25, 0.25], [5, 3, 2]),
    ],
)
def test_proportional_split(total, weights, expected):
    assert proportional_split(total, weights) == expected
    assert sum(expected) == total


@pytest.mark.parametrize("weights", [[], [0, 0], [-1, 2]])
def test_proportional_split_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        proportional_split(4, weights)


def test_round_robin_cycles_regardless_of_load():
    p = RoundRobin(3)
    p.started(0, 5)
    assert [p.pick() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert p.split(8) == [3, 3, 2]


def test_least_loaded_follows_in_flight_work():
    p = LeastLoaded(3)
    assert p.pick() == 0
    p.started(0)
    assert p.pick() == 1
    p.started(1)
    p.started(2, 3)
    assert p.pick() == 0  # 1, 1, 3 in flight: lowest index among the least loaded
    p.finished(1, 1, 2.0)
    assert p.pick() == 1
    p.finished(2, 10, 1.0)  # never below zero
    assert p.in_flight == [1, 0, 0]


def test_weighted_round_robin_with_user_weights():
    p = WeightedRoundRobin(2, weights=[2, 1])
    assert [p.pick() for _ in range(6)] == [0, 1, 0, 0, 1, 0]  # nginx smooth WRR sequence for 2:1
    assert p.split(9) == [6, 3]
    with pytest.raises(ValueError):
        WeightedRoundRobin(2, weights=[1, 0])
    with pytest.raises(ValueError):
        WeightedRoundRobin(3, weights=[1, 1])


def test_weighted_round_robin_learns_weights_when_none_given():
    p = WeightedRoundRobin(2)
    assert p.split(8) == [4, 4]  # nothing measured yet: equal
    p.finished(0, 4, 1.0)  # 4 items/s
    p.finished(1, 4, 2.0)  # 2 items/s
    assert p.weights() == [4.0, 2.0]
    assert p.split(9) == [6, 3]


def test_adaptive_splits_by_learned_speed_and_reestimates():
    p = Adaptive(2, alpha=0.5)
    assert p.split(8) == [4, 4]
    p.finished(0, 4, 1.0)  # group 0: 4/s
    assert p.speed.known() == [4.0, 4.0]  # unmeasured group 1 takes the mean
    p.finished(1, 4, 2.0)  # group 1: 2/s
    assert p.split(8) == [5, 3]  # 5.33 / 2.67
    p.finished(1, 4, 0.5)  # group 1 sped up to 8/s; EWMA(0.5): 2 -> 5
    assert p.speed.known() == [4.0, 5.0]
    assert p.split(9) == [4, 5]


def test_adaptive_pick_prefers_the_group_that_finishes_first():
    p = Adaptive(2, alpha=1.0)
    p.finished(0, 1, 1.0)  # 1/s
    p.finished(1, 2, 1.0)  # 2/s
    assert p.pick() == 1  # (0+1)/1 = 1.0 vs (0+1)/2 = 0.5
    p.started(1, 2)  # group 1: (2+1)/2 = 1.5 > 1.0
    assert p.pick() == 0


def test_make_policy_maps_every_strategy():
    kinds = {s: type(make_policy(s, 2)) for s in SchedulingStrategy}
    assert kinds == {
        SchedulingStrategy.ROUND_ROBIN: RoundRobin,
        SchedulingStrategy.LEAST_LOADED: LeastLoaded,
        SchedulingStrategy.WEIGHTED_ROUND_ROBIN: WeightedRoundRobin,
        SchedulingStrategy.ADAPTIVE: Adaptive,
    }
    with pytest.raises(ValueError):
        RoundRobin(0)


def test_which_policies_cut_a_batch_up_front():
    from xdit_multigpu.engine.scheduling import Adaptive, LeastLoaded, RoundRobin, WeightedRoundRobin

    assert RoundRobin(2).cuts_up_front() and WeightedRoundRobin(2, [2.0, 1.0]).cuts_up_front()
    assert not LeastLoaded(2).cuts_up_front()
    a = Adaptive(2)
    assert not a.cuts_up_front()
    a.finished(0, 1, 1.0)
    assert not a.cuts_up_front()  # group 1 not measured yet
    a.finished(1, 1, 2.0)
    assert a.cuts_up_front()
