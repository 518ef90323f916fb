"""Rank-side code for Lumina 2 / Z-Image and Wan 2.1 / 2.2 T2V: tiny fp32 models, cases, references.

Same protocol as ``_cases.run_cases`` (every rank runs each case's plan through ``parallelize`` +
ComfyUI's ``comfy.sample.sample``; rank 0 then computes the one-device references in the same process).
The models are built from explicit unet_configs through ComfyUI's own ``supported_models`` classes
(``Lumina2``, ``ZImage``, ``WAN21_T2V``, ``WAN22_T2V``): detection only maps Z-Image at hidden 3840 and
hard-codes Wan's 128-wide heads, far too big for CPU ranks. The architecture code is ComfyUI's own.

Wan latents are 5-D ``(1, C, frames, size, size)``; Wan 2.2 (TI2V-5B layout) has 48 channels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from _cases import Case, _init_weights, drop_sequence_attention, methods_restored

TEXT_LEN = 8

# Lumina 2: 4 query heads, 2 K/V heads (GQA as the real model's 24 / 8), one refiner layer of each
# kind, head dim 32 = axes 8 + 12 + 12.
LUMINA2_CONFIG = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=128, n_layers=2, n_refiner_layers=1,
                      n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=4.0, qk_norm=True, cap_feat_dim=64,
                      axes_dims=[8, 12, 12], axes_lens=[300, 512, 512], rope_theta=10000.0)
# Z-Image: its modulation (adaLN from a 256-wide t embedding: hidden >= 256), time_scale 1000 and caption /
# image padding to a multiple of 32 tokens with learned pad tokens.
ZIMAGE_CONFIG = dict(LUMINA2_CONFIG, dim=256, n_kv_heads=4, ffn_dim_multiplier=8.0 / 3.0, axes_dims=[16, 24, 24],
                     axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0,
                     pad_tokens_multiple=32)
# Wan 2.1 T2V: 4 heads x 32 (RoPE axes 12 / 10 / 10), 2 blocks, text width 64.
WAN21_CONFIG = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256,
                    freq_dim=256, text_dim=64, out_dim=16, num_heads=4, num_layers=2, window_size=(-1, -1),
                    qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN22_CONFIG = dict(WAN21_CONFIG, in_dim=48, out_dim=48)  # Wan 2.2 TI2V-5B layout (48-channel latent)
CHANNELS = {"wan22": 48}  # everything else: 16


@dataclass(frozen=True)
class VCase(Case):
    frames: int = 1  # latent frames (Wan); images: 1 and a 4-D latent

    @property
    def reference_key(self) -> tuple[Any, ...]:
        return (*super().reference_key, self.frames)


def build_model(name: str) -> Any:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    configs = {"lumina2": (sm.Lumina2, LUMINA2_CONFIG), "zimage": (sm.ZImage, ZIMAGE_CONFIG),
               "wan21": (sm.WAN21_T2V, WAN21_CONFIG), "wan22": (sm.WAN22_T2V, WAN22_CONFIG)}
    cls, config = configs[name]
    mc = cls(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    _init_weights(model.diffusion_model, seed=7)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conds(name: str, neg_text: bool = False) -> tuple[list[Any], list[Any]]:
    """Random caption / text features; ``neg_text``: the negative is shorter and, for Lumina 2, carries a
    caption attention mask (the unsharded caption refiner runs masked, as with Gemma prompts). Not for
    Z-Image: ComfyUI pads its caption to 32 tokens but not the mask (fails on one device too)."""
    import torch

    gen = torch.Generator().manual_seed(3)
    pos = [[torch.randn(1, TEXT_LEN, 64, generator=gen), {}]]
    n = TEXT_LEN - 3 if neg_text else TEXT_LEN
    extras: dict[str, Any] = {}
    if neg_text and name == "lumina2":
        mask = torch.ones(1, n, dtype=torch.int64)
        mask[:, -2:] = 0
        extras["attention_mask"] = mask
    neg = [[torch.randn(1, n, 64, generator=gen), extras]]
    return pos, neg


def latent_for(name: str, case: VCase) -> Any:
    import torch

    channels = CHANNELS.get(name, 16)
    if name.startswith("wan"):
        return torch.zeros(1, channels, case.frames, case.size, case.size)
    return torch.zeros(1, channels, case.size, case.size)


def frame_mask(latent: Any) -> Any:
    """A Wan 2.2 TI2V-style noise mask: frame 0 kept (mask 0), the rest denoised -> per-frame timesteps."""
    mask = latent.new_ones(1, 1, *latent.shape[2:])
    mask[:, :, 0] = 0.0
    return mask


def sample(patcher: Any, name: str, case: VCase) -> Any:
    import comfy.sample
    import torch

    latent = comfy.sample.fix_empty_latent_channels(patcher, latent_for(name, case))
    seed = 42
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(name, case.variant == "neg_text")
    mask = frame_mask(latent) if case.variant == "frame_mask" else None
    if mask is not None:
        latent = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))  # the kept "first frame"
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, case.steps, case.cfg_scale, case.sampler, "simple", pos, neg,
                                   latent, denoise=case.denoise, noise_mask=mask, seed=seed, disable_pbar=True)


def image_tokens(name: str, case: VCase) -> int:
    """Tokens in the sharded stream (Z-Image pads them to a multiple of 32)."""
    tokens = (case.size // 2) ** 2 * (case.frames if name.startswith("wan") else 1)
    return -(-tokens // 32) * 32 if name == "zimage" else tokens


def _count_sequence_calls() -> list[int]:
    """Count the attention calls that reach the override with a live sequence state (so take the
    sequence-parallel path) in this rank process (spawned per test: the patch dies with it)."""
    import xdit_multigpu.parallel.apply as apply_mod
    from xdit_multigpu.parallel.sequence import state_of

    calls = [0, 0]  # [calls with a live state, of which with the text sharded too]
    make = apply_mod.make_attention_override

    def counting(attn: Any) -> Any:
        inner = make(attn)

        def override(func: Any, *args: Any, **kwargs: Any) -> Any:
            state = state_of(kwargs.get("transformer_options"))
            calls[0] += int(state is not None and state.active)
            calls[1] += int(state is not None and state.active and state.text_sharded)
            return inner(func, *args, **kwargs)

        return override

    apply_mod.make_attention_override = counting
    return calls


def run_cases(rank: int, world: int, payload: tuple[str, list[VCase]]) -> dict[str, Any]:
    """Rank entry: parallel runs for every case, then (rank 0) the one-device references."""
    import torch.distributed as dist
    from _harness import attention_notes, groups_for

    from xdit_multigpu.config import ParallelPlan
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.parallel.apply import parallelize
    from xdit_multigpu.parallel.hooks import OVERRIDE_KEY

    name, cases = payload
    seq_calls = _count_sequence_calls()
    notes = attention_notes()  # which attention path ran (see _harness)
    base = build_model(name)
    spec = lookup_config(base.model.model_config)
    assert spec is not None
    out: dict[str, Any] = {"parallel": [], "reference": {}, "times": [], "fallback": [], "spec": spec.name}
    groups = None
    for case in cases:
        plan = ParallelPlan(*case.plan)
        groups = groups_for(plan, groups, rank, world)
        patched = parallelize(base, spec, plan, groups)
        if case.variant == "no_override":  # negative control: local-only attention must be caught
            drop_sequence_attention(patched)
        if case.variant == "no_cross_patch":  # negative control of the Wan cross-attention object patch
            for key in [k for k in patched.object_patches if k.endswith(".cross_attn.forward")]:
                patched.object_patches.pop(key)
        t0 = time.perf_counter()
        seq_calls[:] = [0, 0]
        out["parallel"].append(sample(patched, name, case).numpy())
        out["times"].append(time.perf_counter() - t0)
        out.setdefault("seq_calls", []).append(seq_calls[0])
        out.setdefault("text_sharded", []).append(seq_calls[1] > 0)
        out["fallback"].append(any("all-gather" in n for n in notes))
        notes.clear()
    dist.barrier()
    to = base.model_options.get("transformer_options", {})
    out["base_untouched"] = (OVERRIDE_KEY not in to and not to.get("patches") and not to.get("patches_replace")
                             and not any(base.wrappers.values()) and not base.object_patches)
    if rank == 0:
        for case in cases:
            if case.reference_key not in out["reference"]:
                out["reference"][case.reference_key] = sample(base, name, case).numpy()
        out["methods_restored"] = methods_restored(base.model)
    return out
