"""Rank-side code of ``test_conditioning_features.py``: conditioning features built with ComfyUI's own
nodes (ConditioningSetArea / SetMask / Combine, ControlNetApplyAdvanced, ReferenceLatent's
``conditioning_set_values``) and sampled through ``parallelize`` + ``comfy.sample.sample``.

Payload ``(model_name, cases)``; every rank returns its latents, rank 0 then the one-device references
(same process, after the parallel runs) plus a "plain" reference (no feature) per size, so the test can
check that each feature really changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _cases import LATENT_CHANNELS, TEXT_LEN, _init_weights, build_model, conds

FLUX_ONLY = ("kontext", "kontext_odd", "kontext_control")


@dataclass(frozen=True)
class FeatureCase:
    plan: tuple[int, int, int]  # (cfg, ulysses, ring)
    feature: str
    size: int = 16  # latent side
    denoise: float = 1.0
    steps: int = 2
    cfg_scale: float = 2.5

    @property
    def reference_key(self) -> tuple[Any, ...]:
        feature = "control" if self.feature == "control_wrong_rows" else self.feature
        return (feature, self.size, self.denoise)


def _gen(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def build_controlnet(name: str) -> Any:
    """A tiny ComfyUI ``comfy.controlnet.ControlNet`` with random deterministic weights.

    Flux: XLabs-style ``comfy.ldm.flux.controlnet.ControlNetFlux`` (pixel hint, 1 double + 1 single block,
    so both ``control["input"]`` and ``["output"]`` are filled), as ``load_controlnet_flux_xlabs_mistoline``
    wraps it. SD3: ``comfy.cldm.mmdit.ControlNet`` (2 joint blocks, 16-channel hint) as
    ``load_controlnet_mmdit`` wraps it, minus the VAE: the hint is given in latent space (latent_format None).
    """
    import comfy.cldm.mmdit
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import torch

    from _cases import FLUX_CONFIG, SD3_CONFIG

    ops, dev = comfy.ops.disable_weight_init, mm.get_torch_device()
    if name == "flux":
        cfg = dict(FLUX_CONFIG, depth=1, depth_single_blocks=1)
        model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=ops, device=dev, dtype=torch.float32, **cfg)
        extra: dict[str, Any] = dict(extra_conds=["y", "guidance"])
    elif name == "hunyuan_dit_cn":  # as load_controlnet_hunyuandit wraps it, hint in latent space (no VAE)
        import comfy.ldm.hydit.controlnet

        from _cases import HYDIT_CN_CONFIG

        cfg = {k: v for k, v in HYDIT_CN_CONFIG.items() if k != "image_model"}
        model = comfy.ldm.hydit.controlnet.HunYuanControlNet(operations=ops, device=dev, dtype=torch.float32, **cfg)
        extra = dict(compression_ratio=1, extra_conds=["text_embedding_mask", "encoder_hidden_states_t5",
                                                       "text_embedding_mask_t5", "image_meta_size", "style",
                                                       "cos_cis_img", "sin_cis_img"])
    else:
        model = comfy.cldm.mmdit.ControlNet(num_blocks=2, control_latent_channels=16, operations=ops, device=dev,
                                            dtype=torch.float32, **SD3_CONFIG)
        extra = dict(compression_ratio=1)
    _init_weights(model, seed=13)
    return comfy.controlnet.ControlNet(model, load_device=dev, manual_cast_dtype=None, **extra)


def _hint(name: str, size: int) -> Any:
    """The IMAGE the Apply ControlNet node gets (B, H, W, C): pixels for Flux, a latent-space hint for SD3."""
    import torch

    if name == "flux":
        return torch.rand(1, size * 8, size * 8, 3, generator=_gen(21))
    return torch.randn(1, size, size, 4 if name.startswith("hunyuan") else 16, generator=_gen(21))


def _pixel_mask(size: int) -> Any:
    """A MASK (1, H, W) at pixel resolution: a soft-edged rectangle, resized by ComfyUI to the latent."""
    import torch

    px = size * 8
    mask = torch.zeros(1, px, px)
    mask[:, px // 4: px * 3 // 4 + 8, px // 8: px // 2 + 16] = 1.0
    mask[:, px // 4: px // 4 + 8] *= 0.5
    return mask


def feature_conds(name: str, case: FeatureCase, controlnet: Any) -> tuple[list[Any], list[Any]]:
    """Positive / negative CONDITIONING for ``case.feature``, built as the stock nodes build them."""
    import node_helpers
    import nodes
    import torch

    pos, neg = conds(name, size=case.size)
    f = case.feature
    if f in ("area", "area_odd"):  # full prompt + a second prompt on an area (odd: 6 x 10 latent)
        other = conds(name, size=case.size)[1]
        w, h, x, y = (64, 96, 32, 16) if f == "area" else (80, 48, 16, 32)
        pos = nodes.ConditioningCombine().combine(pos, nodes.ConditioningSetArea().append(other, w, h, x, y, 0.8)[0])[0]
    elif f in ("mask", "mask_bounds"):
        other = conds(name, size=case.size)[1]
        masked = nodes.ConditioningSetMask().append(other, _pixel_mask(case.size),
                                                    "default" if f == "mask" else "mask bounds", 0.9)[0]
        pos = nodes.ConditioningCombine().combine(pos, masked)[0]
    elif f == "combine":
        gen = _gen(5)
        extra = dict(pos[0][1], pooled_output=torch.randn(1, 32, generator=gen))
        pos = nodes.ConditioningCombine().combine(pos, [[torch.randn(1, TEXT_LEN, 64, generator=gen), extra]])[0]
    if f.startswith("kontext"):
        side = (6, 10) if f == "kontext_odd" else (8, 8)
        ref = torch.randn(1, LATENT_CHANNELS[name], *side, generator=_gen(17))
        pos = node_helpers.conditioning_set_values(pos, {"reference_latents": [ref]}, append=True)
    if f.startswith("control") or f == "kontext_control":
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, _hint(name, case.size),
                                                                    0.8, 0.0, 1.0)
    return pos, neg


def sample_feature(patcher: Any, name: str, case: FeatureCase, controlnet: Any) -> Any:
    import comfy.sample
    import torch

    channels = LATENT_CHANNELS.get(name, 4)
    shape = (1, channels, case.size, case.size)
    latent = torch.zeros(shape)
    noise_mask = None
    if case.feature == "inpaint":  # SetLatentNoiseMask: (B, 1, H, W) at pixel size, resized by ComfyUI
        latent = torch.randn(shape, generator=_gen(9))
        noise_mask = _pixel_mask(case.size).reshape(1, 1, case.size * 8, case.size * 8)
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, 42)
    pos, neg = feature_conds(name, case, controlnet)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, case.steps, case.cfg_scale, "euler", "simple", pos, neg, latent,
                                   denoise=case.denoise, noise_mask=noise_mask, seed=42, disable_pbar=True)


def _wrong_rows(add: Any, shard: Any, dim: int = 1) -> Any:
    """Negative control: every rank takes the *first* rows of the residual (right length, wrong rows)."""
    n = add.shape[dim]
    start = min(shard.offset, n)
    return add.narrow(dim, 0, max(0, min(shard.offset + shard.local, n) - start))


def run_feature_cases(rank: int, world: int, payload: tuple[str, list[FeatureCase]]) -> dict[str, Any]:
    """Rank entry: parallel runs of every case, then (rank 0) the one-device references."""
    import torch.distributed as dist

    import xdit_multigpu.parallel.control as control_mod
    from xdit_multigpu.config import ParallelPlan
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.parallel.apply import parallelize
    from _harness import groups_for

    name, cases = payload
    base = build_model(name)
    controlnet = build_controlnet(name)
    spec = lookup_config(base.model.model_config)
    assert spec is not None
    out: dict[str, Any] = {"parallel": [], "reference": {}, "plain": {}}
    groups = None
    right_rows = control_mod.residual_rows
    for case in cases:
        plan = ParallelPlan(*case.plan)
        groups = groups_for(plan, groups, rank, world)
        control_mod.residual_rows = _wrong_rows if case.feature == "control_wrong_rows" else right_rows
        try:
            out["parallel"].append(sample_feature(parallelize(base, spec, plan, groups), name, case, controlnet).numpy())
        finally:
            control_mod.residual_rows = right_rows
    dist.barrier()
    if rank == 0:
        for case in cases:
            if case.reference_key not in out["reference"]:
                out["reference"][case.reference_key] = sample_feature(base, name, case, controlnet).numpy()
            key = (case.size, case.denoise)
            if key not in out["plain"]:
                plain = FeatureCase((1, 1, 1), "plain", case.size, case.denoise)
                out["plain"][key] = sample_feature(base, name, plain, controlnet).numpy()
    return out


def case_id(name: str, world: int, case: FeatureCase) -> str:
    c, u, r = case.plan
    return f"{name}-w{world}-cfg{c}u{u}r{r}-{case.feature}-s{case.size}-d{case.denoise}"

