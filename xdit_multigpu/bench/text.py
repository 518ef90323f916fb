"""Text encoding for the benchmark's end-to-end image: ComfyUI's own text encoders at real size, random weights.

A 28-step image in ComfyUI is CLIPTextEncode + KSampler + VAEDecode. The sampler rows feed fixed random
conditioning (``realsize``), so the encode is timed once per model here, in the stock process on one GPU,
as ComfyUI runs it: a state dict of each encoder's real keys and shapes (ComfyUI's own module classes
built on ``meta``) goes through ``comfy.sd.load_text_encoder_state_dicts``, which detects the encoders
and builds the ``CLIP`` object the loader node would return; then ``tokenize`` +
``encode_from_tokens_scheduled`` (what ``CLIPTextEncode`` calls) on a typical prompt, warm-up first.

The encode runs in ComfyUI's process in both setups (the pack's workers get its output), so it adds the
same time to the stock and the parallel end-to-end figures.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any

# Real-size encoders of each benchmark model, as ComfyUI's loaders combine them: (CLIPType name, encoders).
ENCODERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flux-dev": ("FLUX", ("clip_l", "t5xxl")),
    "chroma-hd": ("CHROMA", ("t5xxl",)),
    "sd35-large": ("SD3", ("clip_l", "clip_g", "t5xxl")),
    "pixart-sigma": ("PIXART", ("t5xxl",)),
    "pixart-alpha": ("PIXART", ("t5xxl",)),
    "sdxl": ("STABLE_DIFFUSION", ("clip_l", "clip_g")),
}
# HunyuanDiT (Chinese BERT + mT5-XL) is not built here: its end-to-end figure leaves text encoding out.

PROMPT = ("a photograph of an old lighthouse on a rocky coast at golden hour, waves breaking against the "
          "rocks, seagulls in the sky, dramatic clouds, warm light on the white tower, highly detailed, "
          "35 mm film, shallow depth of field")


def _config(relpath: str) -> dict[str, Any]:
    import comfy.sd1_clip  # comfy is a namespace package: locate its folder through a module in it

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), relpath)) as f:
        return json.load(f)


# Each encoder as its released checkpoint holds it: (ComfyUI module class, its config under comfy/, dtype).
_BUILDS = {
    "clip_l": ("comfy.clip_model.CLIPTextModel", "sd1_clip_config.json", "float16"),
    "clip_g": ("comfy.clip_model.CLIPTextModel", "clip_config_bigg.json", "float16"),
    "t5xxl": ("comfy.text_encoders.t5.T5", "text_encoders/t5_config_xxl.json", "bfloat16"),
}


def meta_state_dict(encoder: str) -> dict[str, Any]:
    """Keys, shapes and dtypes (``meta`` tensors) of one encoder's checkpoint as the released files hold them.

    ComfyUI's module classes mirror the Hugging Face layouts of these files, so their own state dict keys
    are the ones ``comfy.sd.detect_te_model`` recognises (CLIP-L, CLIP-G, T5-XXL).
    """
    import importlib

    import comfy.ops
    import torch

    if encoder not in _BUILDS:
        raise ValueError(f"unknown text encoder {encoder!r} (known: {', '.join(_BUILDS)})")
    class_path, config, dtype = _BUILDS[encoder]
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with torch.device("meta"):
        return dict(cls(_config(config), getattr(torch, dtype), "meta", comfy.ops.manual_cast).state_dict())


def random_state_dict(encoder: str, device: str, seed: int = 0) -> dict[str, Any]:
    """``meta_state_dict(encoder)`` filled with random values (norm scales 1, weights N(0, 1/fan_in)), in
    the dtype of the released files (CLIP fp16, T5-XXL bf16), on the CPU; drawn on ``device``."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for key, t in meta_state_dict(encoder).items():
        shape, dtype = tuple(t.shape), t.dtype
        if not dtype.is_floating_point:  # e.g. CLIP's position_ids buffer
            sd[key] = torch.arange(shape[-1]).expand(shape).clone() if shape else torch.zeros(())
            continue
        if len(shape) == 1 and key.endswith(".weight") and "embedding" not in key:
            sd[key] = torch.ones(shape, dtype=dtype)
            continue
        std = 0.02 if len(shape) <= 1 else 1.0 / math.sqrt(max(1, shape[-1]))
        sd[key] = (torch.randn(shape, generator=gen, device=device) * std).to(dtype).cpu()
    return sd


def random_clip(model: str, device: str) -> Any:
    """ComfyUI's ``CLIP`` for ``model``'s encoders (``ENCODERS``), built by ComfyUI's text-encoder loader."""
    import comfy.sd

    clip_type, encoders = ENCODERS[model]
    state_dicts = [random_state_dict(e, device, seed=i) for i, e in enumerate(encoders)]
    return comfy.sd.load_text_encoder_state_dicts(state_dicts, clip_type=getattr(comfy.sd.CLIPType, clip_type))


def encode_s(model: str, cuda: bool, repeats: int = 3) -> dict[str, Any]:
    """Median seconds of ``CLIPTextEncode`` on ``PROMPT`` (after a warm-up that moves the weights to the
    device), or why it was not timed. Frees the encoder afterwards."""
    import comfy.model_management as mm
    import torch

    if model not in ENCODERS:
        return {"text_encode_s": None, "text_encode_note": f"{model}: no real-size text encoders in the benchmark"}
    clip = random_clip(model, "cuda" if cuda else "cpu")
    times = []
    with torch.inference_mode():  # as ComfyUI's executor runs CLIPTextEncode
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    shape = list(cond[0][0].shape)
    del clip, cond
    mm.soft_empty_cache()
    return {"text_encode_s": round(statistics.median(times), 4), "text_encoders": list(ENCODERS[model][1]),
            "text_encode_output": shape}
