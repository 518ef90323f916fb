"""This rank's rows of a RoPE table laid out over the joint ``[text | image]`` sequence.

Chroma and Qwen-Image compute one RoPE table for ``cat(txt_ids, img_ids)`` -- Flux's ``EmbedND``
layout ``(B, 1, T + L, D/2, 2, 2)``, token dim 2 -- once per forward, *after* the last point a hook can
shard the ids, and hand the same full table to every block. Under sequence parallelism a block sees
``[local text | local image shard]`` -- all T text rows, or this rank's T/sp when the family sharded the
text (``SequenceParallel.shard_text``) -- so its table must be those text rows (``text_rows``) plus this
rank's image rows ``[T + offset, T + offset + local)``. ``JointRope`` builds that once per forward (the
blocks receive the same tensor object) and drops it when the stream is gathered.
"""

from __future__ import annotations

import torch

from ..parallel.sequence import SequenceParallel, SequenceState

TOKEN_DIM = 2  # EmbedND output: (B, 1, S, D/2, 2, 2)


def local_rows(ctx: SequenceParallel, state: SequenceState, pe: torch.Tensor, dim: int = TOKEN_DIM) -> torch.Tensor:
    """This rank's text rows of ``pe`` followed by its image rows (see the module docstring). The full
    text length is what precedes the L image rows of the full table."""
    assert state.shard is not None
    text = pe.shape[dim] - state.shard.full
    local_text = ctx.text_rows(state, pe.narrow(dim, 0, text), dim=dim)
    image = ctx.slice_like(state, pe.narrow(dim, text, state.shard.full), dim=dim)
    return torch.cat((local_text, image), dim=dim)


class JointRope:
    """Per-patcher cache of the local table of the forward in flight (one forward at a time per
    patcher in a worker, as ``ForwardSlot`` assumes)."""

    def __init__(self, ctx: SequenceParallel) -> None:
        self.ctx = ctx
        self._source: torch.Tensor | None = None
        self._local: torch.Tensor | None = None

    def local(self, state: SequenceState, pe: torch.Tensor) -> torch.Tensor:
        if pe is not self._source or self._local is None:
            self._local = local_rows(self.ctx, state, pe)
            self._source = pe
        return self._local

    def clear(self) -> None:
        self._source = self._local = None
