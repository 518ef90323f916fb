"""SD3 / SD3.5 (MMDiT, MMDiT-X) sequence parallel through ComfyUI extension points
(``comfy/ldm/modules/diffusionmodules/mmdit.py``; MMDiT has no ``DIFFUSION_MODEL`` wrapper).

Hooks:

1. ``("double_block", 0)`` replace: starts the per-forward ``SequenceState`` with T = ``txt.shape[1]``
   (register tokens included: they are prepended to the context before the blocks) and shards
   ``img``, and ``txt`` too when T divides (``shard_text``; the last block's context output is None,
   so it is never gathered). Positional embeddings were added at the input, so nothing else needs
   slicing.
2. Attention override: ``_block_mixing`` attends over ``cat(context, x)`` in ``(B, S, H*D)`` layout
   (no ``skip_reshape``): ``S == T + L_local``. SD3.5's MMDiT-X x-block self-attention (``attn2``) runs
   over the image alone: ``S == L_local``. Both are told apart by length (they coincide only if T == 0).
3. ``("double_block", last)`` replace: gathers ``out["img"]`` after the last block (``pre_only``: its
   ``txt`` output is None), so ``final_layer`` and ``unpatchify`` see the full image on every rank.

ControlNet: ``control["output"][i]`` is added (``x += add``) after joint block i; the generic APPLY_MODEL
wrapper (``parallel/control.py``) hands out this rank's rows while the image is sharded, whole after
the gather.

SD3.5-Large has 38 heads: Ulysses 2 (or 19); put the rest on ring.
"""

from __future__ import annotations

from typing import Any

from ..parallel.hooks import install_attention_override, replace_block
from ..parallel.sequence import STATE_KEY, SequenceParallel, state_of


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install SD3 sequence parallel on ``patcher`` (a clone). See the module docstring."""
    n_blocks = len(patcher.model.diffusion_model.joint_blocks)
    last = n_blocks - 1

    def shard_first(args: dict[str, Any], run_block: Any) -> dict[str, Any]:
        to = args["transformer_options"]
        txt = args["txt"]
        state = ctx.begin(to, text_len=0 if txt is None else txt.shape[1])
        img = ctx.shard(state, args["img"], dim=1)
        if txt is not None:  # per-token context layers on T/sp rows; the context is never gathered
            txt = ctx.shard_text(state, txt, dim=1)
        out = run_block({**args, "img": img, "txt": txt})
        return gather_last(out, to) if last == 0 else out

    def gather_last(out: dict[str, Any], to: dict[str, Any]) -> dict[str, Any]:
        state = state_of(to)
        if state is not None and state.active:
            out["img"] = ctx.gather(state, out["img"], dim=1)
            to.pop(STATE_KEY, None)
        return out

    def last_block(args: dict[str, Any], run_block: Any) -> dict[str, Any]:
        return gather_last(run_block(args), args["transformer_options"])

    install_attention_override(patcher, ctx.attention_override)
    replace_block(patcher, "double_block", 0, shard_first)
    if last > 0:
        replace_block(patcher, "double_block", last, last_block)
