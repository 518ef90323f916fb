"""Chroma and Chroma Radiance sequence parallel through ComfyUI extension points
(``comfy/ldm/chroma/model.py``, ``comfy/ldm/chroma_radiance/model.py``).

Chroma Radiance inherits Chroma's ``forward_orig`` (its ``img_in`` is a 16 x 16 patch convolution, its
``_forward`` builds the same ids): the hooks below shard and gather its transformer exactly as Chroma's;
its per-patch NeRF pixel head (``forward_nerf``) then runs on the gathered tokens, whole, on every rank.

Chroma runs Flux's own ``DoubleStreamBlock`` / ``SingleStreamBlock`` (``modulation=False``: every
block's modulation comes from the distilled "approximator", per sample, not per token) and Flux's
attention (``comfy.ldm.flux.math.attention``, which passes ``transformer_options`` on), so the attention
override and the gather are Flux's. Flux's installer itself does not fit: Chroma's ``forward_orig`` has
no ``post_input`` patch (the point where Flux shards ``img`` / ``img_ids`` before the RoPE table is
built) and its ``DIFFUSION_MODEL`` wrapper has another signature. The split is done in the ``"dit"``
block replaces instead, as for HunyuanDiT:

1. ``("double_block", i)`` replace on every double block (args ``img, txt, vec, pe, attn_mask,
   transformer_options``): block 0 starts the per-forward ``SequenceState`` (T = ``txt.shape[1]``),
   shards ``img`` and, without an ``attn_mask``, ``txt`` too when T divides (``shard_text``: the text
   MLPs / projections then run T/sp rows; text is never gathered -- ``forward_orig`` cuts
   ``img[:, txt.shape[1]:]`` with the local T, matching the gather below); every block gets ``pe`` --
   the RoPE table of the full ``[txt | img]`` sequence, ``(B, 1, T + L, D/2, 2, 2)`` -- cut to this
   rank's text rows plus its image rows (``joint_rope``).
2. ``("single_block", i)`` replace on every single block: the stream is ``[local txt | local img]``
   (the forward concatenates the already local ``txt`` and ``img``); same ``pe`` rows.
3. Attention override: joint attention over ``[txt | local img]``, q/k/v ``(B, H, S, D)``
   (``skip_reshape=True``); an ``attn_mask`` (full square) takes the exact all-gather path with its rows
   sliced, as for Flux.
4. The last single block gathers the image rows, so ``img[:, T:]``, ``final_layer`` and the unpatchify
   see the full image on every rank.

Refused (``UnsupportedModelError``, CFG parallel still works): ``skip_mmdit`` / ``skip_dit`` lists (a
skipped block 0 / last block would never shard / gather), ``flipped_img_txt`` blocks (``[img | txt]``
order), no double or no single blocks. ControlNet under sequence parallel is refused by the generic
APPLY_MODEL guard (``control_residuals`` is not declared: no tiny Chroma ControlNet to prove it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.hooks import BlockArgs, RunBlock, install_attention_override, replace_block
from ..parallel.sequence import STATE_KEY, SequenceParallel, state_of
from .joint_rope import JointRope


def _check_layout(dm: Any) -> tuple[int, int]:
    """(double, single) block counts, or UnsupportedModelError for layouts the hooks cannot split."""
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    why = ""
    if getattr(dm, "skip_mmdit", None) or getattr(dm, "skip_dit", None):
        why = "blocks are skipped (skip_mmdit / skip_dit)"
    elif any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
        why = "its double blocks put the image before the text (flipped_img_txt)"
    elif n_double == 0 or n_single == 0:
        why = f"it has {n_double} double and {n_single} single blocks (both kinds are needed)"
    if why:
        raise UnsupportedModelError("parallel_strategy", f"Chroma sequence parallel: {why}", "Use CFG parallel")
    return n_double, n_single


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install Chroma sequence parallel on ``patcher`` (a clone). See the module docstring."""
    n_double, n_single = _check_layout(patcher.model.diffusion_model)
    rope = JointRope(ctx)

    def double_block(index: int) -> Any:
        def patch(args: BlockArgs, run_block: RunBlock) -> BlockArgs:
            to = args["transformer_options"]
            img, txt = args["img"], args["txt"]
            if index == 0:
                state = ctx.begin(to, text_len=txt.shape[1])
                img = ctx.shard(state, img, dim=1)
                if args.get("attn_mask") is None:  # a full-square mask needs every text row (exact path)
                    txt = ctx.shard_text(state, txt, dim=1)
            state = state_of(to)
            if state is None or not state.active:  # not sharded in this forward: run unchanged
                return run_block(args)
            return run_block({**args, "img": img, "txt": txt, "pe": rope.local(state, args["pe"])})

        return patch

    def single_block(index: int) -> Any:
        def patch(args: BlockArgs, run_block: RunBlock) -> BlockArgs:
            to = args["transformer_options"]
            state = state_of(to)
            if state is None or not state.active:
                return run_block(args)
            out = run_block({**args, "pe": rope.local(state, args["pe"])})
            if index == n_single - 1:  # [local txt | local img] -> [local txt | full img]
                img, t = out["img"], state.text_len
                out = {**out, "img": torch.cat((img[:, :t], ctx.gather(state, img[:, t:], dim=1)), dim=1)}
                rope.clear()
                to.pop(STATE_KEY, None)
            return out

        return patch

    install_attention_override(patcher, ctx.attention_override)
    for i in range(n_double):
        replace_block(patcher, "double_block", i, double_block(i))
    for i in range(n_single):
        replace_block(patcher, "single_block", i, single_block(i))
