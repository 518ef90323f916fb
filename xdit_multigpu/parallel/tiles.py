"""Scatter the tiles of a host's tiled function over several devices, keeping the host's own blending.

A host tiled function (ComfyUI's ``tiled_scale_multidim`` and its callers) cuts its input into tiles,
calls ``fn(tile)`` tile by tile, and blends the outputs with feathered masks. ``run_tiled`` calls it
twice:

1. rehearsal: ``fn`` records each tile input, hands it to the device threads at once, and returns a
   cheap placeholder (no compute; the host's blending of placeholders is discarded, so the placeholder
   only has to be something the host can blend: the VAE hands a 1x1 tile that broadcasts);
2. replay: ``fn`` returns the real output of the i-th tile, in the recorded order, as soon as the
   device that computed it is done (so the host's blending overlaps with the remaining tiles).

Contract: if ``tiled`` calls ``fn`` with the same sequence of tile shapes in both passes (it is a
deterministic function of its input, as ComfyUI's tiler is) and ``runner(x)`` computes what the host's
``fn(x)`` would, the result is the host's own tiled result, bit for bit. A replayed tile whose shape
differs from the rehearsal's, a missing or an extra tile, raises ``TileOrderError``; a real output
whose shape differs from the expected one (``out_shape``) raises ``TileShapeError`` (the caller then
runs the host serially). Generic: never names a model; torch is only needed for ``max_batch > 1``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import WorkerTimeout, XDiTError

R = TypeVar("R")
TileFn = Callable[[Any], Any]
# tiled(fn, rehearsal) -> result: the host's tiled function with ``fn`` as its per-tile computation.
Tiled = Callable[[TileFn, bool], R]


class TileOrderError(XDiTError, RuntimeError):
    """The host's tiler did not call the tile function the same way twice."""


class TileShapeError(XDiTError, RuntimeError):
    """A real tile output does not have its placeholder's shape (the rehearsal blended wrong shapes)."""


@dataclass(frozen=True)
class TileStats:
    """What one ``run_tiled`` call did: tiles per device slot (dynamic balance), in slot order."""

    tiles: int
    per_slot: tuple[int, ...]


@dataclass
class _Job:
    index: int
    tile: Any
    done: threading.Event = field(default_factory=threading.Event)
    out: Any = None
    error: BaseException | None = None

    def finish(self, out: Any = None, error: BaseException | None = None) -> None:
        self.tile = None  # the input is no longer needed: free it while the host blends
        self.out, self.error = out, error
        self.done.set()


class TilePool:
    """One thread per device slot; each pulls jobs from one shared queue (so faster devices take more
    tiles) and runs ``runners[slot]`` on them. Results are kept by job index, so which device ran a tile
    never changes the order the host sees. ``max_batch > 1`` runs consecutive queued tiles of equal
    shape as one batch (``torch.cat`` on dim 0; the outputs are split back per tile)."""

    def __init__(self, runners: Sequence[TileFn], *, max_batch: int = 1, name: str = "xdit-tile") -> None:
        if not runners:
            raise ValueError("TilePool needs at least one runner")
        self._runners = list(runners)
        self._max_batch = max(1, max_batch)
        self._pending: deque[_Job] = deque()  # in submission order; taken from the left only
        self._cv = threading.Condition()
        self._sealed = False
        self._jobs: list[_Job] = []
        self._cancel = threading.Event()
        self._error: BaseException | None = None  # the first failure: what cancelled tiles report
        self._counts = [0] * len(runners)
        self._threads = [
            threading.Thread(target=self._loop, args=(slot,), name=f"{name}-{slot}", daemon=True)
            for slot in range(len(runners))
        ]
        for t in self._threads:
            t.start()

    def submit(self, tile: Any) -> int:
        job = _Job(len(self._jobs), tile)
        self._jobs.append(job)
        with self._cv:
            self._pending.append(job)
            self._cv.notify()
        return job.index

    def seal(self) -> None:
        """No more jobs: each thread exits once nothing is pending."""
        with self._cv:
            self._sealed = True
            self._cv.notify_all()

    def result(self, index: int, timeout_s: float) -> Any:
        job = self._jobs[index]
        if not job.done.wait(timeout_s):
            raise WorkerTimeout(f"tile {index} did not finish within {timeout_s:g} s")
        if job.error is not None:
            raise job.error
        out, job.out = job.out, None  # the host owns the output now
        return out

    def close(self, timeout_s: float) -> TileStats:
        """Stop the threads (cancelling queued jobs if any are left) and wait for them, bounded."""
        if any(not j.done.is_set() for j in self._jobs):
            self._cancel.set()
        self.seal()
        for t in self._threads:
            t.join(timeout=timeout_s)
        return TileStats(len(self._jobs), tuple(self._counts))

    def _take(self) -> list[_Job] | None:
        """The oldest pending job, plus the ones right after it of the same shape (up to ``max_batch``);
        None once sealed and drained. Never reorders: a job left behind stays first in line."""
        with self._cv:
            while not self._pending and not self._sealed:
                self._cv.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            shape = tuple(batch[0].tile.shape)
            while len(batch) < self._max_batch and self._pending and tuple(self._pending[0].tile.shape) == shape:
                batch.append(self._pending.popleft())
            return batch

    def _loop(self, slot: int) -> None:
        run = self._runners[slot]
        while (batch := self._take()) is not None:
            if self._cancel.is_set():
                for job in batch:
                    job.finish(error=self._error or XDiTError(f"tile {job.index} cancelled: the run ended"))
                continue
            try:
                outs = _run_batch(run, [j.tile for j in batch])
            except BaseException as e:  # noqa: BLE001  (handed to the host thread, which re-raises it)
                self._error = self._error or e
                self._cancel.set()
                for job in batch:
                    job.finish(error=e)
                continue
            for job, out in zip(batch, outs):
                job.finish(out=out)
            self._counts[slot] += len(batch)


def _run_batch(run: TileFn, tiles: list[Any]) -> list[Any]:
    if len(tiles) == 1:
        return [run(tiles[0])]
    import torch

    out = run(torch.cat(tiles, dim=0))
    return list(out.split([t.shape[0] for t in tiles], dim=0))


def run_tiled(
    tiled: Tiled[R],
    runners: Sequence[TileFn],
    placeholder: Callable[[Any], Any],
    out_shape: Callable[[Any], tuple[int, ...]],
    *,
    timeout_s: float,
    max_batch: int = 1,
) -> tuple[R, TileStats]:
    """``tiled(fn, rehearsal)`` with every ``fn(tile)`` computed by ``runners`` (one per device slot).

    ``placeholder(tile)`` is what the rehearsal hands the host for a tile (its values are never used);
    ``out_shape(tile)`` the shape the real output must have. Each wait for a tile is bounded by
    ``timeout_s``. Returns the replay's result and which slot ran how many tiles.
    """
    pool = TilePool(runners, max_batch=max_batch)
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (input shape, expected output shape) per tile

    def record(tile: Any) -> Any:
        shapes.append((tuple(tile.shape), tuple(out_shape(tile))))
        pool.submit(tile)
        return placeholder(tile)

    cursor = [0]

    def replay(tile: Any) -> Any:
        i = cursor[0]
        if i >= len(shapes) or tuple(tile.shape) != shapes[i][0]:
            seen = shapes[i][0] if i < len(shapes) else "no tile"
            raise TileOrderError(f"tile {i}: the host asked for shape {tuple(tile.shape)}, the rehearsal had {seen}")
        cursor[0] = i + 1
        out = pool.result(i, timeout_s)
        if tuple(out.shape) != shapes[i][1]:
            raise TileShapeError(f"tile {i}: output shape {tuple(out.shape)} != expected {shapes[i][1]}")
        return out

    try:
        tiled(record, True)
        pool.seal()
        result = tiled(replay, False)
        if cursor[0] != len(shapes):
            raise TileOrderError(f"the host used {cursor[0]} of {len(shapes)} rehearsed tiles")
    finally:
        stats = pool.close(timeout_s)
    return result, stats
