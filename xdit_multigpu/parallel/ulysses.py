"""Fused Ulysses attention for ring == 1: one all-to-all for q/k/v, the host's own kernel, one back.

Contract: every rank of the Ulysses group holds the same number S of *uniformly sharded* tokens
(image tokens, and text tokens when they are sharded too; never replicated text) and all H heads. The
all-to-all gives each rank all U*S tokens for H/U heads (rank-major token order: keys are permutation
invariant and each query row goes back to its owner), the attention runs there with ComfyUI's own
backend ``func`` (the kernel the one-device path uses, so bf16 results match it), and a second
all-to-all returns this rank's S rows with all heads.

Why not yunchang here: its ``LongContextAttention`` issues one all-to-all per tensor (q, k, v, out),
each with its own reshapes and ``contiguous`` copies, and needs an LSE-returning kernel; with ring == 1
neither the LSE nor separate collectives are needed. Per call this is 1 packing copy, the attention,
1 pack, 1 unpack and 2 collectives.

Overlap (``chunks`` > 1): each rank's H/U heads are split into C chunks of H/(U*C) heads. All C q/k/v
all-to-alls are queued at once (asynchronous, on the process group's communication stream); the
attention of chunk j starts when chunk j has arrived, and chunk j's output all-to-all runs while
chunk j+1 is attended. Only the first chunk's q/k/v and the last chunk's output stay on the critical
path. Heads are independent in attention, so the result is the same as with one chunk, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Auto chunking: one chunk. Measured on 4 x H100 (NVLink, CUDA graphs, Flux.1-dev, 2026-11-28): 2 or 3
# chunks gained nothing at 2048² (248.8 ms/step with 1, 252.3 with 2, 250.9 with 3) and at most 1.6 %
# at 1024²: the NCCL kernels that run beside the attention take its SMs. Slower links (PCIe) may differ:
# XDIT_ULYSSES_CHUNKS=N forces N.
AUTO_CHUNKS = 1


def _split_heads(x: torch.Tensor, heads: int, u: int, skip_reshape: bool) -> torch.Tensor:
    """A ``(U, B, H/U, S, D)`` view of q/k/v given as ``(B, H, S, D)`` or ``(B, S, H*D)`` / ``(B, S, H, D)``."""
    if skip_reshape:
        b, _, s, d = x.shape
        return x.reshape(b, u, heads // u, s, d).permute(1, 0, 2, 3, 4)
    b, s = x.shape[0], x.shape[1]
    return x.reshape(b, s, u, heads // u, -1).permute(2, 0, 3, 1, 4)


def chunks_for(requested: int, heads_per_rank: int) -> int:
    """How many head chunks one call pipelines: ``requested`` (0 = auto: ``AUTO_CHUNKS``) capped to the
    largest divisor of the rank's heads not above it."""
    want = requested or AUTO_CHUNKS
    return max(c for c in range(1, min(want, heads_per_rank) + 1) if heads_per_rank % c == 0)


class FusedUlysses:
    """Callable with the attention override's arguments; ``group`` is the Ulysses group (size ``u``);
    ``chunks``: head chunks per call for overlap (0 = auto, 1 = none; see ``chunks_for``)."""

    def __init__(self, group: Any, u: int, chunks: int = 0) -> None:
        self.group, self.u, self.chunks = group, u, chunks
        self.calls = 0  # tests read this to know which path ran
        self.last_chunks = 0  # chunks of the last call (tests, benchmark)

    def __call__(self, func: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 heads: int, skip_reshape: bool, skip_output_reshape: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        u = self.u
        parts = [_split_heads(t, heads, u, skip_reshape) for t in (q, k, v)]
        _, b, hu, s, d = parts[0].shape
        c = chunks_for(self.chunks, hu)
        hc = hu // c
        # (C, U, 3, B, H/(U*C), S, D): chunk j of every rank's head block, contiguous per chunk (one copy
        # per tensor, as a stack would make).
        send = torch.empty((c, u, 3, b, hc, s, d), dtype=q.dtype, device=q.device)
        for i, part in enumerate(parts):
            send[:, :, i] = part.reshape(u, b, c, hc, s, d).permute(2, 0, 1, 3, 4, 5)
        recv = torch.empty_like(send)
        pending = [dist.all_to_all_single(recv[j], send[j], group=self.group, async_op=c > 1) for j in range(c)]
        got = torch.empty((c, u, b, hc, s, d), dtype=q.dtype, device=q.device)
        back_pending = []
        for j in range(c):
            if pending[j] is not None:
                pending[j].wait()
            # recv[j][r] = rank r's S tokens for this rank's head chunk j -> (3, B, hc, U*S, D), rank-major
            full = recv[j].permute(1, 2, 3, 0, 4, 5).reshape(3, b, hc, u * s, d)
            out = func(full[0], full[1], full[2], hc, mask=None, skip_reshape=True, skip_output_reshape=True, **kwargs)
            back = out.reshape(b, hc, u, s, d).permute(2, 0, 1, 3, 4).contiguous()  # (U, B, hc, S, D)
            back_pending.append(dist.all_to_all_single(got[j], back, group=self.group, async_op=c > 1))
        for work in back_pending:
            if work is not None:
                work.wait()
        self.calls += 1
        self.last_chunks = c
        # got[j][r] = this rank's S rows for rank r's head chunk j: head r*H/U + j*hc + i
        if skip_output_reshape:
            return got.permute(2, 1, 0, 3, 4, 5).reshape(b, heads, s, d)
        return got.permute(2, 4, 1, 0, 3, 5).reshape(b, s, heads * d)
