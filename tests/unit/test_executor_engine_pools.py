"""Engine pool bookkeeping and fallback decisions with fake pools (unit tier: no Ray, no ComfyUI)."""

from __future__ import annotations

import threading
import time

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
from xdit_multigpu.engine import engine as engine_mod
from xdit_multigpu.engine.engine import Engine
from xdit_multigpu.engine.pool import Timeouts
from xdit_multigpu.engine.request import SampleRequest
from xdit_multigpu.errors import ConfigError, WorkerError, WorkerTimeout
from xdit_multigpu.models import lookup

pytestmark = pytest.mark.unit

SD3 = lookup("SD3")
SDXL = lookup("SDXL")


class FakePool:
    def __init__(self, spec, fail_sample=None, healthy=True):
        self.key = spec.pool_key()
        self.devices = spec.devices
        self.fast_link_group = None
        self.fail_sample = fail_sample
        self.healthy = healthy
        self.closed = False
        self.plans = []

    def sample(self, req, timeout, on_progress=None):
        if self.fail_sample:
            raise self.fail_sample
        self.plans.append(req.plan)
        return ("parallel", req.plan)

    def check_health(self, timeout):
        if not self.healthy:
            raise WorkerError("rank 0 died during ping")

    def shutdown(self):
        self.closed = True


class Factory:
    def __init__(self, **kw):
        self.kw = kw
        self.pools = []
        self.error = None

    def __call__(self, spec, timeouts):
        if self.error:
            raise self.error
        p = FakePool(spec, **self.kw)
        self.pools.append(p)
        return p


class FakeWorker:
    """What LocalExecutor.for_patcher builds, minus ComfyUI."""

    def __init__(self, patcher):
        self.patcher = patcher

    def sample(self, req, progress=None):
        return ("local", self.patcher, req.plan.world_size)


@pytest.fixture(autouse=True)
def local_worker(monkeypatch):
    from xdit_multigpu.executor import local

    monkeypatch.setattr(local.LocalExecutor, "for_patcher", classmethod(lambda cls, p: cls(FakeWorker(p))))


def spec(devices, strategy=ParallelStrategy.HYBRID, path="/m/a.safetensors"):
    return DispatcherSpec(load=LoadSpec(LoaderKind.DIFFUSION_MODEL, path), devices=devices, strategy=strategy)


def cuda(*ids):
    return DeviceSet(DeviceKind.CUDA, ids, ",".join(map(str, ids)))


REQ = SampleRequest(None, None, [], [], 1, 2, 3.0, "euler", "simple")
T = Timeouts(start_s=5, sample_s=5, collective_s=5, health_s=1)


def test_parallel_path_plans_and_reuses_the_pool():
    f = Factory()
    eng = Engine(T, f)
    out = eng.sample(spec(cuda(0, 1, 2, 3)), REQ, SD3, 24, True, "MODEL")
    assert out.fallback_reason is None and out.latent[0] == "parallel"
    assert (out.plan.cfg, out.plan.ulysses, out.plan.ring) == (2, 2, 1)
    eng.sample(spec(cuda(0, 1, 2, 3), ParallelStrategy.USP), REQ, SD3, 24, True, "MODEL")
    assert len(f.pools) == 1 and [p.describe() for p in f.pools[0].plans][-1].startswith("cfg 1 x ulysses 4")


def test_pool_start_failure_falls_back_with_reason():
    f = Factory()
    f.error = WorkerError("gpu_devices: GPU 0,1 asks for 2 GPU(s) but the Ray cluster at x has 0")
    out = Engine(T, f).sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert out.latent == ("local", "MODEL", 1)
    assert out.fallback_reason.startswith("workers did not start: gpu_devices: GPU 0,1 asks for 2 GPU(s)")
    assert out.plan.world_size == 1 and "fallback_s" in out.timings


@pytest.mark.parametrize("err", [WorkerTimeout("sample: rank(s) [1] did not answer within 5 s"), WorkerError("rank 1 died")])
def test_sample_failure_drops_the_pool_falls_back_and_rebuilds(err):
    f = Factory(fail_sample=err)
    eng = Engine(T, f)
    out = eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert out.fallback_reason == f"parallel sampling failed: {err}"
    assert f.pools[0].closed
    f.kw = {}
    again = eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert again.fallback_reason is None and len(f.pools) == 2


def test_unhealthy_pool_is_rebuilt_before_use():
    f = Factory()
    eng = Engine(T, f)
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    f.pools[0].healthy = False
    out = eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert out.fallback_reason is None and f.pools[0].closed and len(f.pools) == 2


def test_a_pool_that_answered_a_moment_ago_is_not_pinged(monkeypatch):
    import xdit_multigpu.engine.engine as engine_mod

    now = [100.0]
    monkeypatch.setattr(engine_mod.time, "monotonic", lambda: now[0])
    pings = []
    f = Factory()
    eng = Engine(T, f)
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    pool = f.pools[0]
    pool.check_health = lambda timeout: pings.append(timeout)
    pool.last_ok = now[0]  # a real WorkerPool sets it after every call that every rank answered
    now[0] += T.health_fresh_s - 0.1
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert pings == []
    now[0] += 0.2  # idle longer than health_fresh_s: ping first
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert pings == [T.health_s] and len(f.pools) == 1


def test_interrupt_is_raised_not_turned_into_a_fallback():
    from xdit_multigpu.executor.ray_executor import WorkerInterrupted

    f = Factory(fail_sample=WorkerInterrupted("sample: interrupted; the workers were stopped"))
    eng = Engine(T, f)
    with pytest.raises(WorkerInterrupted):
        eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "MODEL")
    assert f.pools[0].closed


def test_config_errors_are_raised_not_hidden():
    with pytest.raises(ConfigError, match="parallel_strategy"):
        Engine(T, Factory()).sample(spec(cuda(0, 1, 2, 3), ParallelStrategy.CFG), REQ, SD3, 24, True, "MODEL")


def test_no_gpu_and_unsupported_model_fall_back_without_starting_workers():
    f = Factory()
    eng = Engine(T, f)
    out = eng.sample(spec(DeviceSet(DeviceKind.CUDA, (), "all")), REQ, SD3, 24, True, "MODEL")
    assert "no GPU is visible" in out.fallback_reason
    out = eng.sample(spec(cuda(0, 1)), REQ, None, 0, True, "MODEL")
    assert out.fallback_reason == "this model has no parallel support"
    assert f.pools == []


def test_cfg_only_model_starts_only_the_ranks_it_uses():
    f = Factory()
    out = Engine(T, f).sample(spec(cuda(0, 1, 2, 3)), REQ, SDXL, 20, True, "MODEL")
    assert out.plan.world_size == 2 and f.pools[0].devices.ids == (0, 1)
    assert "2 of 4 devices stay idle" in out.plan.reason


def test_new_model_on_same_devices_replaces_the_old_pool_other_devices_keep_theirs():
    f = Factory()
    eng = Engine(T, f)
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "M")
    eng.sample(spec(cuda(2, 3)), REQ, SD3, 24, True, "M")
    eng.sample(spec(cuda(1, 2), path="/m/b.safetensors"), REQ, SD3, 24, True, "M")
    assert [p.closed for p in f.pools] == [True, True, False]


def test_fallback_without_a_model_raises_worker_error():
    f = Factory()
    f.error = WorkerError("boom")
    with pytest.raises(WorkerError, match="boom; and no MODEL was given"):
        Engine(T, f).sample(spec(cuda(0, 1)), REQ, SD3, 24, True, None)


def test_release_all_waits_for_a_running_job_then_stops_pools(monkeypatch):
    monkeypatch.setattr("xdit_multigpu.executor.cluster.shutdown_cluster", lambda: None)
    f = Factory()
    eng = Engine(T, f)
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "M")
    pool = f.pools[0]
    started, finish = threading.Event(), threading.Event()

    def slow_sample(req, timeout, on_progress=None):
        started.set()
        finish.wait(5)
        return "done"

    pool.sample = slow_sample
    job = threading.Thread(target=eng.sample, args=(spec(cuda(0, 1)), REQ, SD3, 24, True, "M"))
    job.start()
    assert started.wait(5)
    threading.Timer(0.3, finish.set).start()
    t0 = time.monotonic()
    eng.release_all(wait_s=5)
    assert 0.2 < time.monotonic() - t0 < 4 and pool.closed
    job.join(5)
    # A stuck job does not block release beyond wait_s.
    eng.sample(spec(cuda(0, 1)), REQ, SD3, 24, True, "M")
    f.pools[-1].sample = lambda req, timeout, on_progress=None: time.sleep(2)
    job = threading.Thread(target=eng.sample, args=(spec(cuda(0, 1)), REQ, SD3, 24, True, "M"))
    job.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.release_all(wait_s=0.2)
    assert time.monotonic() - t0 < 1 and f.pools[-1].closed
    job.join(5)


@pytest.mark.parametrize(("value", "ok"), [("12.5", True), ("0", False), ("abc", False), ("-3", False)])
def test_timeouts_from_env(monkeypatch, value, ok):
    monkeypatch.setenv("XDIT_SAMPLE_TIMEOUT_S", value)
    if ok:
        assert Timeouts.from_env().sample_s == 12.5 and Timeouts.from_env().start_s == Timeouts().start_s
    else:
        with pytest.raises(ConfigError, match="XDIT_SAMPLE_TIMEOUT_S"):
            Timeouts.from_env()


def test_get_engine_is_process_wide(monkeypatch):
    monkeypatch.setattr(engine_mod, "_engine", None)
    assert engine_mod.get_engine() is engine_mod.get_engine()


def test_attention_backend_from_env_travels_with_the_plan(monkeypatch):
    from xdit_multigpu.config import AttentionBackend

    monkeypatch.setenv("XDIT_ATTENTION_BACKEND", "xfuser")
    f = Factory()
    out = Engine(T, f).sample(spec(cuda(0, 1)), REQ, SD3, 24, False, "MODEL")
    assert f.pools[0].plans[-1].attention is AttentionBackend.XFUSER and "xfuser attention" in out.plan.describe()
    monkeypatch.setenv("XDIT_ATTENTION_BACKEND", "sage")
    with pytest.raises(ConfigError, match="XDIT_ATTENTION_BACKEND"):  # before any pool starts
        Engine(T, Factory()).sample(spec(cuda(0, 1)), REQ, SD3, 24, False, "MODEL")
