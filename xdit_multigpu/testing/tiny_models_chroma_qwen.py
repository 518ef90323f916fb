"""Tiny random-weight Chroma, Chroma Radiance and Qwen-Image diffusion models (recipes for ``tiny_models``).

All load through an explicit ``unet_config`` (``LoadSpec.unet_config_json``), as Flux does, because
ComfyUI's detection hard-codes sizes that are far from tiny:

================  ===============================  ==============================================
family            ComfyUI class                    why not detected
================  ===============================  ==============================================
chroma            supported_models.Chroma          detection fixes 24 heads, axes [16, 56, 56]
                                                   (head dim 128) and the approximator's out_dim
                                                   3072 = hidden, so hidden must be 3072
chroma_radiance   supported_models.ChromaRadiance  as chroma (pixel space: patch 16; the NeRF
                                                   head's sizes are fixed by detection too)
qwen_image        supported_models.QwenImage       detection reads only in_channels and
                                                   num_layers: 24 heads x 128 and
                                                   joint_attention_dim 3584 stay default
================  ===============================  ==============================================

The configs still go through ``model_config_from_unet_config`` (ComfyUI's own class matching) and the
real ``comfy.ldm.chroma`` / ``comfy.ldm.qwen_image`` modules. Opt-in families: name them in
``write_tiny_models(out, ["chroma", "chroma_radiance", "qwen_image"])``.
"""

from __future__ import annotations

from .tiny_models import DIFFUSION_MODELS, _Recipe, register_recipe

# Chroma: Flux-like double / single blocks without per-block modulation weights; the "approximator"
# (distilled_guidance_layer) maps (timestep, guidance, index) to every block's modulation. in_dim is 64
# by construction (16 + 16 timestep / guidance features + 32 index features); out_dim must equal hidden.
CHROMA_TINY = {
    "image_model": "chroma",
    "in_channels": 64,  # 16 latent channels x patch 2 x 2 (Chroma counts patchified channels)
    "out_channels": 64,
    "context_in_dim": 64,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 1,
    "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "in_dim": 64,
    "out_dim": 128,
    "hidden_dim": 64,
    "n_layers": 2,
}

# Chroma Radiance: the same transformer on 16 x 16 pixel patches (no VAE), a per-patch NeRF pixel head.
CHROMA_RADIANCE_TINY = dict(
    CHROMA_TINY, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
    nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4, nerf_tile_size=16,
    nerf_final_head_type="linear", nerf_embedder_dtype=None,
)

# Qwen-Image: joint [text | image] attention in every block (MMDiT-like), RoPE over both streams.
QWEN_IMAGE_TINY = {
    "image_model": "qwen_image",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
}

CHROMA = _Recipe(
    "chroma", DIFFUSION_MODELS, "unet", CHROMA_TINY, "Chroma", False, "bfloat16",
    dict(context_dim=64, context_tokens=16, pooled_dim=0, latent_channels=16, heads=4,
         extra_cond="none (guidance defaults to 0, as model_base.Chroma does)"),
    default=False,
)
CHROMA_RADIANCE = _Recipe(
    "chroma_radiance", DIFFUSION_MODELS, "unet", CHROMA_RADIANCE_TINY, "ChromaRadiance", False, "bfloat16",
    dict(context_dim=64, context_tokens=16, pooled_dim=0, latent_channels=3, heads=4,
         extra_cond="none; the latent is the image itself (3 channels, pixel size)"),
    default=False,
)
QWEN_IMAGE = _Recipe(
    "qwen_image", DIFFUSION_MODELS, "unet", QWEN_IMAGE_TINY, "QwenImage", False, "bfloat16",
    dict(context_dim=64, context_tokens=16, pooled_dim=0, latent_channels=16, heads=4,
         extra_cond="none (latent is 5-D (B, 16, 1, H, W) after fix_empty_latent_channels)"),
    default=False,
)

RECIPES = (CHROMA, CHROMA_RADIANCE, QWEN_IMAGE)  # registered by tiny_models._load_extensions
for _recipe in RECIPES:  # and at import, for a direct import of this module
    register_recipe(_recipe)
