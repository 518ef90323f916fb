"""Lumina 2, Z-Image, Wan 2.1 and Wan 2.2 T2V through the real engine path (Ray actors, gloo, ComfyUI's
sampler on every rank) on the tiny model *files* the workers load themselves
(``xdit_multigpu.testing.tiny_models_video``: Lumina 2 / Z-Image from an explicit unet_config, Wan detected).

2 CPU ranks per family; plans Ulysses 2, Ring 2 and CFG 2 on one pool (switched per request), euler and
dpmpp_2m, an even and an uneven token count (Lumina 2: 10 x 9 = 90 and 9 x 9 = 81 image tokens, Z-Image
pads both to 96; Wan: 3 frames x 4 x 4 = 48 and 3 x 5 x 5 = 75 video tokens), and ``Engine.sample``
with Hybrid / USP exactly as the GPU tier calls it. Parallel latent vs one-device latent: max abs diff
<= 1e-4 (fp32 CPU workers).
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
FAMILIES = {"lumina2": "lumina2", "zimage": "lumina2", "wan21": "wan", "wan22": "wan"}  # tiny -> spec name
PLANS = (ParallelPlan(ulysses=2), ParallelPlan(ring=2), ParallelPlan(cfg=2))


@pytest.fixture(scope="module")
def models(comfy_root, tmp_path_factory):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.testing.tiny_models_video import write_video_models

    return load_tiny(write_video_models(str(tmp_path_factory.mktemp("models")), list(FAMILIES)))


SHAPES = {"image": {"even": (20, 18), "uneven": (18, 18)}, "video": {"even": (3, 8, 8), "uneven": (3, 10, 10)}}


def _shape(tiny, kind: str) -> tuple[int, ...]:
    return (1, tiny.latent_channels, *SHAPES["video" if tiny.family.startswith("wan") else "image"][kind])


def _request(tiny, patcher, sampler: str, kind: str):
    """text-to-image / -video from an empty latent (flow models: latents stay O(1)); shorter negative."""
    import torch

    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for
    from xdit_multigpu.worker import comfy_runtime

    latent = {"samples": torch.zeros(_shape(tiny, kind))}
    latent_image, noise = comfy_runtime.prepare_noise(patcher, latent, seed=11)
    return SampleRequest(noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
                         negative=conditioning_for(tiny, seed=2, tokens=11), seed=11, steps=2, cfg=3.0,
                         sampler_name=sampler, scheduler="simple", denoise=1.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_plans_match_one_device(models, engine, family):  # noqa: F811
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), family=FAMILIES[family])
    pool = engine.pool(spec)
    failures, seen = [], []
    for sampler, kind, plans in (("euler", "even", PLANS), ("dpmpp_2m", "even", PLANS),
                                 ("euler", "uneven", PLANS[:2])):
        req = _request(tiny, patcher, sampler, kind)
        ref = comfy_runtime.run_sampler(patcher, req)
        seen.append(float(ref.abs().max()))
        for plan in plans:
            got = pool.sample(dataclasses.replace(req, plan=plan), timeout=240)
            diff = float((got - ref).abs().max())
            if not (got.shape == ref.shape and diff <= TOL):
                failures.append(f"{plan.describe()} {sampler} {kind}: {diff:.3e} (|ref| max {seen[-1]:.2f})")
    assert not failures, failures
    assert min(seen) > 0.5, f"degenerate references: {seen}"
    engine.release_all(stop_ray=False)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["Hybrid", "USP"])
def test_engine_as_the_gpu_tier_calls_it(models, engine, family, strategy):  # noqa: F811
    """``Engine.sample`` with the request built as ``tests/gpu/test_parallel_bf16.py`` builds it (Wan: 5-D,
    5 frames; smaller sides here). Hybrid on 2 devices with CFG is CFG 2; USP is Ulysses 2."""
    import comfy.sample

    from xdit_multigpu.config import ParallelStrategy
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup
    from xdit_multigpu.testing.tiny_models import conditioning_for
    from xdit_multigpu.testing.tiny_models_video import empty_video_latent
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    latent = empty_video_latent(tiny, 12 if family.startswith("wan") else 20, frames=5)["samples"]
    req = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                        positive=conditioning_for(tiny, seed=1), negative=conditioning_for(tiny, seed=2), seed=5,
                        steps=2, cfg=3.0, sampler_name="euler", scheduler="simple")
    ref = comfy_runtime.run_sampler(patcher, req)
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), ParallelStrategy(strategy),
                          family=FAMILIES[family])
    out = engine.sample(spec, req, lookup(tiny.config_class), tiny.heads, True, None)
    assert out.fallback_reason is None
    assert (out.plan.cfg, out.plan.ulysses) == ((2, 1) if strategy == "Hybrid" else (1, 2))
    assert out.latent.shape == latent.shape
    assert float((out.latent - ref).abs().max()) <= TOL and float(ref.abs().max()) > 0.5
    engine.release_all(stop_ray=False)
