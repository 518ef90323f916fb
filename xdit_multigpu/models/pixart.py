"""PixArt-α / PixArt-Σ sequence parallel through bound-method object patches
(``comfy/ldm/pixart/pixartms.py``, ``blocks.py``).

``PixArtMS.forward_orig`` passes no ``transformer_options`` and offers no block-replace patches, and its
attention calls ``optimized_attention`` without options, so the attention override cannot reach it.
Every hook is therefore a method bound to the module it replaces, installed with
``ModelPatcher.add_object_patch`` on the clone (parameters and state-dict keys unchanged: LoRA works):

1. ``diffusion_model.blocks.0.forward``: opens the per-forward ``SequenceState`` (no text in the image
   stream: T = 0) and shards ``x`` (patch embeddings + sin-cos position embeddings were added at the
   input, so nothing else needs slicing; ``t0`` is per sample).
2. ``diffusion_model.blocks.{i}.attn.forward`` (``AttentionKVCompress``): the same q/k/v projections
   and qk-norm, then the generic sequence-parallel attention over the local image shard (USP, or the
   exact all-gather path for uneven shards). Cross-attention (``cross_attn``) stays as it is: local
   queries against the complete caption.
3. ``diffusion_model.blocks.{last}.forward``: gathers ``x`` after the last block, so ``final_layer`` and
   ``unpatchify`` see the full image on every rank.

KV compression (``sr_ratio > 1``, ``kv_compress_config``) downsamples K/V over the full 2-D token grid
with a strided convolution; a shard is not a grid, so sequence parallel refuses such models (CFG works).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.hooks import patch_method
from ..parallel.sequence import ForwardSlot, SequenceParallel

MODEL = "diffusion_model"


def _check_supported(dm: Any) -> int:
    """Number of blocks; raises UnsupportedModelError for KV compression or an empty model."""
    compressed = [i for i, b in enumerate(dm.blocks) if getattr(b.attn, "sr_ratio", 1) > 1]
    if compressed:
        raise UnsupportedModelError(
            "parallel_strategy",
            f"PixArt KV compression (sr_ratio > 1 in blocks {compressed}) downsamples keys / values over the "
            "whole 2-D token grid, which sequence parallelism splits",
            "Choose CFG parallel for this model",
        )
    if len(dm.blocks) == 0:
        raise UnsupportedModelError("model", "this PixArt model has no transformer blocks", "Use one device")
    return len(dm.blocks)


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install PixArt sequence parallel on ``patcher`` (a clone). See the module docstring."""
    import comfy.ldm.pixart.blocks as pixart_blocks  # noqa: PLC0415  (the package imports without ComfyUI)

    n_blocks = _check_supported(patcher.model.diffusion_model)
    last = n_blocks - 1
    slot = ForwardSlot()

    def first_block(block: Any, original: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = slot.begin(ctx, text_len=0)
        out = original(ctx.shard(state, x, dim=1), *args, **kwargs)
        return gather(out) if last == 0 else out

    def gather(out: torch.Tensor) -> torch.Tensor:
        state = slot.active()
        if state is not None:
            out = ctx.gather(state, out, dim=1)
        slot.end()
        return out

    def last_block(block: Any, original: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return gather(original(*args, **kwargs))

    def self_attention(attn: Any, original: Any, x: torch.Tensor, mask: Any = None, HW: Any = None,  # noqa: N803
                       block_id: Any = None) -> torch.Tensor:
        if slot.active() is None or mask is not None:  # ComfyUI raises for a mask itself
            return original(x, mask, HW, block_id)
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (t.reshape(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2) for t in (q, k, v))
        out = ctx.attention_override(pixart_blocks.optimized_attention, q, k, v, attn.num_heads, mask=None,
                                     skip_reshape=True, transformer_options=slot.options)
        return attn.proj(out.reshape(b, n, c))

    for i in range(n_blocks):
        patch_method(patcher, f"{MODEL}.blocks.{i}.attn", self_attention)
    patch_method(patcher, f"{MODEL}.blocks.0", first_block)
    if last > 0:
        patch_method(patcher, f"{MODEL}.blocks.{last}", last_block)
