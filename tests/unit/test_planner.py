"""Planner: exact degrees for every device count the product advertises (unit tier)."""

from __future__ import annotations

import pytest

from xdit_multigpu.config import ParallelStrategy
from xdit_multigpu.engine.planner import plan
from xdit_multigpu.errors import ConfigError, NotYetAvailableError
from xdit_multigpu.models.registry import Axis

pytestmark = pytest.mark.unit

SP = frozenset({Axis.CFG, Axis.ULYSSES, Axis.RING})
CFG_ONLY = frozenset({Axis.CFG})
H = ParallelStrategy.HYBRID


def degrees(p):
    return (p.cfg, p.ulysses, p.ring)


@pytest.mark.parametrize(
    ("world", "cfg_active", "heads", "expected"),
    [
        (1, True, 24, (1, 1, 1)),
        (2, True, 24, (2, 1, 1)),
        (2, False, 24, (1, 2, 1)),
        (3, True, 24, (1, 3, 1)),  # odd: no CFG split
        (3, True, 38, (1, 1, 3)),  # 3 does not divide 38 -> ring
        (4, True, 24, (2, 2, 1)),
        (4, False, 24, (1, 4, 1)),
        (6, True, 24, (2, 3, 1)),
        (6, False, 24, (1, 6, 1)),
        (6, False, 38, (1, 2, 3)),
        (8, True, 24, (2, 4, 1)),
        (8, False, 24, (1, 8, 1)),
        (8, True, 38, (2, 2, 2)),
        (8, False, 38, (1, 2, 4)),  # SD3.5-Large: ulysses 2, ring the rest
        (4, False, 38, (1, 2, 2)),
        (2, False, 38, (1, 2, 1)),
    ],
)
def test_hybrid_degrees(world, cfg_active, heads, expected):
    p = plan(H, world, cfg_active, heads, SP)
    assert degrees(p) == expected
    assert p.world_size == world
    assert p.reason


def test_hybrid_keeps_ulysses_inside_fast_link_group():
    # 8 GPUs over 2 nodes of 4: ulysses all-to-all inside a node, ring across nodes.
    p = plan(H, 8, False, 24, SP, fast_link_group=4)
    assert degrees(p) == (1, 4, 2)
    assert "fast-link group of 4" in p.reason
    # With CFG the SP group already fits in a node: nothing changes.
    assert degrees(plan(H, 8, True, 24, SP, fast_link_group=4)) == (2, 4, 1)
    # 38 heads: the head constraint is tighter than the link constraint.
    assert degrees(plan(H, 8, False, 38, SP, fast_link_group=4)) == (1, 2, 4)


def test_hybrid_cfg_only_model_leaves_devices_idle_and_says_so():
    p = plan(H, 4, True, 20, CFG_ONLY)
    assert degrees(p) == (2, 1, 1)
    assert p.world_size == 2
    assert "2 of 4 devices stay idle" in p.reason
    p1 = plan(H, 2, False, 20, CFG_ONLY)
    assert degrees(p1) == (1, 1, 1)
    assert "1 of 2 devices stay idle" in p1.reason


def test_hybrid_unknown_heads_falls_back_to_ring():
    assert degrees(plan(H, 4, False, 0, SP)) == (1, 1, 4)


def test_usp_never_splits_cfg():
    assert degrees(plan(ParallelStrategy.USP, 4, True, 24, SP)) == (1, 4, 1)
    assert degrees(plan(ParallelStrategy.USP, 8, True, 38, SP)) == (1, 2, 4)
    with pytest.raises(ConfigError, match="parallel_strategy: USP needs sequence parallelism"):
        plan(ParallelStrategy.USP, 2, True, 20, CFG_ONLY)


def test_cfg_strategy_needs_exactly_two_devices():
    assert degrees(plan(ParallelStrategy.CFG, 2, True, 24, SP)) == (2, 1, 1)
    with pytest.raises(ConfigError) as err:
        plan(ParallelStrategy.CFG, 4, True, 24, SP)
    assert err.value.field == "parallel_strategy"
    assert "exactly 2 devices" in str(err.value) and "lists 4" in str(err.value)
    assert "Hybrid or USP" in err.value.fix
    with pytest.raises(ConfigError, match="cfg is 1.0"):
        plan(ParallelStrategy.CFG, 2, False, 24, SP)


@pytest.mark.parametrize("strategy", [ParallelStrategy.PIPEFUSION, ParallelStrategy.TENSOR])
def test_unavailable_strategies(strategy):
    with pytest.raises(NotYetAvailableError, match="parallel_strategy"):
        plan(strategy, 2, True, 24, SP)


def test_accepts_strategy_strings_and_rejects_zero_devices():
    assert degrees(plan("USP", 2, False, 24, SP)) == (1, 2, 1)
    with pytest.raises(ConfigError, match="gpu_devices"):
        plan(H, 0, True, 24, SP)


def test_ulysses_only_model_needs_divisible_heads():
    uly_only = frozenset({Axis.ULYSSES})
    assert degrees(plan(ParallelStrategy.USP, 4, False, 24, uly_only)) == (1, 4, 1)
    with pytest.raises(ConfigError, match="does not divide the model's 38 heads"):
        plan(ParallelStrategy.USP, 4, False, 38, uly_only)


@pytest.mark.parametrize(
    ("strategy", "world", "cfg_active", "heads", "degree", "expected"),
    [
        (ParallelStrategy.USP, 8, False, 24, 4, (1, 4, 2)),  # Flux on 8: Ulysses 4 x Ring 2 instead of Ulysses 8
        (ParallelStrategy.USP, 8, False, 24, 1, (1, 1, 8)),  # pure ring
        (ParallelStrategy.USP, 8, False, 24, 8, (1, 8, 1)),
        (H, 8, True, 24, 2, (2, 2, 2)),  # CFG 2 first, then the 4-way split as asked
        (H, 8, True, 38, 2, (2, 2, 2)),
        (H, 4, False, 24, 2, (1, 2, 2)),
    ],
)
def test_ulysses_degree_sets_the_sequence_split(strategy, world, cfg_active, heads, degree, expected):
    p = plan(strategy, world, cfg_active, heads, SP, fast_link_group=4, ulysses=degree)  # the user's choice wins
    assert degrees(p) == expected
    assert "as set in ulysses_degree" in p.reason


@pytest.mark.parametrize(
    ("strategy", "world", "cfg_active", "heads", "axes", "degree", "problem", "fix"),
    [
        (ParallelStrategy.USP, 8, False, 24, SP, 3, "does not divide the 8-way sequence split", "[1, 2, 4, 8]"),
        (ParallelStrategy.USP, 4, False, 38, SP, 4, "does not divide the model's 38 attention heads", "[1, 2]"),
        (H, 4, True, 24, SP, 4, "does not divide the 2-way sequence split", "[1, 2]"),  # CFG took half
        (ParallelStrategy.USP, 4, False, 24, frozenset({Axis.ULYSSES}), 2, "no ring axis", "[4]"),
        (ParallelStrategy.USP, 4, False, 24, frozenset({Axis.RING}), 2, "needs a Ulysses axis", "[1]"),
        (ParallelStrategy.CFG, 2, True, 24, SP, 2, "CFG parallel splits no sequence", "Use 0"),
        (H, 2, True, 24, CFG_ONLY, 2, "splits by CFG only", "Use 0"),
        (H, 4, False, 24, SP, -1, "is -1", "Use 0"),
    ],
)
def test_impossible_ulysses_degree_names_the_field_and_the_valid_choices(
        strategy, world, cfg_active, heads, axes, degree, problem, fix):
    with pytest.raises(ConfigError) as e:
        plan(strategy, world, cfg_active, heads, axes, ulysses=degree)
    assert str(e.value).startswith("ulysses_degree:") and problem in str(e.value) and fix in str(e.value)
