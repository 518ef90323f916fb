"""Tiny random-weight Lumina 2 / Z-Image and Wan 2.1 / 2.2 T2V files (same generator as ``tiny_models``).

===============  =================================  ==========================================
family           ComfyUI class                      how it loads
===============  =================================  ==========================================
lumina2          supported_models.Lumina2           explicit config: detection sets heads and
                                                    RoPE axes only for hidden 2304 / 3840
zimage           supported_models.Lumina2 (*)       explicit config, Z-Image layout (z_image
                                                    modulation, time_scale 1000, pad tokens to
                                                    32); (*) ComfyUI maps a config to ZImage
                                                    only at hidden 3840 (~2 G params here)
wan21            supported_models.WAN21_T2V         detected (hidden 512 = 4 heads x 128, 2
                                                    blocks, umT5 width 4096)
wan22            supported_models.WAN22_T2V         detected (TI2V-5B layout: 48-ch latent)
===============  =================================  ==========================================

The recipes are also registered with ``tiny_models`` (``write_tiny_models(out, ["wan21"])`` and its CLI
work too; opt-in, not in ``DEFAULT_FAMILIES``). Wan latents are 5-D ``(B, C, frames, H/8, W/8)``
(``empty_video_latent``; Wan 2.2's VAE is 16x, the tiny test only needs the shape). Conditioning:
``tiny_models.conditioning_for`` (context only).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .tiny_models import DIFFUSION_MODELS, TinyModel, _Recipe, ensure_comfy, register_recipe, write_one

_LUMINA2 = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
    "qk_norm": True, "cap_feat_dim": 256, "axes_dims": [16, 24, 24], "axes_lens": [300, 512, 512],
    "rope_theta": 10000.0,
}
_ZIMAGE = dict(_LUMINA2, n_kv_heads=4, ffn_dim_multiplier=8.0 / 3.0, axes_lens=[1536, 512, 512], rope_theta=256.0,
               z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
# Detection: heads = hidden // 128, ffn / layers / in_dim / out_dim from the weights, text width 4096.
_WAN21 = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 512,
    "ffn_dim": 512, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 4, "num_layers": 2,
    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
_WAN22 = dict(_WAN21, in_dim=48, out_dim=48)

_RECIPES: dict[str, _Recipe] = {
    r.family: r
    for r in (
        _Recipe("lumina2", DIFFUSION_MODELS, "unet", _LUMINA2, "Lumina2", False, "bfloat16",
                dict(context_dim=256, context_tokens=24, latent_channels=16, heads=4, extra_cond="none"),
                default=False),
        _Recipe("zimage", DIFFUSION_MODELS, "unet", _ZIMAGE, "Lumina2", False, "bfloat16",
                dict(context_dim=256, context_tokens=24, latent_channels=16, heads=4,
                     extra_cond="none (caption padded to 32 tokens by the model)"), default=False),
        _Recipe("wan21", DIFFUSION_MODELS, "unet", _WAN21, "WAN21_T2V", True, "bfloat16",
                dict(context_dim=4096, context_tokens=32, latent_channels=16, heads=4,
                     extra_cond="none; latent (B, 16, frames, H/8, W/8)"), default=False),
        _Recipe("wan22", DIFFUSION_MODELS, "unet", _WAN22, "WAN22_T2V", True, "bfloat16",
                dict(context_dim=4096, context_tokens=32, latent_channels=48, heads=4,
                     extra_cond="none; latent (B, 48, frames, H/16, W/16) with Wan 2.2's VAE"), default=False),
    )
}
FAMILIES: tuple[str, ...] = tuple(_RECIPES)
RECIPES = tuple(_RECIPES.values())  # registered by tiny_models._load_extensions (opt-in: default=False)
for _recipe in RECIPES:  # and at import, for a direct import of this module
    register_recipe(_recipe)
VIDEO_FAMILIES = frozenset({"wan21", "wan22"})


def write_video_models(out_dir: str, families: Iterable[str] | None = None, *,
                       comfy_root: str | None = None) -> dict[str, TinyModel]:
    """Write the tiny models of ``families`` (default: all four) under ``out_dir/diffusion_models``."""
    fams = list(FAMILIES if families is None else families)
    unknown = [f for f in fams if f not in _RECIPES]
    if unknown:
        raise ValueError(f"unknown tiny-model families {unknown}; known: {list(FAMILIES)}")
    ensure_comfy(comfy_root)
    return {f: write_one(_RECIPES[f], out_dir) for f in fams}


def empty_video_latent(tiny: TinyModel, side: int, frames: int, batch: int = 1) -> dict[str, Any]:
    """``{"samples": zeros}``: ``(B, C, frames, side, side)`` for Wan, ``(B, C, side, side)`` otherwise
    (``side`` in latent pixels, even)."""
    import torch

    if side % 2:
        raise ValueError("the latent side must be even (patch 2)")
    if tiny.family in VIDEO_FAMILIES:
        return {"samples": torch.zeros(batch, tiny.latent_channels, frames, side, side)}
    return {"samples": torch.zeros(batch, tiny.latent_channels, side, side)}
