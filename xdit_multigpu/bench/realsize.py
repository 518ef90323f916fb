"""Real-size architectures with random weights (speed does not depend on values), in ComfyUI's layout."""

from __future__ import annotations

import json
import os
import time
from typing import Any

# Flux.1-dev as ComfyUI detects it (model_detection: hidden 3072, 24 heads, 19 double + 38 single).
FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def write_random_flux_dev(path: str, device: str = "cuda") -> dict[str, Any]:
    """Write Flux.1-dev with random bf16 weights (1-D norm scales = 1) to ``path`` (~24 GB); skip if present."""
    import comfy.supported_models
    import torch
    from safetensors.torch import save_file

    if os.path.isfile(path):
        return {"path": path, "bytes": os.path.getsize(path), "write_s": 0.0}
    t0 = time.perf_counter()
    model = comfy.supported_models.Flux(dict(FLUX_DEV)).get_model({}, device="meta")
    gen = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for key, meta in model.diffusion_model.state_dict().items():
        if meta.ndim == 1 and ("norm" in key or key.endswith(".scale")):
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(meta.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        sd[key] = t
    tmp = path + ".partial"
    save_file(sd, tmp, metadata={"xdit_bench": json.dumps({"arch": "flux-dev", "random": True})})
    os.replace(tmp, path)
    return {"path": path, "bytes": os.path.getsize(path), "write_s": round(time.perf_counter() - t0, 1)}


def flux_conditioning(seed: int = 0, tokens: int = 512) -> tuple[list, list]:
    """Positive / negative CONDITIONING shaped like CLIP-L + T5-XXL output for Flux (random, seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                          "guidance": 3.5}]]
    neg = [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                          "guidance": 3.5}]]
    return pos, neg
