"""Engine end to end on 2 CPU ranks: a tiny SD3 (ComfyUI-detected) sampled with ComfyUI's own sampler
inside Ray workers must match one-device ``comfy.sample.sample``; every failure falls back to one device
with a reason and the next call builds a fresh pool.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

pytest.importorskip("ray")
TOL = 1e-4


@pytest.fixture(scope="module")
def sd3(comfy_root, tmp_path_factory):
    """(LoadSpec, in-process patcher, request, one-device reference latent)."""
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent, write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    tiny = write_tiny_models(str(tmp_path_factory.mktemp("models")), ["sd3"])["sd3"]
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path)
    patcher = comfy_runtime.load_diffusion_model(load)
    assert type(patcher.model.model_config).__name__ == "SD3"  # found by ComfyUI's detection
    latent_image, noise = comfy_runtime.prepare_noise(patcher, empty_latent(tiny, 128, 128), seed=7)
    req = SampleRequest(
        noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
        negative=conditioning_for(tiny, seed=2), seed=7, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple",
    )
    ref = comfy_runtime.run_sampler(patcher, req)
    return load, patcher, req, ref


@pytest.fixture(scope="module")
def engine(sd3):
    from xdit_multigpu.engine.engine import Engine
    from xdit_multigpu.engine.pool import Timeouts
    from xdit_multigpu.executor.cluster import shutdown_cluster

    eng = Engine(Timeouts(start_s=240, sample_s=240, collective_s=120, health_s=20))
    yield eng
    eng.release_all()
    shutdown_cluster()


def _spec(load, devices, strategy=ParallelStrategy.HYBRID):
    return DispatcherSpec(load=load, devices=devices, strategy=strategy, family="sd3")


CPU2 = DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2")


def _sd3_spec():
    from xdit_multigpu.models import lookup

    return lookup("SD3")


@pytest.mark.parametrize(
    ("strategy", "cfg_active", "degrees"),
    [(ParallelStrategy.HYBRID, True, (2, 1, 1)), (ParallelStrategy.USP, True, (1, 2, 1))],
)
def test_engine_matches_one_device(engine, sd3, strategy, cfg_active, degrees):
    load, patcher, req, ref = sd3
    out = engine.sample(_spec(load, CPU2, strategy), req, _sd3_spec(), 4, cfg_active, patcher)
    assert out.fallback_reason is None, out.fallback_reason
    assert (out.plan.cfg, out.plan.ulysses, out.plan.ring) == degrees
    assert out.latent.shape == ref.shape
    diff = (out.latent.float() - ref.float()).abs().max().item()
    assert diff <= TOL, f"{out.plan.describe()}: max abs diff {diff}"
    assert "sample_s" in out.timings


def test_pool_is_reused_while_the_key_is_unchanged(engine, sd3):
    load, patcher, req, _ = sd3
    engine.sample(_spec(load, CPU2), req, _sd3_spec(), 4, True, patcher)
    pool = engine.pool(_spec(load, CPU2))
    phases = pool.start_phases  # where the start went, per phase and per rank
    assert len(phases.import_s) == len(phases.pg_s) == len(phases.rank_load_s) == 2
    assert phases.load_s > 0 and (phases.resident, phases.resident_reason) == (False, "CPU rank")
    assert len(phases.torch_s) == len(phases.comfy_sd_s) == 2  # the import split reaches the driver
    assert phases.prefetch_used == (False, False) and phases.prefetch_note == "off: CPU rank"  # never on CPU ranks
    out = engine.sample(_spec(load, CPU2, ParallelStrategy.USP), req, _sd3_spec(), 4, True, patcher)
    assert out.fallback_reason is None and "pool_s" in out.timings
    assert engine.pool(_spec(load, CPU2)) is pool


def test_missing_gpus_fall_back_to_one_device_with_reason(engine, sd3):
    load, patcher, req, ref = sd3
    out = engine.sample(_spec(load, DeviceSet(DeviceKind.CUDA, (0, 1), "0,1")), req, _sd3_spec(), 4, True, patcher)
    assert out.fallback_reason and "asks for 2 GPU(s)" in out.fallback_reason, out.fallback_reason
    assert out.plan.world_size == 1 and "fallback_s" in out.timings
    assert (out.latent - ref).abs().max().item() == 0.0  # the same in-process sampler as the reference


def test_worker_failure_falls_back_then_the_next_pool_works(engine, sd3):
    load, patcher, req, ref = sd3
    spec = _spec(load, CPU2)
    old_pool = engine.pool(spec)
    pids = old_pool.executor.actor_pids()
    short = dataclasses.replace(engine.timeouts, sample_s=0.05)  # no 3-step run finishes in 50 ms
    engine.timeouts = short
    try:
        out = engine.sample(spec, req, _sd3_spec(), 4, True, patcher)
    finally:
        engine.timeouts = dataclasses.replace(short, sample_s=240)
    assert out.fallback_reason and "did not answer within" in out.fallback_reason, out.fallback_reason
    assert (out.latent - ref).abs().max().item() == 0.0
    again = engine.sample(spec, req, _sd3_spec(), 4, True, patcher)
    assert again.fallback_reason is None, again.fallback_reason
    assert (again.latent.float() - ref.float()).abs().max().item() <= TOL
    new_pids = engine.pool(spec).executor.actor_pids()
    assert not set(pids) & set(new_pids)


def test_no_gpu_visible_falls_back(engine, sd3):
    load, patcher, req, ref = sd3
    out = engine.sample(_spec(load, DeviceSet(DeviceKind.CUDA, (), "all")), req, _sd3_spec(), 4, True, patcher)
    assert out.fallback_reason == 'no GPU is visible (gpu_devices is "all")'
    assert (out.latent - ref).abs().max().item() == 0.0


def test_comfy_cancel_stops_the_workers_and_raises_comfys_interrupt(engine, sd3):
    """ComfyUI's cancel flag reaches the parallel path within ~1 s; no fallback run follows."""
    import threading
    import time

    import comfy.model_management as mm

    load, patcher, req, ref = sd3
    spec = _spec(load, CPU2, ParallelStrategy.USP)
    engine.sample(spec, req, _sd3_spec(), 4, True, patcher)  # pool warm
    long_req = dataclasses.replace(req, steps=200)
    timer = threading.Timer(1.5, mm.interrupt_current_processing, (True,))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            engine.sample(spec, long_req, _sd3_spec(), 4, True, patcher)
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    assert time.monotonic() - t0 < 8
    assert not mm.processing_interrupted()
    out = engine.sample(spec, req, _sd3_spec(), 4, True, patcher)  # a fresh pool
    assert out.fallback_reason is None
    assert (out.latent.float() - ref.float()).abs().max().item() <= TOL
