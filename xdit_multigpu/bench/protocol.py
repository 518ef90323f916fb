"""The measurement protocol shared by the stock baseline and the engine rows.

Per (model, size, device count): a 2-step warm-up request, then one timed request of ``repeats + 1``
steps whose ``repeats`` step intervals (CUDA events at the sampler's step callback, ``timing.py``) give
the per-step latency as their median; for the end-to-end sizes, one request of ``e2e_steps`` (28) steps
timed wall-clock from the caller. Every request uses the same seed, noise and conditioning, so the
timed latents of all rows can be compared with the stock one.
"""

from __future__ import annotations

from typing import Any

from ..engine.request import SampleRequest
from .realsize import Arch

SEED = 1


def make_request(arch: Arch, size: int, steps: int, batch: int = 1) -> SampleRequest:
    """One ``comfy.sample.sample`` call for ``arch`` at ``size`` x ``size`` pixels (one conditioning for the
    whole batch)."""
    import comfy.sample
    import torch

    latent = torch.zeros(batch, arch.latent_channels, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    pos, neg = arch.conditioning(size, size)
    sampler, scheduler = arch.sampler
    return SampleRequest(noise=noise, latent_image=latent, positive=pos, negative=neg, seed=SEED, steps=steps,
                         cfg=arch.cfg, sampler_name=sampler, scheduler=scheduler)


def compare(got: Any, ref: Any) -> dict[str, Any]:
    """bf16 agreement of a latent with the stock one: relative L2 and max abs difference."""
    g, r = got.float(), ref.float()
    if g.shape != r.shape:
        return {"shape_mismatch": [list(g.shape), list(r.shape)]}
    return {"rel_l2": float((g - r).norm() / r.norm().clamp_min(1e-12)), "max_abs_diff": float((g - r).abs().max()),
            "ref_max_abs": float(r.abs().max()), "finite": bool(g.isfinite().all())}
