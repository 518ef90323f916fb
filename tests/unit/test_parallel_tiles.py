"""parallel.tiles.run_tiled: a host tiler run twice (rehearsal + replay) equals the host run directly, with
the tiles computed on several threads; misuse (order, count, shapes, failures, stalls) is an error."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from xdit_multigpu.errors import WorkerTimeout
from xdit_multigpu.parallel.tiles import TileOrderError, TileShapeError, run_tiled

pytestmark = pytest.mark.unit


def _tiler(x: torch.Tensor, tile: int = 4, overlap: int = 1):
    """A miniature of ComfyUI's tiler: overlapping 1-D tiles, ``fn`` per tile, weighted blend."""

    def tiled(fn, rehearsal: bool = False):  # noqa: ARG001
        out = torch.zeros(x.shape[0], 2, x.shape[-1])
        div = torch.zeros_like(out)
        for pos in range(0, x.shape[-1] - overlap, tile - overlap):
            pos = min(pos, x.shape[-1] - tile)
            y = fn(x[..., pos:pos + tile])
            w = torch.linspace(0.5, 1.0, y.shape[-1])
            out[..., pos:pos + y.shape[-1]] += y * w  # narrowed by the output's size, as ComfyUI's tiler
            div[..., pos:pos + y.shape[-1]] += w
        return out / div

    return tiled


def _compute(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.sin(), t.cos() * t], dim=1)


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(()).expand(t.shape[0], 2, 1)  # blended in one position: the rehearsal is discarded


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return (t.shape[0], 2, t.shape[-1])


def _runners(n: int, seen: list | None = None):
    def make(slot: int):
        def run(t: torch.Tensor) -> torch.Tensor:
            if seen is not None:
                seen.append((slot, threading.current_thread().name))
            return _compute(t)

        return run

    return [make(i) for i in range(n)]


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("max_batch", [1, 3])
def test_equals_the_host_run_directly(slots: int, max_batch: int) -> None:
    x = torch.randn(2, 1, 23, generator=torch.Generator().manual_seed(0))
    tiled = _tiler(x)
    seen: list = []
    out, stats = run_tiled(tiled, _runners(slots, seen), _placeholder, _shape, timeout_s=30, max_batch=max_batch)
    assert torch.equal(out, tiled(_compute))
    assert stats.tiles == 8 and sum(stats.per_slot) == 8 and len(stats.per_slot) == slots
    assert all(name.startswith("xdit-tile-") for _, name in seen)  # never on the host thread


def test_batches_of_mixed_shapes_all_queued_before_any_runs() -> None:
    """Tiles of two shapes alternate and every tile is queued (and the pool sealed) before a device
    takes one: batching must leave none behind."""
    x = torch.randn(1, 1, 40)
    widths = [5, 3] * 6

    def tiled(fn, rehearsal: bool):  # noqa: ARG001
        return torch.cat([fn(x[..., :w]) for w in widths], dim=-1)

    gate = threading.Event()

    def slow(t: torch.Tensor) -> torch.Tensor:
        gate.wait(5)
        return _compute(t)

    timer = threading.Timer(0.3, gate.set)
    timer.start()
    out, stats = run_tiled(tiled, [slow, slow], _placeholder, _shape, timeout_s=30, max_batch=4)
    timer.join()
    assert torch.equal(out, tiled(_compute, False)) and stats.tiles == len(widths)


def test_misordered_outputs_change_the_result() -> None:
    """The negative control: the same tiles blended in another order differ (so equality above means
    the order was right)."""
    x = torch.randn(1, 1, 23, generator=torch.Generator().manual_seed(1))
    tiled = _tiler(x)
    outs: list = []
    tiled(lambda t: outs.append(_compute(t)) or outs[-1])
    order = iter([1, 0] + list(range(2, len(outs))))
    assert not torch.allclose(tiled(lambda t: outs[next(order)]), tiled(_compute), atol=1e-3)


def test_a_host_that_tiles_differently_on_replay_is_refused() -> None:
    x = torch.randn(1, 1, 23)
    calls = [0]

    def unstable(fn, rehearsal: bool):
        calls[0] += 1
        return _tiler(x, tile=4 if rehearsal else 5)(fn)

    with pytest.raises(TileOrderError, match="rehearsal had"):
        run_tiled(unstable, _runners(2), _placeholder, _shape, timeout_s=30)

    def drops_one(fn, rehearsal: bool):
        return _tiler(x)(fn) if rehearsal else _tiler(x[..., :-3])(fn)

    with pytest.raises(TileOrderError, match="of 8 rehearsed tiles"):
        run_tiled(drops_one, _runners(2), _placeholder, _shape, timeout_s=30)


def test_an_output_of_another_shape_is_refused() -> None:
    """The caller's expected shape and the real output disagree: the caller must know (and run serially)."""
    x = torch.randn(1, 1, 23)
    short = lambda t: (t.shape[0], 2, t.shape[-1] - 1)  # noqa: E731
    with pytest.raises(TileShapeError, match="expected"):
        run_tiled(_tiler(x), _runners(2), _placeholder, short, timeout_s=30)


def test_a_failing_tile_raises_its_error_and_stops_the_threads() -> None:
    x = torch.randn(1, 1, 23)

    def bad(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="simulated"):
        run_tiled(_tiler(x), [_compute, bad], _placeholder, _shape, timeout_s=30)
    with pytest.raises(RuntimeError, match="simulated"):  # tiles cancelled after it report the failure too
        run_tiled(_tiler(x), [bad, bad], _placeholder, _shape, timeout_s=30, max_batch=3)
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before  # no tile thread left behind


def test_a_stalled_device_times_out() -> None:
    x = torch.randn(1, 1, 23)

    def slow(t: torch.Tensor) -> torch.Tensor:
        time.sleep(2.0)
        return _compute(t)

    with pytest.raises(WorkerTimeout, match="did not finish within"):
        run_tiled(_tiler(x), [slow], _placeholder, _shape, timeout_s=0.2)
