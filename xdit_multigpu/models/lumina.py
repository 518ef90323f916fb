"""Lumina 2 / Z-Image (ComfyUI's ``NextDiT``, ``comfy/ldm/lumina/model.py``) sequence parallel.

``NextDiT.patchify_and_embed`` builds, in this order: the caption tokens (padded to a multiple by
``cap_pad_token`` on Z-Image), the image tokens (padded the same way by ``x_pad_token``), one RoPE table
``freqs_cis`` over ``[caption | image]`` (3 axes: caption index, row, column), then runs

* ``context_refiner`` blocks: caption-only self-attention (with the caption mask): NOT sharded, every
  rank runs them whole (cheap; the caption is replicated as in every family);
* ``noise_refiner`` blocks: image-only self-attention, RoPE ``freqs_cis[:, T:]``: sharded;
* ``layers``: joint self-attention over ``cat(caption, image)`` with the full ``freqs_cis``: caption
  replicated, image tokens sharded.

Every ``JointTransformerBlock.forward(x, x_mask, freqs_cis, adaln_input, transformer_options)`` receives
``transformer_options`` and its attention calls ``optimized_attention_masked(..., skip_reshape=True,
transformer_options=...)``, so the generic attention override does the distributed attention. No block
replace exists in NextDiT, so the blocks are hooked with bound-method object patches
(``ModelPatcher.add_object_patch``; parameters and state-dict keys unchanged, LoRA keeps working):

1. ``noise_refiner.0``: opens the per-forward ``SequenceState`` in ``transformer_options`` (T = 0:
   image-only attention) and shards ``x`` -- every image token, padding tokens included (they are
   attended unmasked on one device too). Every noise-refiner block gets its RoPE rows sliced.
2. ``layers.i``: ``x`` arrives as ``[caption (T, whole) | local image]``; T = ``freqs_cis`` rows minus
   the image tokens. Layer 0 sets the state's text length to T and, when T divides over the ranks and
   the image shards are even (``SequenceParallel.shard_text``; Z-Image pads captions to 32, so always
   at sp 2 / 4 / 8), shards the caption rows too: per-token layers then run T/sp caption rows and
   attention takes the uniform (fused Ulysses) path. The RoPE table becomes ``[this rank's caption
   rows | its image rows]``. The last layer gathers the caption rows (if sharded) and the image rows,
   so ``norm_final``, ``final_layer`` and ``unpatchify`` (which skips exactly T caption rows) see the
   full stream on every rank.
3. A ``DIFFUSION_MODEL`` wrapper removes the state before and after every forward, so the caption
   refiner never sees a live state (not even after a forward that raised).

The refiners attention calls ``x_mask`` is None for image tokens and the joint layers (ComfyUI passes
``mask=None`` there), so the USP path applies; the caption mask only reaches the unsharded caption
refiner.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..parallel.comm import all_gather_uneven
from ..parallel.hooks import install_attention_override, patch_method
from ..parallel.sequence import STATE_KEY, SequenceParallel, SequenceState, state_of
from .joint_rope import local_rows

MODEL = "diffusion_model"
WRAPPER_KEY = "xdit_multigpu.lumina_sequence_parallel"


def _live(transformer_options: Any) -> SequenceState | None:
    state = state_of(transformer_options)
    return state if state is not None and state.active else None


class _JointRope:
    """``[this rank's caption rows | its image rows]`` of one forward's ``freqs_cis`` (token dim 1),
    computed once per forward: every joint layer receives the same tensor."""

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.local: torch.Tensor | None = None

    def get(self, ctx: SequenceParallel, state: SequenceState, freqs: torch.Tensor) -> torch.Tensor:
        if self.source is not freqs or self.local is None:
            self.source, self.local = freqs, local_rows(ctx, state, freqs, dim=1)
        return self.local


def install_sequence_parallel(patcher: Any, ctx: SequenceParallel) -> None:
    """Install NextDiT sequence parallel on ``patcher`` (a clone). See the module docstring."""
    dm = patcher.model.diffusion_model
    n_refiner, n_layers = len(dm.noise_refiner), len(dm.layers)
    if n_refiner == 0 or n_layers == 0:
        raise UnsupportedModelError(
            "model", f"this NextDiT has {n_refiner} noise-refiner and {n_layers} joint layers; sequence parallel "
            "shards the image at the first noise-refiner block", "Choose CFG parallel for this model")
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    last = n_layers - 1
    rope = _JointRope()

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("transformer_options") or {}
        options.pop(STATE_KEY, None)
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(STATE_KEY, None)
            rope.source = rope.local = None

    def noise_refiner(index: int) -> Any:
        def block(module: Any, original: Any, x: torch.Tensor, x_mask: Any, freqs_cis: torch.Tensor,
                  adaln_input: Any = None, transformer_options: Any = None) -> torch.Tensor:
            options = transformer_options if transformer_options is not None else {}
            if index == 0:
                x = ctx.shard(ctx.begin(options, text_len=0), x, dim=1)
            state = _live(options)
            if state is not None:
                freqs_cis = ctx.slice_like(state, freqs_cis, dim=1)
            return original(x, x_mask, freqs_cis, adaln_input, transformer_options=options)

        return block

    def joint_layer(index: int) -> Any:
        def block(module: Any, original: Any, x: torch.Tensor, x_mask: Any, freqs_cis: torch.Tensor,
                  adaln_input: Any = None, transformer_options: Any = None) -> torch.Tensor:
            options = transformer_options if transformer_options is not None else {}
            state = _live(options)
            if state is None or state.shard is None:
                return original(x, x_mask, freqs_cis, adaln_input, transformer_options=options)
            if index == 0:  # x = [caption (T, incl. padding, whole) | local image]
                state.text_len = freqs_cis.shape[1] - state.shard.full
                if x_mask is None:  # shard the caption too when T divides (ctx.shard_text decides)
                    t = state.text_len
                    x = torch.cat((ctx.shard_text(state, x[:, :t], dim=1), x[:, t:]), dim=1)
            out = original(x, x_mask, rope.get(ctx, state, freqs_cis), adaln_input, transformer_options=options)
            if index == last:
                out = gather(state, out)
                options.pop(STATE_KEY, None)
            return out

        return block

    def gather(state: SequenceState, out: torch.Tensor) -> torch.Tensor:
        """``[caption | image]`` whole on every rank: ``unpatchify`` skips exactly T caption rows."""
        t = state.text_len
        text = out[:, :t]
        if state.text_sharded:
            text = all_gather_uneven(text.contiguous(), 1, (t,) * ctx.size, ctx.groups.sp)
        return torch.cat((text, ctx.gather(state, out[:, t:], dim=1)), dim=1)

    install_attention_override(patcher, ctx.attention_override)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model)
    for i in range(n_refiner):
        patch_method(patcher, f"{MODEL}.noise_refiner.{i}", noise_refiner(i))
    for i in range(n_layers):
        patch_method(patcher, f"{MODEL}.layers.{i}", joint_layer(i))
