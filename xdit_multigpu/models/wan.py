"""Wan 2.1 / 2.2 text-to-video (ComfyUI's ``WanModel``, ``comfy/ldm/wan/model.py``) sequence parallel.

The latent is 5-D ``(B, C, T, H, W)``; ``patch_embedding`` (a Conv3d, patch ``(1, 2, 2)``) turns it into
``frames x rows x columns`` video tokens in that (row-major) order, and ``rope_encode`` builds one RoPE
row per video token (3 axes: frame, row, column). Each ``WanAttentionBlock`` runs

* self-attention over the video tokens (``WanSelfAttention``: ``optimized_attention(q, k, v, heads,
  transformer_options=...)``, ``(B, S, H*D)`` layout, RoPE already applied): sharded, done by the
  generic attention override (image-only attention: T = 0);
* cross-attention to the text (``WanT2VCrossAttention``): queries are the local video tokens, keys /
  values the whole text on every rank -- no communication at all. It is told apart from
  self-attention explicitly: the override only sees shapes, and a rank holding exactly as many video
  tokens as the text has (512 for umT5) would look like a self-attention. So the cross-attention
  module is object-patched to run with ``transformer_options`` minus the sequence state.

Hooks, in the order a forward meets them:

1. ``("double_block", i)`` replace for EVERY block (``forward_orig`` offers them; args ``img, txt,
   vec, pe, transformer_options``): block 0 opens the ``SequenceState`` in ``transformer_options`` and
   shards ``img`` (all video tokens, incl. a Fun reference-latent token block in front). Every block
   gets its ``pe`` rows sliced, and ``vec`` when it is per frame / per token (Wan 2.2 with a
   ``denoise_mask``: ``e0`` is ``(B, F, 6, dim)`` and ``repeat_e`` spreads it over the tokens; it is
   spread to full tokens first, then sliced). The last block gathers ``img``, so ``head`` and
   ``unpatchify`` see the full video on every rank.
2. ``blocks.{i}.cross_attn.forward`` object patch (bound method via ``ModelPatcher.add_object_patch``;
   state-dict keys unchanged): the original forward with the state hidden.
3. A ``DIFFUSION_MODEL`` wrapper removes the state before and after every forward.

Only T2V layouts are accepted (``model_type == "t2v"``: Wan 2.1 T2V, Wan 2.2 A14B T2V, Wan 2.2 TI2V
5B); I2V / VACE / camera / S2V / HuMo / Animate classes are not registered, so the loader node
refuses them before any worker starts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.hooks import BlockArgs, RunBlock, install_attention_override, patch_method, replace_block
from ..parallel.sequence import STATE_KEY, SequenceParallel, SequenceState, state_of

MODEL = "diffusion_model"
WRAPPER_KEY = "xdit_multigpu.wan_sequence_parallel"


def _check_supported(dm: Any) -> int:
    """Number of blocks; raises UnsupportedModelError for a non-T2V Wan layout or an empty model."""
    kind = getattr(dm, "model_type", None)
    if kind != "t2v" or type(dm).__name__ != "WanModel":
        raise UnsupportedModelError(
            "model", f"this Wan model ({type(dm).__name__}, model_type {kind!r}) is not a text-to-video layout",
            "Use a Wan 2.1 / 2.2 T2V model, or ComfyUI's stock KSampler")
    if len(dm.blocks) == 0:
        raise UnsupportedModelError("model", "this Wan model has no transformer blocks", "Use one device")
    return len(dm.blocks)


def local_vec(ctx: SequenceParallel, state: SequenceState, vec: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the block modulation ``e0``: ``(B, 1, 6, dim)`` stays as it is; per-frame or
    per-token ``(B, N, 6, dim)`` is first spread over all tokens exactly as ComfyUI's ``repeat_e`` does
    (``repeat_interleave`` by ``tokens // N``, one more and truncated when it does not divide)."""
    assert state.shard is not None
    n, full = vec.shape[1], state.shard.full
    if vec.ndim < 4 or n == 1:
        return vec
    if n != full:
        reps = full // n
        vec = vec.repeat_interleave(reps if reps * n == full else reps + 1, dim=1)[:, :full]
    return ctx.slice_like(state, vec, dim=1)


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install Wan T2V sequence parallel on ``patcher`` (a clone). See the module docstring."""
    n_blocks = _check_supported(patcher.model.diffusion_model)  # refuses before anything is imported / touched
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    last = n_blocks - 1

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("transformer_options")
        if options is None and len(args) > 5 and isinstance(args[5], dict):  # positional (x, t, ctx, clip, tdc, to)
            options = args[5]
        options = options if options is not None else {}
        options.pop(STATE_KEY, None)
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(STATE_KEY, None)

    def block_patch(index: int) -> Any:
        def patch(args: BlockArgs, run_block: RunBlock) -> BlockArgs:
            options = args["transformer_options"]
            img = args["img"]
            if index == 0:
                img = ctx.shard(ctx.begin(options, text_len=0), img, dim=1)
            state = state_of(options)
            if state is None or not state.active:  # not sharded in this forward: run unchanged
                return run_block(args)
            pe = args["pe"]
            local = {**args, "img": img, "vec": local_vec(ctx, state, args["vec"]),
                     "pe": ctx.slice_like(state, pe, dim=1) if pe is not None else None}
            out = run_block(local)
            if index == last:
                out = {**out, "img": ctx.gather(state, out["img"], dim=1)}
                options.pop(STATE_KEY, None)
            return out

        return patch

    def cross_attention(attn: Any, original: Any, x: torch.Tensor, context: torch.Tensor,
                        transformer_options: Any = None, **kwargs: Any) -> torch.Tensor:
        options = transformer_options if transformer_options is not None else {}
        if STATE_KEY in options:  # local queries x whole text: plain attention, never the sequence path
            options = {k: v for k, v in options.items() if k != STATE_KEY}
        return original(x, context, transformer_options=options, **kwargs)

    install_attention_override(patcher, ctx.attention_override)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model)
    for i in range(n_blocks):
        replace_block(patcher, "double_block", i, block_patch(i))
        patch_method(patcher, f"{MODEL}.blocks.{i}.cross_attn", cross_attention)
