"""ControlNet residuals under sequence parallel: local rows of full-length residuals (``parallel/control.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xdit_multigpu.parallel.comm import split_sizes
from xdit_multigpu.parallel.control import ShardedResiduals, make_control_wrapper, residual_rows
from xdit_multigpu.parallel.sequence import STATE_KEY, SequenceState, Shard

pytestmark = pytest.mark.unit


def _shards(full: int, parts: int) -> list[Shard]:
    sizes = split_sizes(full, parts)
    return [Shard(sizes, i) for i in range(parts)]


@pytest.mark.parametrize(("full", "n", "parts"), [(64, 64, 2), (81, 81, 4), (80, 64, 2), (80, 64, 4), (79, 64, 3)])
def test_local_adds_equal_the_full_add(full: int, n: int, parts: int) -> None:
    """``img_local[:, :len(add_local)] += add_local`` on every shard == ``img[:, :n] += add`` on one device,
    also when reference tokens follow the image (n < full) and on uneven shards."""
    img = torch.randn(2, full, 3)
    add = torch.randn(2, n, 3)
    ref = img.clone()
    ref[:, :n] += add
    locals_ = []
    for shard in _shards(full, parts):
        local = img.narrow(1, shard.offset, shard.local).clone()
        a = residual_rows(add, shard)
        local[:, : a.shape[1]] += a
        locals_.append(local)
    assert torch.equal(torch.cat(locals_, dim=1), ref)


def test_residual_longer_than_stream_is_an_error() -> None:
    with pytest.raises(ValueError, match="residual"):
        residual_rows(torch.zeros(1, 9, 2), Shard((4, 4), 0))


def test_sharded_residuals_follow_the_state() -> None:
    add = torch.arange(8.0).reshape(1, 8, 1)
    options: dict[str, Any] = {}
    lst = ShardedResiduals([add, None], options)
    assert lst[0] is add and len(lst) == 2  # no state: whole
    options[STATE_KEY] = SequenceState(text_len=3, shard=Shard((4, 4), 1), active=True)
    assert lst[0].flatten().tolist() == [4.0, 5.0, 6.0, 7.0] and lst[1] is None
    assert [x is None for x in lst] == [False, True] and list(lst)[0].shape[1] == 4
    options[STATE_KEY].active = False  # gathered: whole again
    assert lst[0] is add


def test_pop_hands_out_local_rows_and_leaves_the_stored_list_alone() -> None:
    """HunyuanDiT consumes residuals with ``controls.pop()``."""
    a, b = torch.arange(8.0).reshape(1, 8, 1), torch.arange(8.0, 16.0).reshape(1, 8, 1)
    options: dict[str, Any] = {STATE_KEY: SequenceState(text_len=0, shard=Shard((4, 4), 1), active=True)}
    stored = [a, b]
    lst = ShardedResiduals(stored, options)
    assert lst.pop().flatten().tolist() == [12.0, 13.0, 14.0, 15.0] and len(lst) == 1
    assert lst.pop().flatten().tolist() == [4.0, 5.0, 6.0, 7.0] and stored == [a, b]


def test_wrapper_shards_supported_control() -> None:
    seen: dict[str, Any] = {}

    def executor(x: Any, t: Any, c_concat: Any, c_crossattn: Any, control: Any, to: Any, **kw: Any) -> str:
        seen["control"] = control
        return "ran"

    control = {"input": [torch.zeros(1, 4, 1)], "middle": [], "output": [None]}
    assert make_control_wrapper(True, "Flux")(executor, None, None, None, None, control, {}) == "ran"
    assert all(isinstance(v, ShardedResiduals) for v in seen["control"].values())
    assert type(control["input"]) is list  # the caller's dict is left as is
