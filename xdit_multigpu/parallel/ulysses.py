"""Fused Ulysses attention for ring == 1: one all-to-all for q/k/v, the host's own kernel, one back.

Contract: every rank of the Ulysses group holds the same number S of *uniformly sharded* tokens
(image tokens, and text tokens when they are sharded too; never replicated text) and all H heads. The
all-to-all gives each rank all U*S tokens for H/U heads (rank-major token order: keys are permutation
invariant and each query row goes back to its owner), the attention runs there with ComfyUI's own
backend ``func`` (the kernel the one-device path uses, so bf16 results match it), and a second
all-to-all returns this rank's S rows with all heads.

Why not yunchang here: its ``LongContextAttention`` issues one all-to-all per tensor (q, k, v, out),
each with its own reshapes and ``contiguous`` copies, and needs an LSE-returning kernel; with ring == 1
neither the LSE nor separate collectives are needed. Per call this is 1 packing stack, 1 unpack, the
attention, 1 pack, 1 unpack and 2 collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _split_heads(x: torch.Tensor, heads: int, u: int, skip_reshape: bool) -> torch.Tensor:
    """A ``(U, B, H/U, S, D)`` view of q/k/v given as ``(B, H, S, D)`` or ``(B, S, H*D)`` / ``(B, S, H, D)``."""
    if skip_reshape:
        b, _, s, d = x.shape
        return x.reshape(b, u, heads // u, s, d).permute(1, 0, 2, 3, 4)
    b, s = x.shape[0], x.shape[1]
    return x.reshape(b, s, u, heads // u, -1).permute(2, 0, 3, 1, 4)


class FusedUlysses:
    """Callable with the attention override's arguments; ``group`` is the Ulysses group (size ``u``)."""

    def __init__(self, group: Any, u: int) -> None:
        self.group, self.u = group, u
        self.calls = 0  # tests read this to know which path ran

    def __call__(self, func: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 heads: int, skip_reshape: bool, skip_output_reshape: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        u = self.u
        parts = [_split_heads(t, heads, u, skip_reshape) for t in (q, k, v)]
        _, b, hu, s, d = parts[0].shape
        send = torch.stack(parts, dim=1)  # (U, 3, B, H/U, S, D): one packing copy of each tensor
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[j] = rank j's S tokens for this rank's heads -> (3, B, H/U, U*S, D), rank-major tokens
        full = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, hu, u * s, d)
        out = func(full[0], full[1], full[2], hu, mask=None, skip_reshape=True, skip_output_reshape=True, **kwargs)
        back = out.reshape(b, hu, u, s, d).permute(2, 0, 1, 3, 4).contiguous()  # (U, B, H/U, S, D)
        got = torch.empty_like(back)
        dist.all_to_all_single(got, back, group=self.group)
        self.calls += 1
        # got[j] = this rank's S rows for rank j's heads (head block j)
        if skip_output_reshape:
            return got.permute(1, 0, 2, 3, 4).reshape(b, heads, s, d)
        return got.permute(1, 3, 0, 2, 4).reshape(b, s, heads * d)
