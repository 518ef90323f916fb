"""Qwen-Image (and Qwen-Image-Edit) sequence parallel through ComfyUI extension points
(``comfy/ldm/qwen_image/model.py``; ComfyUI f8b981ae).

Every ``QwenImageTransformerBlock`` is a dual-stream (MMDiT-like) block: separate image / text
projections and MLPs, one joint attention over ``[txt | img]`` (``Attention.forward`` calls
``optimized_attention_masked(..., transformer_options=..., skip_reshape=True)``, so the attention
override reaches it). Hooks:

1. ``("double_block", i)`` replace on every block (args ``img, txt, vec, pe, transformer_options``):
   block 0 starts the per-forward ``SequenceState`` (T = ``txt.shape[1]``), shards ``img`` and, when T
   divides, ``txt`` (``shard_text``: the text projections / MLPs run T/sp rows; the text stream is never
   gathered, nothing after the blocks reads it); every block gets ``pe`` -- the RoPE table of
   ``cat(txt_ids, img_ids)``, ``(B, 1, T + L, D/2, 2, 2)``, built once for the full sequence -- cut to
   this rank's text rows plus its image rows (``joint_rope``). The text mask is unused by the blocks'
   attention in this ComfyUI (below), so it does not stop the text split.
2. Attention override: joint attention over ``[txt | local img]``, q/k/v ``(B, H, S, D)``. The text
   mask (``encoder_hidden_states_mask``) is not passed to the attention by this ComfyUI (mask None).
3. The last block gathers ``img`` (inside its replace, before ``norm_out`` / ``proj_out``), so the
   final layer, the ``[:, :num_embeds]`` trim and the unpatchify see the full stream on every rank.

Token-index splits in the stream, and why each stays correct per rank:

* Modulation: ``temb`` is per sample ``(B, dim)`` in this ComfyUI (``_modulate`` unsqueezes it over all
  tokens), so every local token gets the same modulation as on one device. Later ComfyUI versions
  modulate tokens after an index (``timestep_zero_index``, Qwen-Image-Edit-2511) differently; the block
  signature is pinned (tests/comfy/test_host_pins_chroma_qwen.py) and an unknown block argument makes
  the installer refuse instead of splitting at a global index on local rows.
* Reference latents (Qwen-Image-Edit): ``_forward`` appends them to the image stream before block 0
  (``L + R`` tokens, each with its own ``index`` in ``img_ids``); they are sharded with the image and
  the gather restores all of them before ``hidden_states[:, :num_embeds]`` drops them again.
* ControlNet (InstantX layout): after block i, ``hidden_states[:, :add.shape[1]] += add`` covers the
  first L tokens only (the ControlNet sees no reference latents). The spec declares
  ``control_residuals``: the generic APPLY_MODEL wrapper (``parallel/control.py``) hands each rank the
  rows ``[offset, min(offset + local, L))`` of ``add`` -- a prefix of its shard, empty on a rank that
  holds only reference tokens -- and the whole residual after the gather in the last block.
* ``patches["double_block"]`` (e.g. DiffSynth ControlNet model patches) see the full ``x`` and add to
  the image stream per block: refused at sampling time while the stream is sharded.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import UnsupportedModelError
from ..parallel.hooks import BlockArgs, RunBlock, install_attention_override, replace_block
from ..parallel.sequence import STATE_KEY, SequenceParallel, state_of
from .joint_rope import JointRope

# QwenImageTransformerBlock.forward's parameters this installer was written against (after self).
BLOCK_PARAMS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb",
                "image_rotary_emb", "transformer_options")


def _check_layout(dm: Any) -> int:
    blocks = getattr(dm, "transformer_blocks", None)
    if not blocks:
        raise UnsupportedModelError("model", "this Qwen-Image model has no transformer blocks", "Use one device")
    params = tuple(inspect.signature(type(blocks[0]).forward).parameters)[1:]
    if params != BLOCK_PARAMS:
        raise UnsupportedModelError(
            "parallel_strategy",
            f"Qwen-Image sequence parallel was written for blocks taking {BLOCK_PARAMS}; this ComfyUI's take "
            f"{params} (e.g. per-token modulation split at a token index), which the image shards would break",
            "Use CFG parallel, or update xDiT Multi-GPU",
        )
    return len(blocks)


def _refuse_block_patches(transformer_options: dict[str, Any]) -> None:
    if transformer_options.get("patches", {}).get("double_block"):
        raise UnsupportedModelError(
            "parallel_strategy",
            "Qwen-Image model patches on double_block (e.g. DiffSynth ControlNet) need the whole image stream",
            "Use CFG parallel (or one device) with this model patch",
        )


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install Qwen-Image sequence parallel on ``patcher`` (a clone). See the module docstring."""
    last = _check_layout(patcher.model.diffusion_model) - 1
    rope = JointRope(ctx)

    def block(index: int) -> Any:
        def patch(args: BlockArgs, run_block: RunBlock) -> BlockArgs:
            to = args["transformer_options"]
            img, txt = args["img"], args["txt"]
            if index == 0:
                _refuse_block_patches(to)
                state = ctx.begin(to, text_len=txt.shape[1])
                img = ctx.shard(state, img, dim=1)
                txt = ctx.shard_text(state, txt, dim=1)
            state = state_of(to)
            if state is None or not state.active:  # not sharded in this forward: run unchanged
                return run_block(args)
            out = run_block({**args, "img": img, "txt": txt, "pe": rope.local(state, args["pe"])})
            if index == last:
                out = {**out, "img": ctx.gather(state, out["img"], dim=1)}
                rope.clear()
                to.pop(STATE_KEY, None)
            return out

        return patch

    install_attention_override(patcher, ctx.attention_override)
    for i in range(last + 1):
        replace_block(patcher, "double_block", i, block(i))
