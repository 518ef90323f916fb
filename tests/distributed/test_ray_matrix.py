"""The parallel plans through the real engine path: Ray actors, gloo, ComfyUI's sampler on every rank.

Matrix (the engine issue's): 2 and 4 CPU ranks; Ulysses only, Ring only, Ulysses x Ring, CFG, CFG x USP;
samplers euler, euler_ancestral, dpmpp_2m, uni_pc; denoise 1.0 and 0.6; tiny Flux and tiny SD3. Each
pool (model x world) starts once; plans are switched per request on the same pool, as in production.
Parallel latent vs one-device latent: max abs diff <= 1e-4 (fp32).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelPlan

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]
pytest.importorskip("ray")
TOL = 1e-4
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "uni_pc")
PLANS = {
    2: (ParallelPlan(ulysses=2), ParallelPlan(ring=2), ParallelPlan(cfg=2)),
    4: (ParallelPlan(ulysses=4), ParallelPlan(ring=4), ParallelPlan(ulysses=2, ring=2),
        ParallelPlan(cfg=2, ulysses=2), ParallelPlan(cfg=2, ring=2)),
}


@pytest.fixture(scope="module")
def models(comfy_root, tmp_path_factory):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.testing.tiny_models import write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    tiny = write_tiny_models(str(tmp_path_factory.mktemp("models")), ["flux", "sd3"])
    out = {}
    for fam, t in tiny.items():
        load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, t.path, unet_config_json=t.unet_config_json)
        out[fam] = (t, load, comfy_runtime.load_diffusion_model(load))
    return out


@pytest.fixture(scope="module")
def engine():
    from xdit_multigpu.engine.engine import Engine
    from xdit_multigpu.engine.pool import Timeouts
    from xdit_multigpu.executor.cluster import shutdown_cluster

    eng = Engine(Timeouts(start_s=300, sample_s=300, collective_s=120, health_s=30))
    yield eng
    eng.release_all()
    shutdown_cluster()


def _request(tiny, patcher, sampler: str, denoise: float):
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent
    from xdit_multigpu.worker import comfy_runtime

    latent = empty_latent(tiny, 128, 128)
    if denoise < 1.0:  # img2img: start from a non-empty latent
        import torch

        latent = {"samples": torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))}
    latent_image, noise = comfy_runtime.prepare_noise(patcher, latent, seed=11)
    return SampleRequest(noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
                         negative=conditioning_for(tiny, seed=2), seed=11, steps=2, cfg=3.0,
                         sampler_name=sampler, scheduler="simple", denoise=denoise)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("world", [2, 4])
def test_every_plan_sampler_and_denoise_matches_one_device(models, engine, family, world):
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, tuple(range(world)), f"cpu:{world}"), family=family)
    pool = engine.pool(spec)
    failures = []
    for sampler in SAMPLERS:
        for denoise in (1.0, 0.6):
            req = _request(tiny, patcher, sampler, denoise)
            ref = comfy_runtime.run_sampler(patcher, req)
            for plan in PLANS[world]:
                got = pool.sample(dataclasses.replace(req, plan=plan), timeout=240)
                diff = float((got - ref).abs().max())
                if not diff <= TOL:
                    failures.append(f"{plan.describe()} {sampler} denoise {denoise}: {diff:.3e}")
    assert not failures, failures
    engine.release_all(stop_ray=False)


EIGHT = (ParallelPlan(ring=8), ParallelPlan(ulysses=4, ring=2), ParallelPlan(cfg=2, ulysses=4),
         ParallelPlan(cfg=2, ulysses=2, ring=2))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_eight_ranks(models, engine, family):
    """8 CPU ranks (the 8-GPU layouts the planner produces), one sampler: parallel == one device."""
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models[family]
    spec = DispatcherSpec(load, DeviceSet(DeviceKind.CPU, tuple(range(8)), "cpu:8"), family=family)
    pool = engine.pool(spec)
    req = _request(tiny, patcher, "dpmpp_2m", 1.0)
    ref = comfy_runtime.run_sampler(patcher, req)
    diffs = {plan.describe(): float((pool.sample(dataclasses.replace(req, plan=plan), timeout=300) - ref).abs().max())
             for plan in EIGHT}
    engine.release_all(stop_ray=False)
    assert all(d <= TOL for d in diffs.values()), diffs


def test_ulysses_degree_sets_the_split_through_the_engine(models, engine):
    """``ulysses_degree`` (DispatcherSpec, the loaders' advanced input): USP on 4 ranks as Ulysses 2 x Ring 2
    and Hybrid with an uncond pass as CFG 2 x Ring 2, equal to one device; an impossible degree is a
    ConfigError naming the field, before any worker starts."""
    from xdit_multigpu.config import ParallelStrategy
    from xdit_multigpu.errors import ConfigError
    from xdit_multigpu.models import lookup
    from xdit_multigpu.worker import comfy_runtime

    tiny, load, patcher = models["flux"]
    devices = DeviceSet(DeviceKind.CPU, tuple(range(4)), "cpu:4")
    req = _request(tiny, patcher, "euler", 1.0)
    ref = comfy_runtime.run_sampler(patcher, req)
    model_spec = lookup(tiny.config_class)
    for strategy, degree, want in ((ParallelStrategy.USP, 2, (1, 2, 2)), (ParallelStrategy.HYBRID, 1, (2, 1, 2))):
        spec = DispatcherSpec(load, devices, strategy, family="flux", ulysses_degree=degree)
        out = engine.sample(spec, req, model_spec, tiny.heads, True, patcher)
        assert out.fallback_reason is None, out.fallback_reason
        assert (out.plan.cfg, out.plan.ulysses, out.plan.ring) == want, out.plan.describe()
        assert "ulysses_degree" in out.plan.reason
        assert float((out.latent - ref).abs().max()) <= TOL
    engine.release_all(stop_ray=False)
    started = []
    engine.pool = lambda spec: started.append(spec)  # shadows the method on this instance only
    try:
        with pytest.raises(ConfigError, match="ulysses_degree: is 3"):
            engine.sample(DispatcherSpec(load, devices, ParallelStrategy.USP, family="flux", ulysses_degree=3),
                          req, model_spec, tiny.heads, True, patcher)
    finally:
        del engine.pool
    assert started == []
