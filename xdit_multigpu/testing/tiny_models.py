"""Tiny deterministic random-weight models in ComfyUI's own file layouts, for tests and the demo.

No real weights exist in the workplace, so every model is ComfyUI's real architecture (built by ComfyUI's
own code on the ``meta`` device, so key names and shapes are exactly what its loaders expect) with
seeded random weights, saved as ``.safetensors``. Files land in ``<out_dir>/<folder>/<file>`` where
``folder`` is a ComfyUI models subfolder, so ``out_dir`` can be used directly as a models root.

Detection by ComfyUI's stock loaders (``UNETLoader`` / ``VAELoader`` / ``CLIPLoader``):

===============  =================================  ==========================================
family           ComfyUI class                      how it loads
===============  =================================  ==========================================
flux             supported_models.Flux              explicit config (detection hard-codes
                                                    24 heads x 128 and needs hidden 3072)
flux_detectable  supported_models.Flux              detected; ~531 M params, 1.06 GB (opt-in)
sd3              supported_models.SD3               detected (depth 4: hidden 256, 4 heads)
sd35             supported_models.SD3               detected, MMDiT-X (x-block self-attn, rms qk)
sdxl             supported_models.SDXL              explicit config (SDXL matching needs the
                                                    literal SDXL values, see ``_SDXL_CONFIG``)
pixart_sigma     supported_models.PixArtSigma       detected (hidden 1152 fixed, depth 1)
pixart_alpha     supported_models.PixArtAlpha       detected (micro-condition embedders; opt-in)
hunyuan_dit      supported_models.HunyuanDiT        detected (depth 4, hidden 128)
vae16 / vae4     comfy.sd.VAE (TAESD layout)        detected (``taesd_decoder.1.weight``)
clip_l           comfy.sd.load_clip -> CLIP_L       detected; real 12-layer CLIP-L, fp16
===============  =================================  ==========================================

Determinism: every tensor is drawn from its own ``torch.Generator`` seeded from
``sha256(family/key)``, the safetensors header carries a single metadata entry (so no hash-map ordering
enters the bytes), and a file is rewritten only when its content would change.

Imports ComfyUI lazily; ``write_tiny_models`` bootstraps it (CPU) from ``comfy_root`` /
``$COMFYUI_PATH`` / the repo's ``.host/comfyui`` when it is not imported yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..worker.prefetch import read_header_json

GENERATOR_VERSION = 1
PREFIX = "xdit_tiny_"

DIFFUSION_MODELS = "diffusion_models"
VAE = "vae"
TEXT_ENCODERS = "text_encoders"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TinyModel:
    """One generated file and what a test needs to drive it."""

    family: str
    path: str
    folder: str  # ComfyUI models subfolder: diffusion_models | vae | text_encoders | checkpoints
    detected: bool  # ComfyUI's own detection loads it (no explicit config needed)
    unet_config_json: str | None  # explicit architecture when detection cannot load it (LoadSpec field)
    config_class: str  # expected comfy.supported_models class ("VAE" / "CLIP_L" for the others)
    context_dim: int = 0  # width of the cross-attention context (CONDITIONING tensor's last dim)
    context_tokens: int = 0  # default number of context tokens for conditioning_for
    pooled_dim: int = 0  # width of "pooled_output" (0: none)
    latent_channels: int = 0
    extra_cond: str = ""  # what else the CONDITIONING dict carries (doc)
    heads: int = 0  # attention heads (for Ulysses divisibility)
    params: int = 0
    min_latent: int = 0  # smallest latent side (in latent pixels) the model samples at, 0 = any multiple of 2
    clip_types: tuple[str, ...] = ()  # CLIPLoader types this text encoder is meant for

    @property
    def filename(self) -> str:
        return os.path.basename(self.path)

    def unet_config(self) -> dict[str, Any] | None:
        return json.loads(self.unet_config_json) if self.unet_config_json else None


# --------------------------------------------------------------------------------------------------
# Family recipes

_FLUX_TINY = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 64,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}

# The smallest Flux that ComfyUI's detection accepts: it hard-codes num_heads 24 and axes_dim [16, 56, 56]
# (sum 128 = head dim), so hidden must be 24 * 128 = 3072.
_FLUX_DETECTABLE = dict(_FLUX_TINY, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56])

_SD3_BASE = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 4,  # hidden 64 * depth = 256, heads = depth = 4 (Ulysses 2 and 4 divide)
    "input_size": None,
    "adm_in_channels": 2048,  # CLIP-L (768) + CLIP-G (1280) pooled: SD3 text encoders' pooled width
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": 4096, "out_features": 256},
    },
    "num_patches": 128 * 128,
    "pos_embed_max_size": 128,  # patch grid up to 128 x 128: images up to 2048 px
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
_SD35 = dict(_SD3_BASE, x_block_self_attn_layers=[0, 1], qk_norm="rms")

# SDXL matching (supported_models.SDXL.unet_config) requires model_channels 320, transformer_depth
# [0, 0, 2, 2, 10, 10], context_dim 2048, adm_in_channels 2816 and use_temporal_attention False, so no
# tiny config *detects*, and model_config_from_unet_config only maps a config carrying those literal
# values. UNetModel consumes transformer_depth one entry per input res-block, though, so with 2 levels of
# [1, 2] res-blocks only [0, 0, 2] is used: a real SDXL-code-path UNet (ADM, cross-attn 2048, down/up
# sampling, skip connections) at ~1/60 of the size.
_SDXL_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 40,  # 8 heads at 320 channels
    "transformer_depth_output": [1, 0, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

_PIXART_SIGMA = {
    "num_heads": 16,
    "patch_size": 2,
    "hidden_size": 1152,
    "in_channels": 4,
    "depth": 1,
    "model_max_length": 300,
    "image_model": "pixart_sigma",
    "micro_condition": False,
}

# PixArt-α: ComfyUI detects it by the micro-condition embedders (ar_embedder / csize_embedder); T5 120 tokens.
_PIXART_ALPHA = dict(_PIXART_SIGMA, image_model="pixart_alpha", micro_condition=True, model_max_length=120)

_HUNYUAN_DIT = {"image_model": "hydit", "depth": 4, "hidden_size": 128}


@dataclass(frozen=True)
class _Recipe:
    family: str
    folder: str
    kind: str  # "unet" | "taesd" | "clip_l"
    config: Mapping[str, Any]
    config_class: str
    detected: bool
    dtype: str  # storage dtype
    info: Mapping[str, Any]
    default: bool = True


_RECIPES: dict[str, _Recipe] = {
    r.family: r
    for r in (
        _Recipe(
            "flux", DIFFUSION_MODELS, "unet", _FLUX_TINY, "Flux", False, "bfloat16",
            dict(context_dim=64, context_tokens=16, pooled_dim=32, latent_channels=16, heads=4,
                 extra_cond="pooled_output (B, 32), guidance (float)"),
        ),
        _Recipe(
            "flux_detectable", DIFFUSION_MODELS, "unet", _FLUX_DETECTABLE, "Flux", True, "bfloat16",
            dict(context_dim=64, context_tokens=16, pooled_dim=32, latent_channels=16, heads=24,
                 extra_cond="pooled_output (B, 32), guidance (float)"),
            default=False,
        ),
        _Recipe(
            "sd3", DIFFUSION_MODELS, "unet", _SD3_BASE, "SD3", True, "bfloat16",
            dict(context_dim=4096, context_tokens=77, pooled_dim=2048, latent_channels=16, heads=4,
                 extra_cond="pooled_output (B, 2048)"),
        ),
        _Recipe(
            "sd35", DIFFUSION_MODELS, "unet", _SD35, "SD3", True, "bfloat16",
            dict(context_dim=4096, context_tokens=77, pooled_dim=2048, latent_channels=16, heads=4,
                 extra_cond="pooled_output (B, 2048)"),
        ),
        _Recipe(
            "sdxl", DIFFUSION_MODELS, "unet", _SDXL_CONFIG, "SDXL", False, "float16",
            dict(context_dim=2048, context_tokens=77, pooled_dim=1280, latent_channels=4, heads=8,
                 extra_cond="pooled_output (B, 1280), width, height, crop_w, crop_h, target_width, target_height"),
        ),
        _Recipe(
            "pixart_sigma", DIFFUSION_MODELS, "unet", _PIXART_SIGMA, "PixArtSigma", True, "bfloat16",
            dict(context_dim=4096, context_tokens=120, pooled_dim=0, latent_channels=4, heads=16, min_latent=64,
                 extra_cond="none (optionally width/height)"),
        ),
        _Recipe(
            "pixart_alpha", DIFFUSION_MODELS, "unet", _PIXART_ALPHA, "PixArtAlpha", True, "bfloat16",
            dict(context_dim=4096, context_tokens=120, pooled_dim=0, latent_channels=4, heads=16, min_latent=64,
                 extra_cond="width, height (micro-conditions)"), default=False,
        ),
        _Recipe(
            "hunyuan_dit", DIFFUSION_MODELS, "unet", _HUNYUAN_DIT, "HunyuanDiT", True, "bfloat16",
            dict(context_dim=1024, context_tokens=77, pooled_dim=0, latent_channels=4, heads=16,
                 extra_cond="context exactly 77 tokens; conditioning_mt5xl (B, 256, 2048), attention_mask (B, 77), "
                 "attention_mask_mt5xl (B, 256), width, height"),
        ),
        _Recipe(
            "vae16", VAE, "taesd", {"latent_channels": 16, "vae_scale": 1.5305, "vae_shift": 0.0609},
            "VAE", True, "float16", dict(latent_channels=16),
        ),
        _Recipe(
            "vae4", VAE, "taesd", {"latent_channels": 4, "vae_scale": 0.13025, "vae_shift": 0.0},
            "VAE", True, "float16", dict(latent_channels=4),
        ),
        _Recipe(
            "clip_l", TEXT_ENCODERS, "clip_l", {}, "CLIP_L", True, "float16",
            dict(context_dim=768, context_tokens=77, pooled_dim=768, clip_types=("sd3", "stable_diffusion"),
                 extra_cond="CLIPLoader type sd3: context (B, 77, 4096) zero-padded, pooled (B, 2048); "
                 "type stable_diffusion: context (B, 77, 768), pooled (B, 768)"),
        ),
    )
}

FAMILIES: tuple[str, ...] = tuple(_RECIPES)
DEFAULT_FAMILIES: tuple[str, ...] = tuple(f for f, r in _RECIPES.items() if r.default)


def register_recipe(recipe: _Recipe) -> None:
    """Add a family defined in an extension module (``_EXTENSIONS``, kept apart to keep this file small).

    Extension families are opt-in (``default=False``): tests name them in ``write_tiny_models``.
    """
    global FAMILIES
    if recipe.default:
        raise ValueError(f"{recipe.family}: extension families are opt-in (default=False)")
    other = _RECIPES.get(recipe.family)
    if other is not None and other != recipe:
        raise ValueError(f"tiny-model family {recipe.family} is already registered")
    _RECIPES[recipe.family] = recipe
    FAMILIES = tuple(_RECIPES)


def filename_for(family: str) -> str:
    return f"{PREFIX}{family}.safetensors"


# --------------------------------------------------------------------------------------------------
# ComfyUI access


def _default_comfy_root() -> str:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, ".host", "comfyui")


def ensure_comfy(comfy_root: str | None = None) -> None:
    """Bootstrap ComfyUI (CPU) unless it is already importable / imported."""
    if "comfy.model_management" in sys.modules and comfy_root is None:
        return
    from ..worker.bootstrap import import_comfy

    import_comfy(comfy_root or _default_comfy_root(), cpu=True)


def _meta_state(recipe: _Recipe) -> dict[str, Any]:
    """The state dict (meta tensors) of ComfyUI's own module for ``recipe``."""
    import torch

    if recipe.kind == "unet":
        import comfy.model_detection

        # device="meta" reaches every ComfyUI op; no meta context here (PixArt calls .item() in __init__).
        mc = comfy.model_detection.model_config_from_unet_config(dict(recipe.config))
        if mc is None or type(mc).__name__ != recipe.config_class:
            raise RuntimeError(f"{recipe.family}: config maps to {type(mc).__name__}, not {recipe.config_class}")
        mc.set_inference_dtype(torch.float32, None)
        return dict(mc.get_model({}, "", device="meta").diffusion_model.state_dict())
    with torch.device("meta"):
        if recipe.kind == "taesd":
            import comfy.taesd.taesd

            return dict(comfy.taesd.taesd.TAESD(latent_channels=recipe.config["latent_channels"]).state_dict())
        if recipe.kind == "clip_l":
            import comfy.clip_model
            import comfy.ops
            import comfy.sd1_clip

            cfg_path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            model = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "meta", comfy.ops.manual_cast)
            return dict(model.state_dict())
    raise ValueError(recipe.kind)


def _seed(family: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{family}/{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _tensor(recipe: _Recipe, key: str, meta: Any) -> Any:
    import torch

    dtype = getattr(torch, recipe.dtype)
    shape = tuple(meta.shape)
    if not meta.dtype.is_floating_point:
        raise RuntimeError(f"{recipe.family}: non-float tensor {key} {meta.dtype} needs an explicit value")
    if len(shape) == 0:  # TAESD vae_scale / vae_shift: the latent format's constants, as VAELoader sets them
        name = key.rsplit(".", 1)[-1]
        return torch.tensor(float(recipe.config[name]), dtype=torch.float32)
    if len(shape) == 1 and (key.endswith(".weight") or key.endswith(".scale")):
        return torch.ones(shape, dtype=dtype)  # norm gains (LayerNorm / GroupNorm / RMSNorm)
    gen = torch.Generator().manual_seed(_seed(recipe.family, key))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        std = 0.02  # biases
    else:
        std = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))  # LeCun normal: activations stay O(1)
    return t.mul_(std).to(dtype)


def _recipe_digest(recipe: _Recipe, meta_sd: Mapping[str, Any]) -> str:
    desc = {
        "version": GENERATOR_VERSION,
        "family": recipe.family,
        "dtype": recipe.dtype,
        "config": recipe.config,
        "tensors": sorted((k, list(v.shape)) for k, v in meta_sd.items()),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _read_header(path: str) -> tuple[dict[str, Any], int] | None:
    """(header, expected file size) of a safetensors file, or None if unreadable."""
    try:
        header, n = read_header_json(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return header, 8 + n + end


def _existing_matches(path: str, digest: str) -> bool:
    got = _read_header(path)
    if got is None:
        return False
    header, size = got
    meta = (header.get("__metadata__") or {}).get("xdit_tiny")
    try:
        ok = json.loads(meta)["recipe"] == digest if meta else False
    except (ValueError, KeyError, TypeError):
        ok = False
    return ok and os.path.getsize(path) == size


def _info(recipe: _Recipe, path: str, params: int) -> TinyModel:
    cfg_json = None if recipe.detected else json.dumps(recipe.config, sort_keys=True)
    return TinyModel(
        family=recipe.family,
        path=os.path.abspath(path),
        folder=recipe.folder,
        detected=recipe.detected,
        unet_config_json=cfg_json,
        config_class=recipe.config_class,
        params=params,
        **recipe.info,
    )


def write_one(recipe_or_family: _Recipe | str, out_dir: str, *, verify: bool = False) -> TinyModel:
    """Write one family's file under ``out_dir/<folder>/`` (see ``write_tiny_models``)."""
    from safetensors.torch import save

    recipe = _RECIPES[recipe_or_family] if isinstance(recipe_or_family, str) else recipe_or_family
    meta_sd = _meta_state(recipe)
    params = sum(int(math.prod(v.shape)) for v in meta_sd.values())
    folder = os.path.join(out_dir, recipe.folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename_for(recipe.family))
    digest = _recipe_digest(recipe, meta_sd)
    if not verify and _existing_matches(path, digest):
        return _info(recipe, path, params)
    tensors = {k: _tensor(recipe, k, v) for k, v in meta_sd.items()}
    # One metadata entry only: safetensors serialises metadata from a hash map, whose order is not fixed.
    meta = {"xdit_tiny": json.dumps({"family": recipe.family, "recipe": digest}, sort_keys=True)}
    blob = save(tensors, metadata=meta)
    del tensors
    if os.path.isfile(path) and os.path.getsize(path) == len(blob):
        with open(path, "rb") as f:
            if f.read() == blob:
                return _info(recipe, path, params)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return _info(recipe, path, params)


def write_tiny_models(
    out_dir: str,
    families: Iterable[str] | None = None,
    *,
    comfy_root: str | None = None,
    verify: bool = False,
) -> dict[str, TinyModel]:
    """Write the tiny models of ``families`` (default: ``DEFAULT_FAMILIES``) under ``out_dir``.

    Files go to ``out_dir/<TinyModel.folder>/xdit_tiny_<family>.safetensors``. An existing file is kept
    (not rewritten, mtime unchanged) when its header records the same recipe digest and its size is
    complete; ``verify=True`` regenerates and compares the bytes instead.
    """
    fams = list(DEFAULT_FAMILIES if families is None else families)
    unknown = [f for f in fams if f not in _RECIPES]
    if unknown:
        raise ValueError(f"unknown tiny-model families {unknown}; known: {list(FAMILIES)}")
    ensure_comfy(comfy_root)
    return {f: write_one(f, out_dir, verify=verify) for f in fams}


def describe(families: Iterable[str] | None = None, out_dir: str = "") -> dict[str, TinyModel]:
    """TinyModel records without writing (paths as they would be under ``out_dir``); needs ComfyUI."""
    ensure_comfy()
    out: dict[str, TinyModel] = {}
    for f in DEFAULT_FAMILIES if families is None else families:
        r = _RECIPES[f]
        params = sum(int(math.prod(v.shape)) for v in _meta_state(r).values())
        out[f] = _info(r, os.path.join(out_dir, r.folder, filename_for(f)), params)
    return out


# --------------------------------------------------------------------------------------------------
# Conditioning and latents for tests


def conditioning_for(
    tiny: TinyModel,
    batch: int = 1,
    tokens: int | None = None,
    seed: int = 0,
    *,
    width: int = 512,
    height: int = 512,
    guidance: float = 3.5,
) -> list[list[Any]]:
    """A ComfyUI CONDITIONING list (``[[context, extras]]``) that fits ``tiny``'s diffusion model.

    Random (seeded) tensors stand in for text-encoder output; ``width``/``height`` are the image size
    (SDXL and HunyuanDiT size conditioning).
    """
    import torch

    if tiny.folder != DIFFUSION_MODELS and tiny.folder != CHECKPOINTS:
        raise ValueError(f"{tiny.family} is not a diffusion model")
    gen = torch.Generator().manual_seed(seed)
    n = tokens or tiny.context_tokens
    ctx = torch.randn(batch, n, tiny.context_dim, generator=gen)
    extras: dict[str, Any] = {}
    fam = tiny.family
    if tiny.pooled_dim:
        extras["pooled_output"] = torch.randn(batch, tiny.pooled_dim, generator=gen)
    if fam.startswith("flux"):
        extras["guidance"] = guidance
    elif fam.startswith("chroma"):  # T5-only: CLIPTextEncode gives pooled_output None (model_base.Flux reads the key)
        extras["pooled_output"] = None
    elif fam == "pixart_alpha":  # micro-conditions (c_size, c_ar) from the image size
        extras.update(width=width, height=height)
    elif fam == "sdxl":
        extras.update(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    elif fam == "hunyuan_dit":
        if n != 77:  # HunYuanDiT's text_len (77 BERT tokens) and text_len_t5 (256) are fixed
            raise ValueError("HunyuanDiT conditioning has exactly 77 tokens (plus 256 mT5 tokens)")
        extras["conditioning_mt5xl"] = torch.randn(batch, 256, 2048, generator=gen)
        extras["attention_mask"] = torch.ones(batch, n, dtype=torch.int64)
        extras["attention_mask_mt5xl"] = torch.ones(batch, 256, dtype=torch.int64)
        extras.update(width=width, height=height)
    return [[ctx, extras]]


def empty_latent(tiny: TinyModel, width: int = 512, height: int = 512, batch: int = 1) -> dict[str, Any]:
    """``{"samples": zeros(B, C, H/8, W/8)}`` as EmptyLatentImage / EmptySD3LatentImage make it."""
    import torch

    if width % 16 or height % 16:
        raise ValueError("width and height must be multiples of 16 (8x VAE, patch 2)")
    return {"samples": torch.zeros(batch, tiny.latent_channels, height // 8, width // 8)}


# --------------------------------------------------------------------------------------------------
# Extension modules: importing one registers its recipes (it imports this module's names, all defined
# above this point, so the circular import is safe).

_EXTENSIONS: tuple[str, ...] = (
    "xdit_multigpu.testing.tiny_models_chroma_qwen",  # chroma, chroma_radiance, qwen_image
    "xdit_multigpu.testing.tiny_models_video",  # lumina2, zimage, wan21, wan22
)


def _load_extensions() -> None:
    """Import each extension and register its ``RECIPES`` here (idempotent: also after a reload of this
    module, when the extension itself is not imported again)."""
    import importlib

    for name in _EXTENSIONS:
        for recipe in getattr(importlib.import_module(name), "RECIPES", ()):
            if recipe.family not in _RECIPES:
                register_recipe(recipe)


_load_extensions()


# --------------------------------------------------------------------------------------------------
# CLI


def _summary(models: Mapping[str, TinyModel]) -> list[dict[str, Any]]:
    rows = []
    for m in models.values():
        d = asdict(m)
        d["bytes"] = os.path.getsize(m.path) if os.path.isfile(m.path) else None
        rows.append(d)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdit_multigpu.testing.tiny_models", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="models root; files go to <out>/<folder>/xdit_tiny_<family>.safetensors")
    p.add_argument("--families", nargs="*", default=None, help=f"default {' '.join(DEFAULT_FAMILIES)}; also: "
                   + " ".join(f for f in FAMILIES if f not in DEFAULT_FAMILIES))
    p.add_argument("--comfy-root", default=None, help="ComfyUI tree (default $COMFYUI_PATH or .host/comfyui)")
    p.add_argument("--verify", action="store_true", help="regenerate and compare bytes even if the recipe matches")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    models = write_tiny_models(a.out, a.families, comfy_root=a.comfy_root, verify=a.verify)
    json.dump({"seconds": round(time.perf_counter() - t0, 2), "models": _summary(models)}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    # The package module's main: extension recipes register there, not in this ``__main__`` copy.
    from xdit_multigpu.testing import tiny_models as _package_module

    raise SystemExit(_package_module.main())

