"""Sharded joint-attention text: when ``shard_text`` shards, which rows each rank keeps, the mask rows of
the exact fallback, and the A/B switches' parsing (no processes; the equivalence runs are in
``tests/distributed/test_parallel_fast_paths.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xdit_multigpu.errors import ConfigError
from xdit_multigpu.parallel.attention import slice_mask_rows
from xdit_multigpu.parallel.sequence import SequenceParallel, SequenceState, Shard
from xdit_multigpu.parallel.tuning import Tuning

pytestmark = pytest.mark.unit


def _ctx(sp: int, rank: int, shard_text: bool = True) -> SequenceParallel:
    groups = SimpleNamespace(plan=SimpleNamespace(sp=sp), sp_rank=rank)
    return SequenceParallel(groups, attention_override=None, tuning=Tuning(shard_text=shard_text))  # type: ignore[arg-type]


def _state(text: int, sizes: tuple[int, ...], rank: int) -> SequenceState:
    return SequenceState(text_len=text, shard=Shard(sizes, rank), active=True)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_even_image_and_divisible_text_are_sharded_in_rank_order(rank):
    ctx, state = _ctx(4, rank), _state(8, (4, 4, 4, 4), rank)
    txt = torch.arange(8).view(1, 8, 1)
    out = ctx.shard_text(state, txt)
    assert state.text_sharded and state.text_len == 2
    assert out.flatten().tolist() == [2 * rank, 2 * rank + 1]
    ids = torch.arange(16).view(1, 8, 2)
    assert ctx.text_rows(state, ids).reshape(-1).tolist() == list(range(4 * rank, 4 * rank + 4))
    assert state.text_tokens_in(2 + 4) == 2 and state.text_tokens_in(4) == 0


@pytest.mark.parametrize(("text", "sizes", "switch"), [(9, (4, 4), True), (8, (5, 4), True), (8, (4, 4), False)])
def test_text_stays_replicated_when_it_cannot_be_sharded(text, sizes, switch):
    ctx, state = _ctx(2, 1, shard_text=switch), _state(text, sizes, 1)
    txt = torch.zeros(1, text, 3)
    assert ctx.shard_text(state, txt) is txt
    assert not state.text_sharded and state.text_len == text
    assert ctx.text_rows(state, txt) is txt


def test_fallback_mask_rows_follow_sharded_text():
    # 2 ranks, text 4 (2 per rank), image 6 (3 per rank): full square 10 x 10, rows = [text | image]
    mask = torch.arange(100.0).view(1, 10, 10)
    state = _state(2, (3, 3), 1)
    state.text_sharded = True
    rows = slice_mask_rows(mask, state, text=2)
    assert rows[0, :, 0].tolist() == [20.0, 30.0, 70.0, 80.0, 90.0]  # text rows 2, 3; image rows 4 + 3 .. 4 + 5
    replicated = _state(4, (3, 3), 1)
    assert slice_mask_rows(mask, replicated, text=4)[0, :, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 70.0, 80.0, 90.0]


def test_switches_parse(monkeypatch):
    monkeypatch.setenv("XDIT_SHARD_TEXT", "0")
    monkeypatch.setenv("XDIT_FUSED_ULYSSES", "yes")
    assert Tuning.from_env() == Tuning(shard_text=False, fused_ulysses=True)
    monkeypatch.setenv("XDIT_FUSED_ULYSSES", "maybe")
    with pytest.raises(ConfigError):
        Tuning.from_env()
    monkeypatch.delenv("XDIT_SHARD_TEXT")
    monkeypatch.delenv("XDIT_FUSED_ULYSSES")
    assert Tuning.from_env() == Tuning()


def test_ulysses_chunks_parse(monkeypatch):
    monkeypatch.setenv("XDIT_ULYSSES_CHUNKS", "3")
    assert Tuning.from_env().ulysses_chunks == 3
    monkeypatch.setenv("XDIT_ULYSSES_CHUNKS", "Auto")
    assert Tuning.from_env().ulysses_chunks == 0
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("XDIT_ULYSSES_CHUNKS", bad)
        with pytest.raises(ConfigError, match="XDIT_ULYSSES_CHUNKS"):
            Tuning.from_env()


def test_chunks_for_divides_the_rank_heads():
    from xdit_multigpu.parallel.ulysses import AUTO_CHUNKS, chunks_for

    assert chunks_for(1, 6) == 1
    assert chunks_for(4, 6) == 3  # requested counts are capped to a divisor of the rank's heads
    assert chunks_for(5, 6) == 3 and chunks_for(2, 3) == 1 and chunks_for(8, 2) == 2
    assert chunks_for(0, 6) == chunks_for(AUTO_CHUNKS, 6) == 1  # auto: no chunking (measured, see ulysses.py)
