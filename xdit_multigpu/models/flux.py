"""Flux.1 sequence parallel through ComfyUI extension points (``comfy/ldm/flux/model.py``).

Hooks, in the order a forward meets them:

1. ``DIFFUSION_MODEL`` wrapper: starts the per-forward ``SequenceState`` (text length T =
   ``context.shape[1]``) and makes it visible to the ``post_input`` patch, which gets no
   ``transformer_options``.
2. ``post_input`` patch (after ``img_in``/``txt_in``, before ``pe = pe_embedder(cat(txt_ids, img_ids))``):
   shards ``img`` and ``img_ids`` so the RoPE table is sharded with them. Reference-latent (Kontext)
   tokens are part of ``img`` and are sharded too. Without an attention mask, ``txt`` / ``txt_ids`` are
   sharded as well when T divides (``SequenceParallel.shard_text``): every block then runs T/sp text
   rows; ``forward_orig`` slices ``img[:, txt.shape[1]:]`` with the local T, matching the gather below.
3. Attention override: every double / single block attends over ``[txt | local img]``, q/k/v
   ``(B, H, S, D)`` with RoPE applied (``skip_reshape=True``). Flux's optional full-square
   ``attn_mask`` forces the exact all-gather path with its rows sliced.
4. ``("single_block", last)`` replace: gathers the image tokens after the last single block (or after
   the last double block when there are no single blocks), so ``final_layer`` and the unpatchify run
   on the full sequence, identically on every rank.

Conditioning features: Kontext reference latents are appended to ``img`` / ``img_ids`` by ``_forward``
before ``post_input``, so the split covers ``L + R`` tokens (uneven when needed); the gather restores
all of them and ``_forward`` trims ``out[:, :img_tokens]`` as on one device. ControlNet residuals
(``control["input"][i]`` after double block i, ``["output"][i]`` after single block i, each covering the
first L image tokens) are handed out as local rows by the generic APPLY_MODEL wrapper
(``parallel/control.py``); the one added after the gathering block is handed out whole.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.hooks import install_attention_override, replace_block
from ..parallel.sequence import STATE_KEY, SequenceParallel, SequenceState, state_of

WRAPPER_KEY = "xdit_multigpu.flux_sequence_parallel"


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install Flux sequence parallel on ``patcher`` (a clone). See the module docstring."""
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    dm = patcher.model.diffusion_model
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    if getattr(getattr(dm, "params", None), "global_modulation", False):
        raise UnsupportedModelError("model", "Flux 2 layouts are not supported by the Flux.1 hooks", "Use CFG parallel")
    # The forward in flight. post_input patches receive no transformer_options, so the wrapper hands the
    # state over here; one ModelPatcher samples one thing at a time in a worker.
    current: list[SequenceState | None] = [None]
    text_ok = [False]  # no attention mask in this forward: the text may be sharded

    def diffusion_model(executor: Any, x: torch.Tensor, timestep: Any, context: torch.Tensor, y: Any, guidance: Any,
                        ref_latents: Any, control: Any, transformer_options: dict[str, Any], **kwargs: Any) -> Any:
        current[0] = ctx.begin(transformer_options, text_len=context.shape[1])
        text_ok[0] = kwargs.get("attention_mask") is None
        try:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        finally:
            current[0] = None
            transformer_options.pop(STATE_KEY, None)

    def post_input(args: dict[str, Any]) -> dict[str, Any]:
        state = current[0]
        if state is None:
            return args
        state.text_len = args["txt"].shape[1]  # authoritative: after any earlier post_input patch
        img = ctx.shard(state, args["img"], dim=1)
        ids = args["img_ids"]
        ids = ctx.slice_like(state, ids, dim=1) if ids is not None else None
        txt, txt_ids = args["txt"], args["txt_ids"]
        if text_ok[0] and txt_ids is not None:  # pe = cat(txt_ids, img_ids) must follow both shards
            txt = ctx.shard_text(state, txt, dim=1)
            txt_ids = ctx.text_rows(state, txt_ids, dim=1)
        return {**args, "img": img, "img_ids": ids, "txt": txt, "txt_ids": txt_ids}

    def gather_after(args: dict[str, Any], run_block: Any) -> dict[str, Any]:
        out = run_block(args)
        state = state_of(args.get("transformer_options"))
        if state is None or not state.active:
            return out
        img = out["img"]
        t = state.text_len if n_single else 0  # single blocks carry [txt | img]; double blocks img only
        out["img"] = torch.cat((img[:, :t], ctx.gather(state, img[:, t:], dim=1)), dim=1)
        return out

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model)
    patcher.set_model_post_input_patch(post_input)
    install_attention_override(patcher, ctx.attention_override)
    if n_single:
        replace_block(patcher, "single_block", n_single - 1, gather_after)
    elif n_double:
        replace_block(patcher, "double_block", n_double - 1, gather_after)
    else:
        raise UnsupportedModelError("model", "this Flux model has no transformer blocks", "Use one device")
