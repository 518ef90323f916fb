"""Pure pieces of ``xdit_multigpu.parallel``: cond assignment, uneven splits, shard bookkeeping, mask rows."""

from __future__ import annotations

import pytest
import torch

from xdit_multigpu.parallel.attention import slice_mask_rows
from xdit_multigpu.parallel.cfg import assign_conds, local_conds
from xdit_multigpu.parallel.comm import all_gather_uneven, split_sizes
from xdit_multigpu.parallel.groups import _blocks
from xdit_multigpu.config import ParallelPlan
from xdit_multigpu.parallel.sequence import SequenceState, Shard

pytestmark = pytest.mark.unit


def test_assign_conds_round_robin() -> None:
    assert assign_conds([0, 1], 2) == {0: 0, 1: 1}
    assert assign_conds([0, 2, 3], 2) == {0: 0, 2: 1, 3: 0}  # 3 conds (PerpNeg, DualCFG) round-robin
    assert assign_conds([0, 1], 4) == {0: 0, 1: 1}  # more CFG ranks than conds: ranks 2, 3 only receive
    assert assign_conds([1], 2) == {1: 0}
    with pytest.raises(ValueError):
        assign_conds([0], 0)


def test_local_conds_blanks_other_ranks() -> None:
    conds = ["c", None, "u"]
    owners = assign_conds([0, 2], 2)
    assert local_conds(conds, owners, 0) == ["c", None, None]
    assert local_conds(conds, owners, 1) == [None, None, "u"]


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(64, 2, (32, 32)), (81, 2, (41, 40)), (81, 4, (21, 20, 20, 20)), (3, 4, (1, 1, 1, 0)), (0, 2, (0, 0))],
)
def test_split_sizes(total: int, parts: int, expected: tuple[int, ...]) -> None:
    assert split_sizes(total, parts) == expected
    assert sum(expected) == total
    # Same layout as torch.tensor_split, so shards line up with any torch-based slicing.
    assert tuple(t.shape[0] for t in torch.arange(total).tensor_split(parts)) == expected


def test_split_sizes_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        split_sizes(4, 0)
    with pytest.raises(ValueError):
        split_sizes(-1, 2)


def test_all_gather_without_group_is_identity() -> None:
    x = torch.randn(2, 5, 3)
    assert all_gather_uneven(x, 1, (5,), None) is x


def test_shard_bookkeeping() -> None:
    s = Shard((41, 40), 1)
    assert (s.local, s.full, s.offset, s.even) == (40, 81, 41, False)
    assert Shard((32, 32), 0).even


def test_state_tells_joint_from_image_only_attention() -> None:
    state = SequenceState(text_len=8, shard=Shard((32, 32), 1), active=True)
    assert state.text_tokens_in(40) == 8  # [text | local image]
    assert state.text_tokens_in(32) == 0  # image only (MMDiT-X x-block)
    assert state.text_tokens_in(72) is None  # something else
    assert SequenceState(text_len=8).text_tokens_in(40) is None  # not sharded yet


def test_mask_rows_follow_text_and_local_shard() -> None:
    text, sizes = 3, (5, 4)
    n = text + sum(sizes)
    mask = torch.arange(n * n, dtype=torch.float32).view(1, n, n)
    state = SequenceState(text_len=text, shard=Shard(sizes, 1), active=True)
    rows = slice_mask_rows(mask, state, text)
    assert rows is not None
    expected = [0, 1, 2] + [text + 5 + i for i in range(4)]
    assert torch.equal(rows, mask[:, expected])
    assert slice_mask_rows(None, state, text) is None
    with pytest.raises(ValueError):
        slice_mask_rows(mask[:, :-1], state, text)


@pytest.mark.parametrize(("cfg", "u", "r"), [(1, 2, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2), (1, 4, 1)])
def test_group_layout_matches_plan_coords(cfg: int, u: int, r: int) -> None:
    plan = ParallelPlan(cfg=cfg, ulysses=u, ring=r)
    blocks = _blocks(plan)
    for kind in ("sp", "ulysses", "ring", "cfg"):
        flat = sorted(x for b in blocks[kind] for x in b)
        assert flat == list(range(plan.world_size)), kind  # each kind partitions the world
    for rank in range(plan.world_size):
        c, rr, uu = plan.coords(rank)
        uly = next(b for b in blocks["ulysses"] if rank in b)
        ring = next(b for b in blocks["ring"] if rank in b)
        cfgg = next(b for b in blocks["cfg"] if rank in b)
        assert all(plan.coords(x)[:2] == (c, rr) for x in uly) and uly.index(rank) == uu
        assert all(plan.coords(x)[0] == c and plan.coords(x)[2] == uu for x in ring) and ring.index(rank) == rr
        assert all(plan.coords(x)[1:] == (rr, uu) for x in cfgg) and cfgg.index(rank) == c
