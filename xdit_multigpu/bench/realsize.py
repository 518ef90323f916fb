"""Benchmark architectures: real-size models with random weights, written in ComfyUI's own layout.

Speed does not depend on weight values, so each model is ComfyUI's real architecture (built by ComfyUI's
own ``model_detection`` config on the ``meta`` device, so the state-dict keys and shapes are what its
loader detects) filled with random bf16 values on the GPU. The conditioning is fixed random tensors
shaped like the text encoders' output (the text encoders are not run: see ``docs/benchmarks.md``).

Tiny variants (``tiny-flux``, ``tiny-sd3``) are the test suite's tiny models; the CPU self-check uses
them so the whole benchmark path runs in CI.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Flux.1-dev as ComfyUI detects it (model_detection: hidden 3072, 24 heads, 19 double + 38 single).
FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
# SD3.5-Large: MMDiT depth 38 (hidden 64 * 38 = 2432, 38 heads), RMS q/k norm, pos-embed grid 192.
SD35_LARGE = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 38, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
    "num_patches": 192 * 192, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [], "qk_norm": "rms",
}
# PixArt-Sigma XL/2: hidden 1152, 16 heads, 28 blocks, T5 context (4096 wide, 300 tokens).
PIXART_SIGMA = {
    "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4, "depth": 28,
    "model_max_length": 300, "image_model": "pixart_sigma", "micro_condition": False,
}
# PixArt-α XL/2 1024: Σ's transformer plus the micro-condition embedders (size, aspect ratio); T5 120 tokens.
PIXART_ALPHA = dict(PIXART_SIGMA, image_model="pixart_alpha", micro_condition=True, model_max_length=120)
# SDXL base UNet as ComfyUI detects it (supported_models.SDXL): 2.6 B params, CLIP-L + G context 2048.
SDXL_BASE = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# HunyuanDiT v1.2 (DiT-g/2): hidden 1408, 16 heads, 40 blocks (no size/style conditioning in v1.2).
HUNYUAN_DIT = {"image_model": "hydit", "depth": 40, "hidden_size": 1408, "mlp_ratio": 4.3637}
# Chroma1-HD as ComfyUI detects it: Flux's 19 double + 38 single blocks without per-block modulation
# weights; the approximator (in 64, hidden 5120, 5 layers, out 3072) gives every block's modulation.
CHROMA_HD = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096, "hidden_size": 3072,
    "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
    "n_layers": 5,
}


@dataclass(frozen=True)
class Arch:
    """One benchmark model: how to write it, how to condition it, how to sample it."""

    name: str
    unet_config: dict[str, Any]
    config_class: str  # the comfy.supported_models class detection must give
    heads: int
    latent_channels: int
    cfg: float  # 1.0: cond only (guidance-distilled); > 1: cond + uncond every step
    conditioning: Callable[[int, int], tuple[list, list]]  # (width, height) -> (positive, negative)
    explicit_config: bool = False  # ComfyUI cannot detect it (tiny Flux): LoadSpec carries the config
    tiny_family: str = ""  # a tiny test model (xdit_multigpu.testing.tiny_models) instead of a random file
    vae_channels: int = 16
    notes: str = ""
    sampler: tuple[str, str] = field(default=("euler", "simple"))

    @property
    def filename(self) -> str:
        return f"xdit_bench_{self.name}.safetensors"


def _randn(shape: tuple[int, ...], gen: Any, std: float) -> Any:
    import torch

    return torch.randn(shape, generator=gen) * std


def _flux_cond(tokens: int, ctx: int, pooled: int) -> Callable[[int, int], tuple[list, list]]:
    def make(width: int, height: int) -> tuple[list, list]:  # noqa: ARG001  (Flux has no size conditioning)
        import torch

        g = torch.Generator().manual_seed(0)
        pos = [[_randn((1, tokens, ctx), g, 1.0), {"pooled_output": _randn((1, pooled), g, 1.0), "guidance": 3.5}]]
        neg = [[_randn((1, tokens, ctx), g, 1.0), {"pooled_output": _randn((1, pooled), g, 1.0), "guidance": 3.5}]]
        return pos, neg

    return make


def _sd3_cond(tokens: int, ctx: int, pooled: int) -> Callable[[int, int], tuple[list, list]]:
    def make(width: int, height: int) -> tuple[list, list]:  # noqa: ARG001
        import torch

        g = torch.Generator().manual_seed(0)
        return tuple([[_randn((1, tokens, ctx), g, 1.0), {"pooled_output": _randn((1, pooled), g, 1.0)}]]
                     for _ in range(2))  # type: ignore[return-value]

    return make


def _t5_only_cond(tokens: int) -> Callable[[int, int], tuple[list, list]]:
    """Chroma: T5 context only (CLIPTextEncode gives pooled_output None)."""
    def make(width: int, height: int) -> tuple[list, list]:  # noqa: ARG001
        import torch

        g = torch.Generator().manual_seed(0)
        return tuple([[_randn((1, tokens, 4096 if tokens > 64 else 64), g, 1.0), {"pooled_output": None}]]
                     for _ in range(2))  # type: ignore[return-value]

    return make


def _pixart_cond(tokens: int) -> Callable[[int, int], tuple[list, list]]:
    """PixArt: T5 context (Σ 300 tokens, α 120); width / height feed α's micro-conditions."""
    def make(width: int, height: int) -> tuple[list, list]:
        import torch

        g = torch.Generator().manual_seed(0)
        return tuple([[_randn((1, tokens, 4096), g, 1.0), {"width": width, "height": height}]]
                     for _ in range(2))  # type: ignore[return-value]

    return make


def _sdxl_cond(width: int, height: int) -> tuple[list, list]:
    """SDXL: CLIP-L + G context (77 x 2048), pooled G (1280) and the size / crop conditioning."""
    import torch

    g = torch.Generator().manual_seed(0)
    size = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}
    return tuple([[_randn((1, 77, 2048), g, 1.0), {"pooled_output": _randn((1, 1280), g, 1.0), **size}]]
                 for _ in range(2))  # type: ignore[return-value]


def _hunyuan_cond(width: int, height: int) -> tuple[list, list]:
    import torch

    g = torch.Generator().manual_seed(0)

    def one() -> list:
        return [[_randn((1, 77, 1024), g, 1.0), {
            "conditioning_mt5xl": _randn((1, 256, 2048), g, 1.0),
            "attention_mask": torch.ones(1, 77, dtype=torch.int64),
            "attention_mask_mt5xl": torch.ones(1, 256, dtype=torch.int64),
            "width": width, "height": height}]]

    return one(), one()


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("flux-dev", FLUX_DEV, "Flux", 24, 16, 1.0, _flux_cond(512, 4096, 768),
         notes="11.9 B params; T5 512 tokens; cfg 1 (guidance-distilled)"),
    Arch("sd35-large", SD35_LARGE, "SD3", 38, 16, 4.5, _sd3_cond(154, 4096, 2048),
         notes="8.1 B params; 154 context tokens (CLIP 77 + T5 77); cfg 4.5 with a negative"),
    Arch("pixart-sigma", PIXART_SIGMA, "PixArtSigma", 16, 4, 4.5, _pixart_cond(300),
         notes="0.6 B params; T5 300 tokens (cross-attention); cfg 4.5", vae_channels=4),
    Arch("pixart-alpha", PIXART_ALPHA, "PixArtAlpha", 16, 4, 4.5, _pixart_cond(120),
         notes="0.6 B params; T5 120 tokens (cross-attention), size / aspect micro-conditions; cfg 4.5",
         vae_channels=4),
    Arch("sdxl", SDXL_BASE, "SDXL", 10, 4, 7.0, _sdxl_cond,
         notes="2.6 B params UNet; CLIP-L + G 77 tokens; cfg 7 (CFG parallel: convolutions need the whole image)",
         vae_channels=4),
    Arch("hunyuan-dit", HUNYUAN_DIT, "HunyuanDiT", 16, 4, 6.0, _hunyuan_cond,
         notes="1.5 B params; CLIP 77 + mT5 256 tokens (cross-attention); cfg 6", vae_channels=4),
    Arch("chroma-hd", CHROMA_HD, "Chroma", 24, 16, 4.0, _t5_only_cond(512),
         notes="8.9 B params; T5 512 tokens; cfg 4 with a negative (not guidance-distilled)"),
    # CPU self-check: the test suite's tiny models (fp32 compute on CPU).
    Arch("tiny-flux", {}, "Flux", 4, 16, 1.0, _flux_cond(16, 64, 32), explicit_config=True, tiny_family="flux"),
    Arch("tiny-sd3", {}, "SD3", 4, 16, 3.0, _sd3_cond(77, 4096, 2048), tiny_family="sd3"),
    Arch("tiny-chroma", {}, "Chroma", 4, 16, 3.0, _t5_only_cond(16), explicit_config=True, tiny_family="chroma"),
)}
REAL = ("flux-dev", "sd35-large", "pixart-sigma", "pixart-alpha", "hunyuan-dit", "sdxl")


def write_model(arch: Arch, out_dir: str, device: str = "cuda") -> dict[str, Any]:
    """Write ``arch`` into ``out_dir`` (skip if present); returns {path, bytes, write_s, unet_config_json}.

    Needs ComfyUI imported. Real sizes: random bf16 values drawn on ``device`` (1-D norm scales = 1,
    weights N(0, 1/fan_in) so activations stay O(1) through the depth).
    """
    if arch.tiny_family:
        from ..testing.tiny_models import write_one

        tiny = write_one(arch.tiny_family, out_dir)
        return {"path": tiny.path, "bytes": os.path.getsize(tiny.path), "write_s": 0.0,
                "unet_config_json": tiny.unet_config_json}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, arch.filename)
    if os.path.isfile(path):
        return {"path": path, "bytes": os.path.getsize(path), "write_s": 0.0, "unet_config_json": None}
    t0 = time.perf_counter()
    sd = _random_state(arch, device)
    from safetensors.torch import save_file

    tmp = path + ".partial"
    save_file(sd, tmp, metadata={"xdit_bench": json.dumps({"arch": arch.name, "random": True})})
    os.replace(tmp, path)
    return {"path": path, "bytes": os.path.getsize(path), "write_s": round(time.perf_counter() - t0, 1),
            "unet_config_json": None}


def _random_state(arch: Arch, device: str) -> dict[str, Any]:
    import comfy.model_detection
    import torch

    mc = comfy.model_detection.model_config_from_unet_config(dict(arch.unet_config))
    if mc is None or type(mc).__name__ != arch.config_class:
        raise RuntimeError(f"{arch.name}: config maps to {type(mc).__name__}, not {arch.config_class}")
    mc.set_inference_dtype(torch.bfloat16, None)
    meta = mc.get_model({}, "", device="meta").diffusion_model.state_dict()
    gen = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for key, t in meta.items():
        shape = tuple(t.shape)
        if not t.dtype.is_floating_point:
            raise RuntimeError(f"{arch.name}: non-float tensor {key}")
        if len(shape) == 1 and (key.endswith(".weight") or key.endswith(".scale")):
            sd[key] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        std = 0.02 if len(shape) <= 1 else 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
        sd[key] = (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
    return sd


def random_vae(latent_channels: int, tiny_dir: str | None = None) -> Any:
    """ComfyUI's ``VAE`` for a real-size KL autoencoder (Flux / SD3: 16 latent channels; SDXL: 4), random.

    Built from ComfyUI's own VAE detection on a state dict of the right keys and shapes. ``tiny_dir``
    (CPU self-check): the test suite's tiny TAESD VAE instead, written there.
    """
    if tiny_dir:
        import comfy.sd
        import comfy.utils

        from ..testing.tiny_models import write_one

        tiny = write_one("vae16" if latent_channels == 16 else "vae4", tiny_dir)
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(tiny.path))
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd
    import torch

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    with torch.device("meta"):
        model = ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        if len(shape) == 1 and key.endswith(".weight"):
            sd[key] = torch.ones(shape)
        else:
            std = 0.02 if len(shape) <= 1 else 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
            sd[key] = torch.randn(shape, generator=gen) * std
    if latent_channels == 16:  # Flux / SD3 VAEs have no quant convs (ComfyUI builds an AutoencodingEngine)
        sd = {k: v for k, v in sd.items() if not k.startswith(("quant_conv.", "post_quant_conv."))}
    return comfy.sd.VAE(sd=sd)
