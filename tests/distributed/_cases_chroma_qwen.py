"""Rank-side code for Chroma and Qwen-Image: tiny fp32 models, cases, one-device references.

Same protocol as ``_cases.run_cases`` (every rank runs each case's plan through ``parallelize`` +
ComfyUI's ``comfy.sample.sample``; rank 0 then computes the one-device references in the same process,
after the parallel runs). The models are the tiny recipes of ``xdit_multigpu.testing.tiny_models_chroma_qwen``
built from their explicit unet_config through ComfyUI's own ``supported_models.Chroma`` / ``QwenImage``
(and ``ChromaRadiance``; detection hard-codes 3072-wide layouts), with fp32 weights from
``_cases._init_weights``. Chroma Radiance samples in pixel space with 16 x 16 patches: its cases use an
8x larger side, so ``case.size`` gives the same token grid for every family.

Variants (besides ``_cases``' ``neg_text`` / ``no_override``):

* ``mask`` (Chroma, Chroma Radiance): a full-square ``[txt | img]`` attention mask through ``attention_mask`` +
  ``attention_mask_img_shape`` (``model_base.Flux.extra_conds``, which Chroma inherits);
* ``ref`` / ``ref_odd`` (Qwen-Image): Qwen-Image-Edit reference latents appended to the image stream
  (``ref_odd``: 3 x 5 reference tokens, positive only -> uneven shards, cond / uncond of different length);
* ``control`` / ``control_ref`` (Qwen-Image): an InstantX-layout ``QwenImageControlNetModel`` through
  the stock ``ControlNetApplyAdvanced``; its residuals cover the first L image tokens only
  (``hidden_states[:, :add.shape[1]] += add``), so with ``control_ref`` (15 reference tokens appended)
  the split at token L falls inside a shard;
* ``text_replicated``: ``XDIT_SHARD_TEXT=0`` (text rows replicated on every rank instead of sharded);
* ``wrong_rope`` (negative control of the RoPE cut): every rank gets the image RoPE rows of sp rank 0.

Each case also records whether some forward sharded the text (``SequenceParallel.shard_text``).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from _cases import TEXT_LEN, Case, _init_weights, drop_sequence_attention, flux_mask, methods_restored


def build_model(name: str) -> Any:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    from xdit_multigpu.testing.tiny_models_chroma_qwen import CHROMA_RADIANCE_TINY, CHROMA_TINY, QWEN_IMAGE_TINY

    cls, config = {"chroma": (sm.Chroma, CHROMA_TINY), "chroma_radiance": (sm.ChromaRadiance, CHROMA_RADIANCE_TINY),
                   "qwen_image": (sm.QwenImage, QWEN_IMAGE_TINY)}[name]
    mc = cls(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    _init_weights(model.diffusion_model, seed=7)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conds(name: str, case: Case) -> tuple[list[Any], list[Any]]:
    import torch

    gen = torch.Generator().manual_seed(3)
    # Chroma (T5 only): CLIPTextEncode gives pooled_output None, and model_base.Flux reads the key
    base = {"pooled_output": None} if name.startswith("chroma") else {}
    pos = [[torch.randn(1, TEXT_LEN, 64, generator=gen), dict(base)]]
    neg = [[torch.randn(1, TEXT_LEN - 3 if case.variant == "neg_text" else TEXT_LEN, 64, generator=gen), dict(base)]]
    if case.variant == "mask":
        extra = {"attention_mask": flux_mask(case), "attention_mask_img_shape": (case.size // 2, case.size // 2)}
        pos, neg = [[c, {**d, **extra}] for c, d in pos], [[c, {**d, **extra}] for c, d in neg]
    if case.variant.startswith("control"):
        import nodes

        hint = torch.randn(1, case.size, case.size, 16, generator=gen)  # latent-space hint (no VAE)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, build_controlnet(name), hint,
                                                                    0.8, 0.0, 1.0)
    if case.variant in ("ref", "ref_odd", "control_ref"):
        h, w = (8, 8) if case.variant == "ref" else (6, 10)
        ref = torch.randn(1, 16, 1, h, w, generator=gen)  # a VAE-encoded image, Wan21 latent layout
        pos = [[c, {**d, "reference_latents": [ref]}] for c, d in pos]
        if case.variant == "ref":
            neg = [[c, {**d, "reference_latents": [ref]}] for c, d in neg]
    return pos, neg


def build_controlnet(name: str) -> Any:
    """A tiny ``comfy.controlnet.ControlNet`` around ComfyUI's ``QwenImageControlNetModel`` (2 blocks, fp32,
    seeded), as ``load_controlnet_qwen_instantx`` wraps it, minus the VAE: the hint is given in latent
    space and ``preprocess_image`` adds the frame axis the Wan21 latent has."""
    import comfy.controlnet
    import comfy.ldm.qwen_image.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import torch

    from xdit_multigpu.testing.tiny_models_chroma_qwen import QWEN_IMAGE_TINY

    assert name == "qwen_image", name
    dev = mm.get_torch_device()
    model = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        operations=comfy.ops.disable_weight_init, device=dev, dtype=torch.float32, **QWEN_IMAGE_TINY)
    _init_weights(model, seed=13)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, load_device=dev, manual_cast_dtype=None,
                                       extra_conds=[], preprocess_image=lambda a: a.unsqueeze(2))


def sample(patcher: Any, name: str, case: Case) -> Any:
    import comfy.sample
    import torch

    # 4-D empty latent: fix_empty_latent_channels makes it (1, 16, 1, H, W) for Qwen-Image (Wan21 format)
    # and (1, 3, H, W) for Chroma Radiance, whose "latent" is the image (8x the side: same token grid).
    side = case.size * PIXEL_SCALE.get(name, 1)
    latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(1, 16, side, side))
    seed = 42
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(name, case)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, case.steps, case.cfg_scale, case.sampler, "simple", pos, neg,
                                   latent, denoise=case.denoise, seed=seed, disable_pbar=True)


PIXEL_SCALE = {"chroma_radiance": 8}  # latent side per case.size unit (patch 16 instead of 8 x patch 2)
NEGATIVE = ("no_override", "wrong_rope")  # negative controls: must differ from the plain case's reference
SAME_AS_PLAIN = (*NEGATIVE, "text_replicated")  # variants whose one-device reference is the plain case's


def reference_key(case: Case) -> tuple[Any, ...]:
    return replace(case, variant="" if case.variant in SAME_AS_PLAIN else case.variant).reference_key


def image_tokens(case: Case) -> int:
    """Tokens of the largest sharded stream of the case (the cond with reference latents, if any)."""
    ref = {"ref": 16, "ref_odd": 15, "control_ref": 15}.get(case.variant, 0)
    return (case.size // 2) ** 2 + ref


def _wrong_rows(ctx: Any, state: Any, pe: Any, dim: int = 2) -> Any:
    """Negative control: this rank's text rows + the image rows of sp rank 0 on every rank."""
    import torch

    text = pe.shape[dim] - state.shard.full
    local_text = ctx.text_rows(state, pe.narrow(dim, 0, text), dim=dim)
    return torch.cat((local_text, pe.narrow(dim, text, state.shard.local)), dim=dim)


def _run_one(patched: Any, name: str, case: Case) -> Any:
    from xdit_multigpu.models import joint_rope

    if case.variant == "no_override":  # negative control: local-only attention must be caught
        drop_sequence_attention(patched)
    if case.variant != "wrong_rope":
        return sample(patched, name, case)
    saved = joint_rope.local_rows
    joint_rope.local_rows = _wrong_rows
    try:
        return sample(patched, name, case)
    finally:
        joint_rope.local_rows = saved


def _spy_shard_text() -> list[bool]:
    """A list that gets True whenever ``SequenceParallel.shard_text`` did shard (rank process only)."""
    from xdit_multigpu.parallel.sequence import SequenceParallel

    seen: list[bool] = []
    original = SequenceParallel.shard_text

    def spy(self: Any, state: Any, text: Any, dim: int = 1) -> Any:
        out = original(self, state, text, dim)
        if state.text_sharded:
            seen.append(True)
        return out

    SequenceParallel.shard_text = spy  # type: ignore[method-assign]
    return seen


def run_cases(rank: int, world: int, payload: tuple[str, list[Case]]) -> dict[str, Any]:
    """Rank entry: parallel runs for every case, then (rank 0) the one-device references."""
    import torch.distributed as dist
    from _harness import attention_notes, groups_for

    from xdit_multigpu.config import ParallelPlan
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.parallel.apply import parallelize
    from xdit_multigpu.parallel.hooks import OVERRIDE_KEY

    name, cases = payload
    notes = attention_notes()  # which attention path ran (see _harness)
    base = build_model(name)
    spec = lookup_config(base.model.model_config)
    assert spec is not None
    out: dict[str, Any] = {"parallel": [], "reference": {}, "times": [], "fallback": [], "spec": spec.name,
                           "text_sharded": []}
    sharded_text = _spy_shard_text()
    groups = None
    for case in cases:
        plan = ParallelPlan(*case.plan)
        groups = groups_for(plan, groups, rank, world)
        os.environ["XDIT_SHARD_TEXT"] = "0" if case.variant == "text_replicated" else "1"
        try:
            patched = parallelize(base, spec, plan, groups)  # reads the switch (Tuning.from_env)
        finally:
            os.environ.pop("XDIT_SHARD_TEXT")
        t0 = time.perf_counter()
        out["parallel"].append(_run_one(patched, name, case).numpy())
        out["times"].append(time.perf_counter() - t0)
        out["fallback"].append(any("all-gather" in n for n in notes))
        out["text_sharded"].append(bool(sharded_text))
        notes.clear()
        sharded_text.clear()
    dist.barrier()
    to = base.model_options.get("transformer_options", {})
    out["base_untouched"] = (OVERRIDE_KEY not in to and not to.get("patches") and not to.get("patches_replace")
                             and not any(base.wrappers.values()) and not base.object_patches)
    if rank == 0:
        for case in cases:
            key = reference_key(case)
            if key not in out["reference"]:
                out["reference"][key] = sample(base, name, replace(case, variant=key[-1])).numpy()
        out["methods_restored"] = methods_restored(base.model)
    return out
