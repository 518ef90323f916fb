"""ControlNet residuals under sequence parallelism (model-agnostic).

ComfyUI's ControlNet runs inside ``_calc_cond_batch``, *before* ``apply_model``, on the full latent:
every rank of a sequence group computes the same full-length residuals (replicated compute). DiT
families then add residual ``i`` of ``control["input"]`` / ``control["output"]`` to the image rows
``[0, n)`` of the stream right after block ``i`` (Flux: ``img[:, :n] += add``; MMDiT: ``x += add``).

Sharding contract: while the image stream is sharded (``SequenceState.active``), a residual of ``n``
rows aligned with the first ``n`` image tokens (``n <= L``; reference-latent tokens appended after the
generated image get none) is handed out as this rank's rows ``[offset, min(offset + local, n))``, which
are a prefix of the local shard (possibly empty) — exactly the rows the one-device ``+=`` would touch.
After the gather (``active`` False) residuals are handed out whole, as the stream is whole again.

Mechanism: a keyed ``WrappersMP.APPLY_MODEL`` wrapper replaces each list of the ``control`` dict by a
``ShardedResiduals`` view that resolves the state from the ``transformer_options`` dict of this call
(the same dict reaches every block) at the moment the model indexes it. Families whose spec does not
declare ``control_residuals`` keep a clear refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, SupportsIndex

import torch

from ..errors import UnsupportedModelError
from .sequence import SequenceState, Shard, state_of

CONTROL_KEY = "xdit_multigpu.sequence_parallel_control"
TOKEN_DIM = 1  # residuals are (B, n, C), like the image stream


def residual_rows(add: torch.Tensor, shard: Shard, dim: int = TOKEN_DIM) -> torch.Tensor:
    """This rank's rows of a residual aligned with the first ``add.shape[dim]`` image tokens."""
    n = add.shape[dim]
    if n > shard.full:
        raise ValueError(f"ControlNet residual has {n} tokens, the image stream only {shard.full}")
    start = min(shard.offset, n)
    return add.narrow(dim, start, max(0, min(shard.offset + shard.local, n) - start))


class ShardedResiduals(list):  # type: ignore[type-arg]
    """A ControlNet residual list that yields local rows while the image stream is sharded.

    Indexing (and iteration) consults ``transformer_options``' ``SequenceState`` at access time; the
    stored tensors stay full-length and are never modified.
    """

    def __init__(self, items: list[Any], transformer_options: Mapping[str, Any],
                 forward_state: Callable[[], SequenceState | None] | None = None) -> None:
        super().__init__(items)
        self._options = transformer_options
        self._forward_state = forward_state  # families whose state lives in a ForwardSlot (HunyuanDiT)

    def _local(self, item: Any) -> Any:
        state = self._forward_state() if self._forward_state is not None else state_of(self._options)  # type: ignore[arg-type]
        if not isinstance(item, torch.Tensor) or state is None or not state.active or state.shard is None:
            return item
        return residual_rows(item, state.shard)

    def __getitem__(self, index: SupportsIndex | slice) -> Any:  # type: ignore[override]
        item = super().__getitem__(index)
        if isinstance(index, slice):
            return [self._local(x) for x in item]
        return self._local(item)

    def __iter__(self) -> Iterator[Any]:
        return (self._local(x) for x in super().__iter__())

    def pop(self, index: SupportsIndex = -1) -> Any:
        """HunyuanDiT consumes its residuals with ``controls.pop()`` (the view is a per-call copy)."""
        return self._local(super().pop(index))


def shard_control(control: Mapping[str, Any], transformer_options: Mapping[str, Any],
                  forward_state: Callable[[], SequenceState | None] | None = None) -> dict[str, Any]:
    """A new control dict whose residual lists are ``ShardedResiduals`` views (other values as is)."""
    return {k: ShardedResiduals(v, transformer_options, forward_state) if isinstance(v, list) else v
            for k, v in control.items()}


def make_control_wrapper(supported: bool, family: str,
                         forward_state: Callable[[], SequenceState | None] | None = None) -> Callable[..., Any]:
    """The ``APPLY_MODEL`` wrapper: shard ControlNet residuals (``supported``) or refuse them.

    ``forward_state``: where the forward's ``SequenceState`` lives when it is not in
    ``transformer_options`` (``SequenceParallel.forward_state``, set by families that use a ``ForwardSlot``).

    Refusal is raised by every rank of a sequence group together (they see the same conds), before any
    collective of the step.
    """

    def apply_model(executor: Any, x: Any, t: Any, c_concat: Any, c_crossattn: Any, control: Any,
                    transformer_options: Any, **kwargs: Any) -> Any:
        if control is not None:
            if not supported:
                raise UnsupportedModelError(
                    "parallel_strategy", f"ControlNet is not supported with sequence parallelism for {family}",
                    "Use CFG parallel (or one device) with ControlNet",
                )
            control = shard_control(control, transformer_options, forward_state)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return apply_model
