"""GPU tier: the engine on 2 and 4 GPUs (NCCL, Ray actors) vs ComfyUI's sampler on 1 GPU, in bf16.

Tolerance: relative L2 of the final latent <= 2e-2. bf16 keeps 8 significant bits (unit roundoff
2^-8 = 3.9e-3); sequence / CFG parallelism changes only the order of reductions (attention split
over ranks and merged by log-sum-exp in fp32, GEMMs on other batch shapes), so each step differs by a
few roundoffs and a few steps compound that to about 1e-2. A wrong shard or gather gives O(1).
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import COMFYUI_PATH

pytestmark = pytest.mark.gpu
REL_L2 = 2e-2
EXTRA_FAMILIES = ["chroma", "qwen_image"]  # engine equivalence only (test_engine_matches_one_gpu)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 GPUs")
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(COMFYUI_PATH, cpu=False)
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), families=["flux", "sd3", *EXTRA_FAMILIES])


def _reference(tiny, req):
    """ComfyUI's sampler in this (the test) process on GPU 0."""
    from xdit_multigpu.config import LoaderKind, LoadSpec
    from xdit_multigpu.worker import comfy_runtime

    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    patcher = comfy_runtime.load_diffusion_model(load)
    return comfy_runtime.run_sampler(patcher, req).float().cpu(), load


def _one_gpu_worker(load, family, req):
    """ComfyUI's sampler in a one-rank worker pool on GPU 0: the same kind of process as every parallel rank."""
    from xdit_multigpu.config import DeviceSet, DispatcherSpec
    from xdit_multigpu.engine.engine import get_engine

    pool = get_engine().pool(DispatcherSpec(load, DeviceSet.parse("0", 1), family=family))
    return pool.sample(req, timeout=300).float()


@pytest.mark.parametrize("family", ["flux", "sd3", *EXTRA_FAMILIES])
@pytest.mark.parametrize("strategy", ["Hybrid", "USP"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_engine_matches_one_gpu(setup, family, strategy, cfg):
    from xdit_multigpu.testing.tiny_models import empty_latent

    tiny = setup[family]
    latent = empty_latent(tiny, 512, 512)["samples"]
    if family == "qwen_image":  # Wan21 latent format: (B, 16, 1, H, W), as fix_empty_latent_channels makes it
        latent = latent.unsqueeze(2)
    _engine_matches_one_gpu(tiny, family, latent, strategy, cfg)


def _engine_matches_one_gpu(tiny, family, latent, strategy, cfg):
    """The engine on 2 and 4 GPUs vs ComfyUI's sampler in a one-GPU worker: same shape, rel L2 <= REL_L2."""
    import comfy.sample
    import torch

    from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
    from xdit_multigpu.engine.engine import get_engine
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup
    from xdit_multigpu.testing.tiny_models import conditioning_for

    req = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                        positive=conditioning_for(tiny, seed=1), negative=conditioning_for(tiny, seed=2), seed=5,
                        steps=4, cfg=cfg, sampler_name="euler", scheduler="simple")
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    spec_name = lookup(tiny.config_class).name
    ref = _one_gpu_worker(load, spec_name, req)
    engine = get_engine()
    for n in (2, 4):
        if torch.cuda.device_count() < n:
            continue
        spec = DispatcherSpec(load, DeviceSet.parse(",".join(map(str, range(n))), n), ParallelStrategy(strategy),
                              family=spec_name)
        out = engine.sample(spec, req, lookup(tiny.config_class), tiny.heads, cfg != 1.0, None)
        assert out.fallback_reason is None
        got = out.latent.float()
        rel = float((got - ref).norm() / ref.norm())
        print(f"{family} cfg {cfg} {strategy} {n} GPUs {out.plan.describe()}: rel_l2 {rel:.2e}, "
              f"max_abs {float((got - ref).abs().max()):.3e}")
        assert got.shape == latent.shape and rel <= REL_L2, (n, out.plan.describe(), rel)
    engine.release_all()


PROCESS_STATE = pytest.mark.xfail(
    reason="open defect (docs/benchmarks.md): on H100 a worker process and the test process give different "
    "bf16 results for the same one-GPU sampling (tiny Flux rel L2 0.2, tiny SD3 5e-4); not parallelism",
    strict=False,
)


@PROCESS_STATE
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_one_rank_pool_equals_in_process(setup, family):
    """The worker path itself (Ray actor, its own process, no parallelism) must reproduce the in-process
    sampler on the same GPU exactly: any difference here is process state, not parallelism."""
    import comfy.sample

    from xdit_multigpu.config import DeviceSet, DispatcherSpec
    from xdit_multigpu.engine.engine import get_engine
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    tiny = setup[family]
    latent = empty_latent(tiny, 512, 512)["samples"]
    req = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                        positive=conditioning_for(tiny, seed=1), negative=conditioning_for(tiny, seed=2), seed=5,
                        steps=4, cfg=1.0, sampler_name="euler", scheduler="simple")
    ref, load = _reference(tiny, req)
    pool = get_engine().pool(DispatcherSpec(load, DeviceSet.parse("0", 1), family=family))
    got = pool.sample(req, timeout=300).float()
    rel = float((got - ref).norm() / ref.norm())
    print(f"{family}: 1-rank pool vs in-process rel_l2 {rel:.2e}")
    get_engine().release_all()
    assert rel <= 1e-6, rel


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_xfuser_backend_matches_one_gpu(setup, family):
    """The optional xfuser attention backend on GPUs (its own kernels: FA3 / flash-attn / torch flash)
    against the one-GPU worker, for Ulysses, Ring and Ulysses x Ring plans given explicitly."""
    import comfy.sample
    import torch

    from xdit_multigpu.config import (AttentionBackend, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec,
                                      ParallelPlan)
    from xdit_multigpu.engine.engine import get_engine
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    tiny = setup[family]
    latent = empty_latent(tiny, 512, 512)["samples"]
    req = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                        positive=conditioning_for(tiny, seed=1), negative=conditioning_for(tiny, seed=2), seed=5,
                        steps=4, cfg=1.0, sampler_name="euler", scheduler="simple")
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    ref = _one_gpu_worker(load, family, req)
    plans = [(2, (1, 2, 1)), (2, (1, 1, 2)), (4, (1, 2, 2)), (4, (1, 1, 4))]
    for n, degrees in plans:
        if torch.cuda.device_count() < n:
            continue
        pool = get_engine().pool(DispatcherSpec(load, DeviceSet.parse(",".join(map(str, range(n))), n), family=family))
        for backend in AttentionBackend:
            plan = ParallelPlan(*degrees, attention=backend)
            got = pool.sample(dataclasses.replace(req, plan=plan), timeout=300).float()
            rel = float((got - ref).norm() / ref.norm())
            print(f"{family} {plan.describe()} {backend.value}: rel_l2 {rel:.2e}")
            assert rel <= REL_L2, (plan.describe(), backend.value, rel)
    get_engine().release_all()


# --- Lumina 2 / Z-Image and Wan 2.1 / 2.2 T2V (xdit_multigpu.testing.tiny_models_video) -----------------
# Lumina: 64 x 64 latent (1024 image tokens + 24 caption tokens; Z-Image pads both to 32); Wan: 5 latent
# frames of 32 x 32 (1280 video tokens, 32 umT5-width text tokens). About 10-20 s per case after the pools start.
VIDEO_FAMILIES = ["lumina2", "zimage", "wan21", "wan22"]


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 GPUs")
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(COMFYUI_PATH, cpu=False)
    from xdit_multigpu.testing.tiny_models_video import write_video_models

    return write_video_models(str(tmp_path_factory.mktemp("tiny_video")), VIDEO_FAMILIES)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("strategy", ["Hybrid", "USP"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_video_families_match_one_gpu(video_setup, family, strategy, cfg):
    """Same check as ``test_engine_matches_one_gpu`` for the NextDiT and Wan hooks (Wan: 5-D latent)."""
    from xdit_multigpu.testing.tiny_models_video import empty_video_latent

    tiny = video_setup[family]
    side = 32 if family.startswith("wan") else 64
    _engine_matches_one_gpu(tiny, family, empty_video_latent(tiny, side, frames=5)["samples"], strategy, cfg)
