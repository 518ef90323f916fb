"""Rank-side code of the distributed tests: tiny fp32 models, sampling cases, one-device references.

A payload is ``(model_name, cases)``. Every rank builds the same tiny model (seeded weights), runs each
case's plan through ``ParallelGroups.build`` + ``parallelize`` + ComfyUI's own ``comfy.sample.sample``
and returns its latents as numpy arrays. Rank 0 then computes the one-device references *in the same
process, after the parallel runs* (so leaked global state would show up as a mismatch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

TEXT_LEN = 8


@dataclass(frozen=True)
class Case:
    plan: tuple[int, int, int]  # (cfg, ulysses, ring)
    sampler: str = "euler"
    denoise: float = 1.0
    cfg_scale: float = 2.5
    size: int = 16  # latent height = width
    steps: int = 2
    variant: str = ""  # "", "mask", "no_override" (negative control), "neg_text" (uneven text lengths)
    attention: str = "yunchang"  # AttentionBackend value of the plan

    @property
    def reference_key(self) -> tuple[Any, ...]:
        variant = "" if self.variant == "no_override" else self.variant
        return (self.sampler, self.denoise, self.cfg_scale, self.size, self.steps, variant)


FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                   hidden_size=128, mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
SD3_CONFIG = dict(in_channels=16, out_channels=16, patch_size=2, depth=4, input_size=None, adm_in_channels=32,
                  context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}},
                  num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, qk_norm="rms",
                  x_block_self_attn_layers=[0, 1], register_length=1)
# PixArt-Σ / -α (``PixArtMS``): 4 heads x 32, 2 blocks, caption width 64; sides >= 40 latent px keep
# ``pe_interpolation = round(c_res / 64)`` >= 1; α: micro-conditions need hidden % 3 == 0.
# ``pixart_kv``: KV compression (sr_ratio 2 in block 1), only built to check that SP refuses it.
PIXART_CONFIG = dict(image_model="pixart_sigma", num_heads=4, patch_size=2, hidden_size=128, in_channels=4, depth=2,
                     caption_channels=64, model_max_length=TEXT_LEN, micro_condition=False)
PIXART_ALPHA_CONFIG = dict(PIXART_CONFIG, image_model="pixart_alpha", micro_condition=True, hidden_size=192, num_heads=6)
PIXART_KV_CONFIG = dict(PIXART_CONFIG, kv_compress_config={"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]})
# HunyuanDiT: 4 heads x 32, 4 blocks (long skips into blocks 3), CLIP / mT5 text both 64 wide.
HYDIT_CONFIG = dict(image_model="hydit", depth=4, hidden_size=128, num_heads=4, in_channels=4, patch_size=2,
                    text_states_dim=64, text_states_dim_t5=64, text_len=TEXT_LEN, text_len_t5=6)
HYDIT_T5_LEN = 6
HYDIT_CN_CONFIG = dict(HYDIT_CONFIG, depth=40, hidden_size=64)
LATENT_CHANNELS = {"flux": 16, "sd3": 16}  # everything else: 4
# EPS / V models sample from sigma ~ 15: damp the output layer so final latents stay O(10) and an fp32
# mismatch of a few ulps stays far below the 1e-4 tolerance (random weights otherwise give |x| ~ 1e3-1e4).
OUTPUT_LAYER = {"sdxl": ("out.2", 0.3), "pixart": ("final_layer.linear", 0.1),
                "pixart_alpha": ("final_layer.linear", 0.1), "hunyuan_dit": ("final_layer.linear", 0.3),
                "hunyuan_dit_cn": ("final_layer.linear", 0.3)}


def _init_weights(module: Any, seed: int) -> None:
    """Deterministic weights with O(1) activations, so attention errors are visible in the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.ndim == 1 and ("norm" in name or name.endswith(".scale")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def build_model(name: str) -> Any:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from xdit_multigpu.testing.tiny_models import _SDXL_CONFIG

    configs = {
        "flux": (comfy.supported_models.Flux, FLUX_CONFIG), "sd3": (comfy.supported_models.SD3, SD3_CONFIG),
        "sdxl": (comfy.supported_models.SDXL, _SDXL_CONFIG), "pixart": (comfy.supported_models.PixArtSigma, PIXART_CONFIG),
        "pixart_alpha": (comfy.supported_models.PixArtAlpha, PIXART_ALPHA_CONFIG),
        "pixart_kv": (comfy.supported_models.PixArtSigma, PIXART_KV_CONFIG),
        "hunyuan_dit": (comfy.supported_models.HunyuanDiT, HYDIT_CONFIG),
        # 40 blocks: HunyuanDiT's ControlNet always emits 19 residuals, one per long skip of a 40-block model.
        "hunyuan_dit_cn": (comfy.supported_models.HunyuanDiT, HYDIT_CN_CONFIG),
    }
    cls, config = configs[name]
    mc = cls(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    _init_weights(model.diffusion_model, seed=7)
    if name in OUTPUT_LAYER:
        path, factor = OUTPUT_LAYER[name]
        with torch.no_grad():
            for p in model.diffusion_model.get_submodule(path).parameters():
                p.mul_(factor)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _cond(name: str, gen: Any, text_len: int, size: int) -> list[Any]:
    """One ComfyUI conditioning entry ``[context, extras]`` for the tiny ``name`` model."""
    import torch

    if name == "sdxl":
        px = size * 8
        extras = dict(pooled_output=torch.randn(1, 1280, generator=gen), width=px, height=px, crop_w=0, crop_h=0,
                      target_width=px, target_height=px)
        return [torch.randn(1, text_len, 2048, generator=gen), extras]
    context = torch.randn(1, text_len, 64, generator=gen)
    if name.startswith("pixart"):
        return [context, {}]
    if name.startswith("hunyuan_dit"):  # fixed lengths: CLIP text_len and mT5 text_len_t5
        return [context, dict(attention_mask=torch.ones(1, text_len, dtype=torch.int64),
                              conditioning_mt5xl=torch.randn(1, HYDIT_T5_LEN, 64, generator=gen),
                              attention_mask_mt5xl=torch.ones(1, HYDIT_T5_LEN, dtype=torch.int64),
                              width=size * 8, height=size * 8)]
    extra = {"guidance": 3.5} if name == "flux" else {}
    return [context, {"pooled_output": torch.randn(1, 32, generator=gen), **extra}]


def conds(name: str, neg_text: bool = False, size: int = 16) -> tuple[list[Any], list[Any]]:
    import torch

    gen = torch.Generator().manual_seed(3)
    pos = [_cond(name, gen, TEXT_LEN, size)]
    neg = [_cond(name, gen, TEXT_LEN - 3 if neg_text else TEXT_LEN, size)]
    return pos, neg


def flux_mask(case: Case) -> Any:
    """A full-square [txt | img] attention mask that hides some text keys from some rows."""
    import torch

    n = TEXT_LEN + (case.size // 2) ** 2
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(n, n, generator=gen) > 0.3
    keep |= torch.eye(n, dtype=torch.bool)
    return torch.where(keep, 0.0, -10000.0).unsqueeze(0)  # additive, as ComfyUI's backends expect


def sample(patcher: Any, name: str, case: Case) -> Any:
    import comfy.sample
    import torch

    channels = LATENT_CHANNELS.get(name, 4)
    latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(1, channels, case.size, case.size))
    seed = 42
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(name, case.variant == "neg_text", case.size)
    if case.variant == "mask":
        mask = flux_mask(case)
        extra = {"attention_mask": mask, "attention_mask_img_shape": (case.size // 2, case.size // 2)}
        pos = [[c, {**d, **extra}] for c, d in pos]
        neg = [[c, {**d, **extra}] for c, d in neg]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return comfy.sample.sample(patcher, noise, case.steps, case.cfg_scale, case.sampler, "simple", pos, neg,
                                   latent, denoise=case.denoise, seed=seed, disable_pbar=True)


def run_cases(rank: int, world: int, payload: tuple[str, list[Case]]) -> dict[str, Any]:
    """Rank entry: parallel runs for every case, then (rank 0) the one-device references."""
    import torch.distributed as dist

    from xdit_multigpu.config import AttentionBackend, ParallelPlan
    from xdit_multigpu.parallel.xfuser_attention import XFuserUSP
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.parallel.apply import parallelize
    from _harness import attention_notes, groups_for
    from xdit_multigpu.parallel.hooks import OVERRIDE_KEY

    name, cases = payload
    notes = attention_notes()  # which attention path ran (see _harness)
    base = build_model(name)
    spec = lookup_config(base.model.model_config)
    assert spec is not None
    out: dict[str, Any] = {"parallel": [], "reference": {}, "times": [], "fallback": []}
    groups = None
    for case in cases:
        plan = ParallelPlan(*case.plan, attention=AttentionBackend(case.attention))
        calls = XFuserUSP.calls if case.attention == "xfuser" else 0
        groups = groups_for(plan, groups, rank, world)
        patched = parallelize(base, spec, plan, groups)
        if case.variant == "no_override":  # negative control: local-only attention must be caught
            drop_sequence_attention(patched)
        t0 = time.perf_counter()
        out["parallel"].append(sample(patched, name, case).numpy())
        out["times"].append(time.perf_counter() - t0)
        out["fallback"].append(any("all-gather" in n for n in notes))
        out.setdefault("xfuser_calls", []).append(XFuserUSP.calls - calls if case.attention == "xfuser" else 0)
        notes.clear()
    dist.barrier()
    to = base.model_options.get("transformer_options", {})
    out["base_untouched"] = (OVERRIDE_KEY not in to and not to.get("patches") and not to.get("patches_replace")
                             and not any(base.wrappers.values()) and not base.object_patches)
    if rank == 0:
        for case in cases:
            if case.reference_key not in out["reference"]:
                out["reference"][case.reference_key] = sample(base, name, case).numpy()
        out["methods_restored"] = methods_restored(base.model)  # the references ran on unpatched modules
    return out


def drop_sequence_attention(patcher: Any) -> None:
    """Negative control: keep the sharding, remove the distributed attention (override or object patch)."""
    from xdit_multigpu.parallel.hooks import OVERRIDE_KEY

    to = patcher.model_options["transformer_options"]
    if OVERRIDE_KEY in to:
        to.pop(OVERRIDE_KEY)
        return
    keys = [k for k in patcher.object_patches if k.endswith((".attn.forward", ".attn1.forward"))]
    assert keys, "no sequence-parallel attention to drop"
    for k in keys:
        patcher.object_patches.pop(k)


def methods_restored(model: Any) -> bool:
    """No module still carries one of our bound-method object patches as an instance attribute."""
    for module in model.modules():
        inst = module.__dict__.get("forward")
        if inst is not None and getattr(inst, "__func__", None) is not type(module).forward:
            return False
    return True
