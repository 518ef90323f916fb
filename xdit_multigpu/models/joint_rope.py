"""This rank's rows of a RoPE table laid out over the joint ``[text | image]`` sequence.

Chroma and Qwen-Image compute one RoPE table for ``cat(txt_ids, img_ids)`` -- Flux's ``EmbedND``
layout ``(B, 1, T + L, D/2, 2, 2)``, token dim 2 -- once per forward, *after* the last point a hook can
shard the ids, and hand the same full table to every block. Under sequence parallelism a block sees
``[text (T, replicated) | local image shard]``, so its table must be the text rows plus this rank's
image rows ``[T + offset, T + offset + local)``. ``JointRope`` builds that once per forward (the blocks
receive the same tensor object) and drops it when the stream is gathered.
"""

from __future__ import annotations

from typing import Any

import torch

from ..parallel.sequence import SequenceParallel, SequenceState

TOKEN_DIM = 2  # EmbedND output: (B, 1, S, D/2, 2, 2)


def local_rows(ctx: SequenceParallel, state: SequenceState, pe: torch.Tensor, text: int,
               dim: int = TOKEN_DIM) -> torch.Tensor:
    """``pe``'s text rows ``[0, text)`` followed by this rank's image rows (see the module docstring)."""
    image = pe.narrow(dim, text, pe.shape[dim] - text)
    return torch.cat((pe.narrow(dim, 0, text), ctx.slice_like(state, image, dim=dim)), dim=dim)


class JointRope:
    """Per-patcher cache of the local table of the forward in flight (one forward at a time per
    patcher in a worker, as ``ForwardSlot`` assumes)."""

    def __init__(self, ctx: SequenceParallel) -> None:
        self.ctx = ctx
        self._source: torch.Tensor | None = None
        self._local: torch.Tensor | None = None

    def local(self, state: SequenceState, pe: torch.Tensor) -> torch.Tensor:
        if pe is not self._source or self._local is None:
            self._local = local_rows(self.ctx, state, pe, state.text_len)
            self._source = pe
        return self._local

    def clear(self) -> None:
        self._source = self._local = None
