"""PixArt-Σ and HunyuanDiT sequence parallel through the real engine path (Ray actors, gloo, ComfyUI's
sampler on every rank), on the tiny model *files* the workers load themselves.

2 CPU ranks per family; plans Ulysses 2 and Ring 2 on one pool (switched per request, as in
production); euler and dpmpp_2m. Parallel latent vs one-device latent: max abs diff <= 1e-4 (fp32).
The tiny files are EPS / V-prediction models with random weights, so the requests start from a random
latent at denoise 0.3 (img2img) to keep latents O(10) and fp32 rounding far below the tolerance.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, ParallelPlan

sys.path.insert(0, str(Path(__file__).parent))
from _harness import load_tiny  # noqa: E402
from test_ray_matrix import engine  # noqa: E402, F401  (fixture reused)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
pytest.importorskip("ray")
TOL = 1e-4
FAMILIES = {"pixart_sigma": "pixart", "hunyuan_dit": "hunyuan_dit"}  # tiny family -> ModelSpec name
PLANS = (ParallelPlan(ulysses=2), ParallelPlan(ring=2))


@pytest.fixture(scope="module")
def models(comfy_root, tmp_path_factory):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    return load_tiny(write_tiny_models(str(tmp_path_factory.mktemp("models")), list(FAMILIES)))


def _request(tiny, patcher, sampler: str):
    """img2img at denoise 0.3 from a seeded random latent, at the model's smallest latent side."""
    import torch

    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for
    from xdit_multigpu.worker import comfy_runtime

    side = max(16, tiny.min_latent)
    shape = (1, tiny.latent_channels, side, side)
    latent = {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(3))}
    latent_image, noise = comfy_runtime.prepare_noise(patcher, latent, seed=11)
    cond = dict(width=side * 8, height=side * 8)
    return SampleRequest(noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1, **cond),
                         negative=conditioning_for(tiny, seed=2, **cond), seed=11, steps=2, cfg=3.0,
                         sampler_name=sampler, scheduler="simple", denoise=0.3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequence_parallel_plans_match_one_device(models, engine, family):  # noqa: F811
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), family=FAMILIES[family])
    pool = engine.pool(spec)
    failures, seen = [], []
    for sampler in ("euler", "dpmpp_2m"):
        req = _request(tiny, patcher, sampler)
        ref = comfy_runtime.run_sampler(patcher, req)
        seen.append(float(ref.abs().max()))
        for plan in PLANS:
            got = pool.sample(dataclasses.replace(req, plan=plan), timeout=240)
            diff = float((got - ref).abs().max())
            if not diff <= TOL:
                failures.append(f"{plan.describe()} {sampler}: {diff:.3e} (|ref| max {seen[-1]:.1f})")
    assert not failures, failures
    assert min(seen) > 1.0, f"degenerate references: {seen}"
    engine.release_all(stop_ray=False)
