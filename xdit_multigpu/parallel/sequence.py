"""Generic sequence sharding: shard image tokens on entry, gather them on exit, per-call state.

Sharding contract (every model installer follows it):

* Text tokens (T of them, incl. register tokens) are replicated: every rank of the sequence group
  holds and computes all of them; unless the family calls ``shard_text`` (joint attention, T divisible
  by sp, image shards even, no attention mask): then each rank holds T/sp contiguous text rows in
  sp-rank order, ``SequenceState.text_len`` is that local count and ``text_sharded`` is True. Text is
  never gathered: every per-token layer is exact on its rows and joint attention sees all of them.
* Image tokens (L of them, incl. any reference-latent tokens appended to the image stream) are split
  into contiguous shards in sp-rank order, sizes ``split_sizes(L, sp)`` (uneven when ``sp`` does not
  divide ``L``).
* Between the shard and the gather, self-attention over ``[text | local image]`` goes through the
  attention override (``attention.py``), which reads this module's ``SequenceState``.
* The gather restores the full image stream, identical on every rank, before the final layer.

The state lives in ComfyUI's ``transformer_options`` (rebuilt on every ``_calc_cond_batch`` chunk; the
same dict reaches every block and attention call of one forward), under ``STATE_KEY``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WorkerError
from .comm import all_gather_sizes, all_gather_uneven, split_sizes
from .groups import ParallelGroups
from .tuning import Tuning

log = logging.getLogger(__name__)

STATE_KEY = "xdit_sequence_parallel"


@dataclass(frozen=True)
class Shard:
    """Where this rank's image tokens sit in the full image stream."""

    sizes: tuple[int, ...]  # tokens per sp rank
    index: int  # this rank's sp rank

    @property
    def local(self) -> int:
        return self.sizes[self.index]

    @property
    def full(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.index])

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1


@dataclass
class SequenceState:
    """Per-forward record of the split. ``shard`` is None until the image stream is sharded;
    ``active`` is False again once it has been gathered (attention then runs unchanged)."""

    text_len: int = 0  # text rows this rank holds (all T, or T/sp when text_sharded)
    shard: Shard | None = None
    active: bool = False
    text_sharded: bool = False

    def text_tokens_in(self, q_len: int) -> int | None:
        """Text tokens in front of the local image tokens of a self-attention call of ``q_len``.

        ``T + local`` -> T (joint text+image attention), ``local`` -> 0 (image-only attention, e.g.
        SD3.5's x-block). These only coincide when T == 0, where both answers are 0. Anything else is
        not a sharded self-attention: None.
        """
        if self.shard is None:
            return None
        if q_len == self.text_len + self.shard.local:
            return self.text_len
        if q_len == self.shard.local:
            return 0
        return None


def state_of(transformer_options: MutableMapping[str, Any] | None) -> SequenceState | None:
    if not transformer_options:
        return None
    state = transformer_options.get(STATE_KEY)
    return state if isinstance(state, SequenceState) else None


class ForwardSlot:
    """The sequence state of the forward in flight, for hooks that receive no ``transformer_options``
    (object patches on models such as PixArt, block replaces whose args carry no options).

    ``begin`` opens a private options dict holding a fresh ``SequenceState`` (pass ``options`` as the
    attention override's ``transformer_options``); ``end`` closes it. One ModelPatcher samples one thing
    at a time in a worker, so one slot per installed patcher suffices. A forward that raised leaves the
    slot open; the next ``begin`` replaces it.
    """

    def __init__(self) -> None:
        self.options: dict[str, Any] | None = None

    def begin(self, ctx: SequenceParallel, text_len: int = 0) -> SequenceState:
        self.options = {}
        return ctx.begin(self.options, text_len=text_len)

    def active(self) -> SequenceState | None:
        """The state while the image stream is sharded, else None (hooks then run unchanged)."""
        state = state_of(self.options)
        return state if state is not None and state.active else None

    def end(self) -> None:
        self.options = None


class SequenceParallel:
    """The context a model installer receives: groups plus shard / gather helpers.

    One instance per parallelised patcher; it holds no per-call data (that is ``SequenceState``).
    """

    def __init__(self, groups: ParallelGroups, attention_override: Any, tuning: Tuning | None = None) -> None:
        self.groups = groups
        self.attention_override = attention_override  # install as transformer_options[...override]
        # Set by installers whose per-forward state lives in a ForwardSlot rather than transformer_options
        # (``slot.active``), so generic hooks outside the blocks (ControlNet residuals) can find it.
        self.forward_state: Callable[[], SequenceState | None] | None = None
        self.tuning = tuning or Tuning()

    @property
    def size(self) -> int:
        return self.groups.plan.sp

    @property
    def rank(self) -> int:
        return self.groups.sp_rank

    def begin(self, transformer_options: MutableMapping[str, Any], text_len: int = 0) -> SequenceState:
        """Start a forward: put a fresh state into ``transformer_options`` and return it."""
        state = SequenceState(text_len=text_len)
        transformer_options[STATE_KEY] = state
        return state

    def shard(self, state: SequenceState, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Split the full image stream ``tokens`` along ``dim``; records the split in ``state``.

        Checks first that every rank of the sequence group holds the same shapes (batch, text and
        image lengths): ComfyUI may batch conds differently per rank when free memory differs, and
        mismatched ranks would otherwise hang or mix data in the attention collectives.
        """
        full = tokens.shape[dim]
        self._check_agreement(tokens.shape[0], state.text_len, full)
        state.shard = Shard(split_sizes(full, self.size), self.rank)
        state.active = True
        if not state.shard.even:
            log.debug("xDiT: %d image tokens do not divide over %d ranks: exact all-gather attention", full, self.size)
        return self.slice_like(state, tokens, dim)

    def shard_text(self, state: SequenceState, text: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's text rows when text can be sharded (see the module docstring), else ``text`` whole.

        Call after ``shard`` with the full text of a joint-attention model; ``text_rows`` then slices
        tensors aligned with the text (e.g. RoPE ids). Decided from shapes every rank agreed on, so all
        ranks decide alike.
        """
        shard = self._require(state)
        full = text.shape[dim]
        if not self.tuning.shard_text or not shard.even or full == 0 or full % self.size or full != state.text_len:
            return text
        state.text_sharded = True
        state.text_len = full // self.size
        return text.narrow(dim, self.rank * state.text_len, state.text_len)

    def text_rows(self, state: SequenceState, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's rows of a tensor aligned with the full text (whole when text is replicated)."""
        if not state.text_sharded:
            return tokens
        return tokens.narrow(dim, self.rank * state.text_len, state.text_len)

    def slice_like(self, state: SequenceState, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's rows of a tensor aligned with the image stream (ids, residuals, masks)."""
        shard = self._require(state)
        if tokens.shape[dim] != shard.full:
            raise ValueError(f"slice_like: {tokens.shape[dim]} rows along dim {dim}, image stream has {shard.full}")
        return tokens.narrow(dim, shard.offset, shard.local)

    def gather(self, state: SequenceState, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All-gather the local image tokens back into the full stream; deactivates ``state``."""
        shard = self._require(state)
        full = all_gather_uneven(tokens, dim, shard.sizes, self.groups.sp)
        state.active = False
        return full

    def _require(self, state: SequenceState) -> Shard:
        if state.shard is None:
            raise RuntimeError("sequence parallel: the image stream was not sharded in this forward")
        return state.shard

    def _check_agreement(self, batch: int, text_len: int, image_len: int) -> None:
        # On the CPU (gloo) twin of the sequence group when there is one: no device sync per forward.
        seen = all_gather_sizes((batch, text_len, image_len), self.groups.sp_cpu or self.groups.sp)
        if len(set(seen)) > 1:
            raise WorkerError(
                "sequence parallel ranks disagree on (batch, text tokens, image tokens): "
                f"{dict(zip(self.groups.sp_ranks, seen))}. ComfyUI batched conds differently on different "
                "ranks (free memory differs) or the inputs differ; give every rank the same inputs and "
                "similar free memory"
            )
