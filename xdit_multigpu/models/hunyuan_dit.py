"""HunyuanDiT (v1.0 / v1.1+) sequence parallel through ComfyUI extension points
(``comfy/ldm/hydit/models.py``, ``attn_layers.py``).

Hooks, in the order a forward meets them:

1. ``("double_block", i)`` replace for EVERY block (the forward offers them, args ``img, txt, vec, pe,
   skip``; no ``transformer_options``): block 0 opens the per-forward ``SequenceState`` (T = 0: text is
   only cross-attended) and shards ``img``. Every block gets ``pe`` -- the image RoPE ``(cos, sin)``
   computed for the full image and passed unchanged to every block -- sliced to this rank's rows. The
   long skip connections (``skip``) are outputs of earlier blocks, so they are already local shards.
   The last block gathers ``img`` so ``final_layer`` and ``unpatchify`` see the full image everywhere.
2. ``diffusion_model.blocks.{i}.attn1.forward`` object patch (bound method, added with
   ``ModelPatcher.add_object_patch`` on the clone; state-dict keys unchanged): the same projections,
   qk-norm and RoPE, then the generic sequence-parallel attention (``attn1`` calls
   ``optimized_attention`` without options, so the attention override cannot reach it).
3. Cross-attention ``attn2``: unchanged, local queries (with the sliced RoPE) against complete text.

ControlNet residuals: the forward adds ``control["output"].pop()`` to the long skip of each block after the
middle, outside the block replace, while the stream is sharded; ``ctx.forward_state`` lets the generic
APPLY_MODEL wrapper (``parallel/control.py``) hand out this rank's rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.hooks import BlockArgs, RunBlock, patch_method, replace_block
from ..parallel.sequence import ForwardSlot, SequenceParallel, SequenceState

MODEL = "diffusion_model"


def _slice_pe(ctx: SequenceParallel, state: SequenceState, pe: Any) -> Any:
    """This rank's rows of the image RoPE: a ``(cos, sin)`` tuple or a complex tensor, rows = tokens."""
    if pe is None:
        return None
    if isinstance(pe, (tuple, list)):
        return type(pe)(ctx.slice_like(state, p, dim=0) for p in pe)
    return ctx.slice_like(state, pe, dim=0)


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install HunyuanDiT sequence parallel on ``patcher`` (a clone). See the module docstring."""
    import comfy.ldm.hydit.attn_layers as hydit_attn  # noqa: PLC0415  (the package imports without ComfyUI)

    n_blocks = len(patcher.model.diffusion_model.blocks)
    if n_blocks == 0:
        raise UnsupportedModelError("model", "this HunyuanDiT model has no transformer blocks", "Use one device")
    last = n_blocks - 1
    slot = ForwardSlot()
    ctx.forward_state = slot.active  # ControlNet residuals (added to the long skips) follow this state

    def block_patch(index: int) -> Any:
        def patch(args: BlockArgs, run_block: RunBlock) -> BlockArgs:
            img = args["img"]
            if index == 0:
                img = ctx.shard(slot.begin(ctx, text_len=0), img, dim=1)
            state = slot.active()
            if state is None:  # not sharded in this forward (should not happen): run unchanged
                return run_block(args)
            out = run_block({**args, "img": img, "pe": _slice_pe(ctx, state, args["pe"])})
            if index == last:
                out = {**out, "img": ctx.gather(state, out["img"], dim=1)}
                slot.end()
            return out

        return patch

    def self_attention(attn: Any, original: Any, x: torch.Tensor, freqs_cis_img: Any = None) -> tuple[torch.Tensor]:
        if slot.active() is None:
            return original(x, freqs_cis_img)
        b, n, _ = x.shape
        qkv = attn.Wqkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, S_local, D)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if freqs_cis_img is not None:  # already sliced to the local rows by the block patch
            q, k = hydit_attn.apply_rotary_emb(q, k, freqs_cis_img, head_first=True)
        out = ctx.attention_override(hydit_attn.optimized_attention, q, k, v, attn.num_heads, skip_reshape=True,
                                     transformer_options=slot.options, attn_precision=attn.attn_precision)
        return (attn.proj_drop(attn.out_proj(out)),)

    for i in range(n_blocks):
        replace_block(patcher, "double_block", i, block_patch(i))
        patch_method(patcher, f"{MODEL}.blocks.{i}.attn1", self_attention)
