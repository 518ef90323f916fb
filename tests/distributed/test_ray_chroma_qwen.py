"""Chroma and Qwen-Image sequence parallel through the real engine path (Ray actors, gloo, ComfyUI's
sampler on every rank), on the tiny model *files* the workers load themselves (explicit unet_config,
``LoadSpec.unet_config_json``: ComfyUI's detection hard-codes 3072-wide layouts).

2 CPU ranks per family; plans Ulysses 2, Ring 2 and CFG 2 on one pool (switched per request, as in
production); euler and dpmpp_2m; a 20 x 18 latent (90 tokens: even) and, for Ulysses, an 18 x 18 one
(81 tokens: uneven shards). Parallel latent vs one-device latent: max abs diff <= 1e-4 (fp32).
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
FAMILIES = ("chroma", "qwen_image")  # tiny family == ModelSpec name
PLANS = (ParallelPlan(ulysses=2), ParallelPlan(ring=2), ParallelPlan(cfg=2))


@pytest.fixture(scope="module")
def models(comfy_root, tmp_path_factory):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    return load_tiny(write_tiny_models(str(tmp_path_factory.mktemp("models")), list(FAMILIES)))


def _request(tiny, patcher, sampler: str, hw: tuple[int, int]):
    """text-to-image from an empty latent (flow models: latents stay O(1))."""
    import torch

    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for
    from xdit_multigpu.worker import comfy_runtime

    latent = {"samples": torch.zeros(1, tiny.latent_channels, *hw)}
    latent_image, noise = comfy_runtime.prepare_noise(patcher, latent, seed=11)
    return SampleRequest(noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
                         negative=conditioning_for(tiny, seed=2, tokens=11), seed=11, steps=2, cfg=3.0,
                         sampler_name=sampler, scheduler="simple", denoise=1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_plans_match_one_device(models, engine, family):  # noqa: F811
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), family=family)
    pool = engine.pool(spec)
    failures, seen = [], []
    for sampler, hw, plans in (("euler", (20, 18), PLANS), ("dpmpp_2m", (20, 18), PLANS),
                               ("euler", (18, 18), PLANS[:1])):
        req = _request(tiny, patcher, sampler, hw)
        ref = comfy_runtime.run_sampler(patcher, req)
        seen.append(float(ref.abs().max()))
        for plan in plans:
            got = pool.sample(dataclasses.replace(req, plan=plan), timeout=240)
            diff = float((got - ref).abs().max())
            if not diff <= TOL:
                failures.append(f"{plan.describe()} {sampler} {hw}: {diff:.3e} (|ref| max {seen[-1]:.2f})")
    assert not failures, failures
    assert min(seen) > 0.5, f"degenerate references: {seen}"
    engine.release_all(stop_ray=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_hybrid_as_the_gpu_tier_calls_it(models, engine, family):  # noqa: F811
    """``Engine.sample`` with the Hybrid strategy (planner: CFG 2 on 2 devices) and the request built as
    ``tests/gpu/test_parallel_bf16.py`` builds it (Qwen-Image: the latent unsqueezed to 5-D there)."""
    import comfy.sample

    from xdit_multigpu.config import ParallelStrategy
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    latent = empty_latent(tiny, 160, 144)["samples"]
    if family == "qwen_image":
        latent = latent.unsqueeze(2)
    req = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                        positive=conditioning_for(tiny, seed=1), negative=conditioning_for(tiny, seed=2), seed=5,
                        steps=2, cfg=3.0, sampler_name="euler", scheduler="simple")
    ref = comfy_runtime.run_sampler(patcher, req)
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), ParallelStrategy.HYBRID, family=family)
    out = engine.sample(spec, req, lookup(tiny.config_class), tiny.heads, True, None)
    assert out.fallback_reason is None and out.plan.cfg == 2
    assert float((out.latent - ref).abs().max()) <= TOL and float(ref.abs().max()) > 0.5
    engine.release_all(stop_ray=False)
