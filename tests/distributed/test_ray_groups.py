"""GPU groups on CPU ranks through Ray: a batch split over two groups equals one-device sampling of the
whole batch (each item keeps its own noise, also for ancestral / SDE samplers that draw noise every step),
and with one group made 2x slower, adaptive and weighted_round_robin finish a batch of 8 within 10 % of
the ideal makespan while round_robin is measurably worse.

The slowdown is a worker subclass that sleeps a fixed time per batch item before ComfyUI's sampler runs
(3 s per item on the fast group, 6 s on the slow one), so the makespans are set by the schedule, not by
the noise of a shared 2-core machine. Ideal makespan: the best split of 8 whole items over the two
groups, ``min_k max(3 k, 6 (8 - k))`` = 18 s. Workers are warmed up (one untimed batch under another
policy) before the timed runs.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, SchedulingStrategy
from xdit_multigpu.worker.worker import Worker

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
pytest.importorskip("ray")

TOL = 1e-4
FAST_S, SLOW_S, BATCH = 3.0, 6.0, 8
IDEAL_S = min(max(FAST_S * k, SLOW_S * (BATCH - k)) for k in range(BATCH + 1))


class FastWorker(Worker):
    delay_s = FAST_S

    def sample(self, req, progress=None):
        time.sleep(self.delay_s * int(req.noise.shape[0]))
        return super().sample(req, progress)


class SlowWorker(FastWorker):
    delay_s = SLOW_S


@pytest.fixture(scope="module")
def sd3(comfy_root, tmp_path_factory, cluster):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent, write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    tiny = write_tiny_models(str(tmp_path_factory.mktemp("models")), ["sd3"])["sd3"]
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path)
    patcher = comfy_runtime.load_diffusion_model(load)
    latent = empty_latent(tiny, 64, 64, batch=BATCH)
    return load, patcher, tiny, latent, conditioning_for


def _request(sd3, sampler, seed=11, steps=3, cfg=3.0):
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.worker import comfy_runtime

    _, patcher, tiny, latent, conditioning_for = sd3
    latent_image, noise = comfy_runtime.prepare_noise(patcher, latent, seed)
    return SampleRequest(noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
                         negative=conditioning_for(tiny, seed=2), seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                         scheduler="simple")


def _engine(pool_factory=None):
    from xdit_multigpu.engine.engine import Engine
    from xdit_multigpu.engine.pool import Timeouts

    return Engine(Timeouts(start_s=240, sample_s=240, collective_s=120, health_s=20), pool_factory)


def _spec(load, text, scheduling, weights=()):
    return DispatcherSpec(load, DeviceSet.parse(text, 0), scheduling=scheduling, family="sd3", group_weights=weights)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_batch_over_two_groups_equals_one_device(sd3, sampler):
    """Two groups of 2 CPU ranks, each running CFG parallel; items split 4 / 4."""
    from xdit_multigpu.models import lookup
    from xdit_multigpu.worker import comfy_runtime

    load, patcher = sd3[0], sd3[1]
    req = _request(sd3, sampler)
    ref = comfy_runtime.run_sampler(patcher, req)
    eng = _engine()
    try:
        out = eng.sample(_spec(load, "cpu:2|cpu:2", SchedulingStrategy.ROUND_ROBIN), req, lookup("SD3"), 4, True, patcher)
    finally:
        eng.release_all(stop_ray=False)
    assert out.fallback_reason is None, out.fallback_reason
    assert "group 0 (2 CPU rank(s)): 4 item(s), group 1 (2 CPU rank(s)): 4 item(s)" in out.groups, out.groups
    assert out.plan.cfg == 2
    diff = (out.latent.float() - ref.float()).abs().max().item()
    assert diff <= TOL, f"{sampler}: max abs diff {diff}"
    # The per-item noise matters: the second half sampled as a batch of its own would differ.
    if sampler != "euler":
        alone = comfy_runtime.run_sampler(patcher, dataclasses.replace(req.slice(4, 8), batch=None))
        assert (alone.float() - ref[4:].float()).abs().max().item() > 1e-2, "negative control: noise not batch-sliced"


def test_makespans_with_one_group_twice_as_slow(sd3):
    from xdit_multigpu.engine.pool import WorkerPool
    from xdit_multigpu.models import lookup

    load, patcher = sd3[0], sd3[1]

    def factory(spec, timeouts):
        return WorkerPool.start(spec, timeouts, worker_cls=SlowWorker if spec.devices.ids == (1,) else FastWorker)

    eng = _engine(factory)
    times: dict[str, float] = {}
    shares: dict[str, str] = {}
    try:
        cases = [("round_robin", SchedulingStrategy.ROUND_ROBIN, ()),
                 ("weighted", SchedulingStrategy.WEIGHTED_ROUND_ROBIN, (2.0, 1.0)),
                 ("adaptive_cold", SchedulingStrategy.ADAPTIVE, ()),
                 ("adaptive_warm", SchedulingStrategy.ADAPTIVE, ())]
        req = _request(sd3, "euler", steps=1, cfg=1.0)  # little compute: the sleeps set the makespans
        warm = _spec(load, "cpu:1|cpu:1", SchedulingStrategy.LEAST_LOADED)
        eng.sample(warm, dataclasses.replace(req.slice(0, 2), batch=None), lookup("SD3"), 4,
                   False, patcher)
        for name, scheduling, weights in cases:
            spec = _spec(load, "cpu:1|cpu:1", scheduling, weights)
            eng.pool(spec.for_group(spec.device_groups()[0]))  # pools started outside the timed region
            eng.pool(spec.for_group(spec.device_groups()[1]))
            t0 = time.perf_counter()
            out = eng.sample(spec, req, lookup("SD3"), 4, False, patcher)
            times[name] = time.perf_counter() - t0
            shares[name] = out.groups
            assert out.fallback_reason is None, out.fallback_reason
    finally:
        eng.release_all(stop_ray=False)
    report = {k: round(v, 2) for k, v in times.items()}
    print(f"ideal {IDEAL_S} s; makespans {report}")
    for k, v in shares.items():
        print(f"  {k}: {v}")
    for name in ("weighted", "adaptive_cold", "adaptive_warm"):
        assert times[name] <= 1.10 * IDEAL_S, (name, report, shares[name])
    assert times["round_robin"] >= 1.25 * IDEAL_S, (report, shares["round_robin"])
    assert "group 0 (1 CPU rank(s)): 5 item(s), group 1 (1 CPU rank(s)): 3 item(s)" in shares["adaptive_warm"]


class DyingOnceWorker(Worker):
    """Dies (the whole actor process) on its first ``sample`` after the marker file was armed."""

    marker = ""

    def sample(self, req, progress=None):
        if self.marker and os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(3)
        return super().sample(req, progress)


def test_group_whose_worker_dies_is_taken_out_and_its_items_redispatched(sd3, tmp_path):
    """Group 1's actor dies mid-batch: its items go to group 0, the batch still equals one device, the
    status names the failure, and group 1 is rebuilt in the background and used again by the next batch."""
    from xdit_multigpu.engine.dispatch import dispatcher_for
    from xdit_multigpu.engine.pool import WorkerPool
    from xdit_multigpu.models import lookup
    from xdit_multigpu.worker import comfy_runtime

    load, patcher = sd3[0], sd3[1]
    marker = tmp_path / "die"
    dying = type("DyingWorker", (DyingOnceWorker,), {"marker": str(marker)})

    def factory(spec, timeouts):
        return WorkerPool.start(spec, timeouts, worker_cls=dying if spec.devices.ids == (1,) else Worker)

    req = _request(sd3, "euler_ancestral")
    ref = comfy_runtime.run_sampler(patcher, req)
    eng = _engine(factory)
    spec = _spec(load, "cpu:1|cpu:1", SchedulingStrategy.ROUND_ROBIN)
    try:
        for g in spec.device_groups():
            eng.pool(spec.for_group(g))
        marker.write_text("armed")
        out = eng.sample(spec, req, lookup("SD3"), 4, True, patcher)
        assert out.fallback_reason is None, out.fallback_reason
        assert "group 1 (1 CPU rank(s)) failed and is being rebuilt" in out.groups, out.groups
        assert "group 0 (1 CPU rank(s)): 8 item(s)" in out.groups, out.groups
        assert (out.latent.float() - ref.float()).abs().max().item() <= TOL
        disp = dispatcher_for(eng, spec)
        deadline = time.monotonic() + 180
        while not disp.groups[1].up and time.monotonic() < deadline:
            time.sleep(0.5)
        assert disp.groups[1].up, "group 1 was not rebuilt"
        again = eng.sample(spec, req, lookup("SD3"), 4, True, patcher)
        assert "group 1 (1 CPU rank(s)): 4 item(s)" in again.groups, again.groups
        assert (again.latent.float() - ref.float()).abs().max().item() <= TOL
    finally:
        eng.release_all(stop_ray=False)
