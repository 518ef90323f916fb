"""Progress from the workers: rank 0's steps reach the driver while ``collective_rpc`` waits.

Executor level (fake workers, fast): every report arrives in order, previews are throttled and small,
a hook that raises (ComfyUI's interrupt from its progress bar) stops the workers. Engine level (tiny
SD3 on 2 CPU ranks): the hook sees every step, and without a hook ComfyUI's own ProgressBar does.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
from xdit_multigpu.executor.progress import ProgressSink

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

ray = pytest.importorskip("ray")


class StepWorker:
    """Reports ``n`` steps (pickled by value into the actors); only rank 0 gets ``progress``."""

    def steps(self, n: int, delay: float, progress=None):
        import torch

        for i in range(n):
            time.sleep(delay)
            if progress is not None:
                progress(i + 1, n, torch.full((2, 4, 8, 8), float(i)))
        return progress is not None

    def ping(self):
        return "pong"


class Recorder:
    def __init__(self, raise_at: int | None = None) -> None:
        self.events: list[tuple[int, int, object, float]] = []
        self.raise_at = raise_at

    def __call__(self, step, total, preview) -> None:
        self.events.append((step, total, preview, time.monotonic()))
        if self.raise_at is not None and step >= self.raise_at:
            raise KeyboardInterrupt("stop")  # any exception; ComfyUI's is InterruptProcessingException


CPU2 = DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2")


def test_every_step_arrives_in_order_while_the_call_runs(cluster):
    from xdit_multigpu.executor.base import ProgressHook
    from xdit_multigpu.executor.ray_executor import RayExecutor

    ex = RayExecutor(CPU2, cluster, worker_cls=StepWorker, start_timeout=60)
    try:
        ex.collective_rpc("steps", (0, 0.0), timeout=60, on_progress=ProgressHook(Recorder()))  # imports, sink up
        rec = Recorder()
        t0 = time.monotonic()
        out = ex.collective_rpc("steps", (8, 0.25), timeout=60, on_progress=ProgressHook(rec, 0.6))
        done = time.monotonic()
        assert out == [True, False]  # only rank 0 reports
        assert [(s, t) for s, t, _, _ in rec.events] == [(i, 8) for i in range(1, 9)]
        assert rec.events[0][3] < t0 + 1.5 < done, "the first step did not arrive while the call ran"
        previews = [(s, p) for s, _, p, _ in rec.events if p is not None]
        assert previews and previews[0][0] == 1 and len(previews) <= 4, [s for s, _ in previews]  # throttled
        assert all(p.shape == (1, 4, 8, 8) and p.dtype == np.float16 for _, p in previews)
        rec2 = Recorder()
        ex.collective_rpc("steps", (3, 0.0), timeout=60, on_progress=ProgressHook(rec2, None))
        assert [(s, p) for s, _, p, _ in rec2.events] == [(1, None), (2, None), (3, None)]
    finally:
        ex.shutdown()


def test_a_raising_hook_stops_the_workers_and_propagates(cluster):
    from xdit_multigpu.errors import WorkerError
    from xdit_multigpu.executor.base import ProgressHook
    from xdit_multigpu.executor.ray_executor import RayExecutor

    ex = RayExecutor(CPU2, cluster, worker_cls=StepWorker, start_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ex.collective_rpc("steps", (200, 0.1), timeout=60, on_progress=ProgressHook(Recorder(raise_at=2)))
    assert time.monotonic() - t0 < 10
    with pytest.raises(WorkerError, match="shut down"):
        ex.collective_rpc("ping", timeout=10)


class SlowSink(ProgressSink):
    """A sink whose every drain takes 0.5 s: a drain round trip on the way out of a call shows in its time."""

    def drain(self):
        time.sleep(0.5)
        return super().drain()


def test_reports_left_at_the_end_come_with_rank_0s_result_not_a_drain(cluster, monkeypatch):
    """Rank 0 returns the log of its reports: no drain follows the results (the old driver drained after
    every result and once more at the end), and a later call's drain hands over only its own reports."""
    from xdit_multigpu.executor import ray_executor
    from xdit_multigpu.executor.base import ProgressHook
    from xdit_multigpu.executor.ray_executor import RayExecutor

    monkeypatch.setattr(ray_executor, "ProgressSink", SlowSink)
    monkeypatch.setattr(ray_executor, "PROGRESS_POLL_S", 5.0)  # no periodic drain within these short calls
    ex = RayExecutor(CPU2, cluster, worker_cls=StepWorker, start_timeout=60)
    try:
        ex.collective_rpc("steps", (1, 0.0), timeout=60, on_progress=ProgressHook(Recorder()))  # imports, sink up
        rec = Recorder()
        t0 = time.monotonic()
        out = ex.collective_rpc("steps", (5, 0.0), timeout=60, on_progress=ProgressHook(rec))
        took = time.monotonic() - t0
        assert out == [True, False]
        assert [(s, t, p) for s, t, p, _ in rec.events] == [(i, 5, None) for i in range(1, 6)]
        assert took < 0.45, f"a drain of the sink (0.5 s) followed the results: the call took {took:.2f} s"
        # Previews on: the missing reports carried previews, so one drain fetches them; it also returns the
        # earlier calls' undrained reports, which must not reach this call's hook.
        rec2 = Recorder()
        ex.collective_rpc("steps", (3, 0.0), timeout=60, on_progress=ProgressHook(rec2, 0.0))
        assert [(s, t) for s, t, _, _ in rec2.events] == [(1, 3), (2, 3), (3, 3)]
        assert all(p is not None and p.shape == (1, 4, 8, 8) for _, _, p, _ in rec2.events)
    finally:
        ex.shutdown()


@pytest.fixture(scope="module")
def sd3(cluster, tmp_path_factory):
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent, write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    tiny = write_tiny_models(str(tmp_path_factory.mktemp("models")), ["sd3"])["sd3"]
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path)
    patcher = comfy_runtime.load_diffusion_model(load)
    latent_image, noise = comfy_runtime.prepare_noise(patcher, empty_latent(tiny, 64, 64), seed=7)
    req = SampleRequest(
        noise=noise, latent_image=latent_image, positive=conditioning_for(tiny, seed=1),
        negative=conditioning_for(tiny, seed=2), seed=7, steps=4, cfg=3.0, sampler_name="euler", scheduler="simple",
    )
    return load, patcher, req


def test_engine_progress_hook_sees_every_step_and_comfy_progress_bar_by_default(sd3):
    from xdit_multigpu.engine.engine import Engine
    from xdit_multigpu.engine.pool import Timeouts
    from xdit_multigpu.executor.base import ProgressHook
    from xdit_multigpu.models import lookup

    import comfy.utils

    load, patcher, req = sd3
    eng = Engine(Timeouts(start_s=240, sample_s=240, collective_s=120, health_s=20))
    spec = DispatcherSpec(load=load, devices=CPU2, strategy=ParallelStrategy.USP, family="sd3")
    try:
        rec = Recorder()
        out = eng.sample(spec, req, lookup("SD3"), 4, True, patcher, progress=ProgressHook(rec, 0.0))
        assert out.fallback_reason is None, out.fallback_reason
        assert [(s, t) for s, t, _, _ in rec.events] == [(i, 4) for i in range(1, 5)]
        last = rec.events[-1][2]  # rank 0's x0 of the last step (model space), first batch item, float16
        assert last.shape == (1, *out.latent.shape[1:]) and last.dtype == np.float16
        assert np.isfinite(last).all() and np.abs(last).max() > 0
        seen: list[tuple[int, int]] = []
        old = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append((v, t)))
        try:
            eng.sample(spec, req, lookup("SD3"), 4, True, patcher)  # no hook: ComfyUI's ProgressBar
        finally:
            comfy.utils.set_progress_bar_global_hook(old)
        assert seen == [(i, 4) for i in range(1, 5)]
    finally:
        eng.release_all(stop_ray=False)
