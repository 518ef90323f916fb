"""Pool start: where the time goes (``StartPhases``, log, benchmark JSON and report) and where a worker's
weights live (``worker.resident``: the decision, the flags it sets before ComfyUI is imported, the
``XDIT_RESIDENT_WEIGHTS`` boundary). Unit tier: no Ray, no ComfyUI, no CUDA (every CUDA query is faked).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from xdit_multigpu.config import (DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, PrefetchWeights,
                                  ResidentWeights)
from xdit_multigpu.errors import ConfigError
from xdit_multigpu.worker import resident
from xdit_multigpu.worker.resident import ResidentDecision, confirm, decide, worker_flags

pytestmark = pytest.mark.unit

AUTO, ON, OFF = ResidentWeights.AUTO, ResidentWeights.ON, ResidentWeights.OFF
H100 = (85_000_000_000, 85_000_000_000)  # (free, total) of an idle 80 GB card
FLUX = 23_800_000_000  # Flux.1-dev bf16 file


# --- the decision (pure) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_bytes", "gpu", "host", "mode", "resident_", "reason"),
    [
        (FLUX, None, {}, ON, False, "CPU rank"),  # CPU ranks: nothing to place on a GPU, whatever the mode
        (FLUX, H100, {"highvram": True}, OFF, True, "host ComfyUI runs with --highvram"),  # copied to workers
        (FLUX, H100, {"gpu_only": True}, AUTO, True, "host ComfyUI runs with --gpu-only"),
        (FLUX, H100, {"lowvram": True}, ON, False, "host ComfyUI runs with --lowvram"),  # the host's choice wins
        (FLUX, H100, {"novram": True}, AUTO, False, "host ComfyUI runs with --novram"),
        (FLUX, H100, {"normalvram": True}, AUTO, False, "host ComfyUI runs with --normalvram"),
        (FLUX, H100, {"disable_smart_memory": True}, AUTO, False, "host ComfyUI runs with --disable-smart-memory"),
        (FLUX, H100, {"highvram": False, "lowvram": False}, OFF, False, "XDIT_RESIDENT_WEIGHTS=off"),
        (None, H100, None, ON, True, "XDIT_RESIDENT_WEIGHTS=on"),
        (10**12, H100, {}, ON, True, "XDIT_RESIDENT_WEIGHTS=on"),  # "on" skips the size check
        (None, H100, {}, AUTO, False, "model file size unknown on the driver's node"),
        (FLUX, H100, {}, AUTO, True, "23.8 GB file, twice for a LoRA's backup, fits 75% of the GPU's 85.0 GB (85.0 GB free)"),
        (FLUX, (24_000_000_000, 24_000_000_000), {}, AUTO, False,
         "23.8 GB file, twice for a LoRA's backup, does not fit 75% of the GPU's 24.0 GB (24.0 GB free)"),
        # Flux fp8 (11.9 GB) on a 24 GB card: it fits alone, not with a LoRA's backup beside it -> RAM
        (11_900_000_000, (24_000_000_000, 24_000_000_000), {}, AUTO, False,
         "11.9 GB file, twice for a LoRA's backup, does not fit 75% of the GPU's 24.0 GB (24.0 GB free)"),
        # the host process's own --cpu is a device flag (the benchmark driver sets it): no VRAM choice
        (FLUX, H100, {"cpu": True}, AUTO, True, "23.8 GB file, twice for a LoRA's backup, fits 75% of the GPU's 85.0 GB (85.0 GB free)"),
    ],
)
def test_decide_every_branch(file_bytes, gpu, host, mode, resident_, reason):
    assert decide(file_bytes, gpu, host, mode) == ResidentDecision(resident_, reason)


def test_auto_threshold_is_the_fraction_of_the_gpu_and_counts_memory_others_use():
    total = 100_000
    assert decide(37_500, (total, total), {}, AUTO).resident  # exactly 2 x file = 0.75 x total
    assert not decide(37_501, (total, total), {}, AUTO).resident
    assert decide(25_000, (total, total), {}, AUTO, fraction=0.5).resident
    # Another process holds 30 % of the card: twice the weights plus the 25 % headroom must fit what is free.
    assert decide(22_500, (70_000, total), {}, AUTO).resident
    assert not decide(22_501, (70_000, total), {}, AUTO).resident


# --- applying it: the flags a worker imports ComfyUI with ---------------------------------------------


def _comfy_args():
    """A stand-in for ``comfy.cli_args.args`` (ComfyUI's defaults for the flags involved)."""
    return SimpleNamespace(highvram=False, gpu_only=False, lowvram=False, novram=False, cpu=False, fp16_unet=False)


def test_worker_flags_add_highvram_only_when_resident_and_never_touch_the_hosts():
    from xdit_multigpu.worker.bootstrap import apply_cli_args

    host = {"fp16_unet": True, "cpu": True, "not_a_comfy_flag": 1}
    flags = worker_flags(host, ResidentDecision(True, "fits"))
    assert flags["highvram"] is True and "highvram" not in host  # the host's dict (its own flags) unchanged
    args = _comfy_args()
    apply_cli_args(args, flags)
    assert args.highvram is True and args.fp16_unet is True
    assert args.cpu is False and not hasattr(args, "not_a_comfy_flag")  # device flags are the worker's own
    args = _comfy_args()
    apply_cli_args(args, worker_flags(host, ResidentDecision(False, "too big")))
    assert args.highvram is False
    assert "highvram" not in worker_flags({"gpu_only": True}, ResidentDecision(True, "host"))  # already HIGH_VRAM
    assert worker_flags(None, ResidentDecision(False, "CPU rank")) == {}


def test_confirm_reports_what_comfyui_actually_does():
    d = ResidentDecision(True, "fits")
    assert confirm(d, "HIGH_VRAM") is d
    assert confirm(ResidentDecision(False, "CPU rank"), "DISABLED") == ResidentDecision(False, "CPU rank")
    late = confirm(d, "NORMAL_VRAM")  # ComfyUI was imported before the flag could be set
    assert late == ResidentDecision(False, "fits; but ComfyUI's vram_state is NORMAL_VRAM")


class _Imported(Exception):
    """Raised by the fake ``import_comfy``: the test stops there (no ComfyUI, no process group)."""


@pytest.fixture
def fake_worker_imports(monkeypatch):
    """Record, in order, the GPU memory query and ``import_comfy`` of ``Worker.init_distributed``."""
    from xdit_multigpu.worker import worker as worker_mod

    calls: list[tuple[str, object]] = []

    def gpu_memory():
        calls.append(("gpu_memory", None))
        return H100

    def import_comfy(root, *, cpu, cli_args=None):
        calls.append(("import_comfy", {"cpu": cpu, **(cli_args or {})}))
        raise _Imported

    monkeypatch.setattr(resident, "gpu_memory", gpu_memory)
    monkeypatch.setattr(worker_mod, "import_comfy", import_comfy)
    return worker_mod.Worker(), calls


@pytest.mark.parametrize(
    ("backend", "file_bytes", "mode", "host", "highvram"),
    [
        ("nccl", FLUX, "auto", {"fp16_unet": True}, True),
        ("nccl", 10**12, "auto", {}, False),
        ("nccl", None, "auto", {}, False),  # the default arguments: today's behaviour
        ("nccl", 10**12, "on", {}, True),
        ("nccl", FLUX, "off", {}, False),
        ("nccl", FLUX, "auto", {"lowvram": True}, False),
    ],
)
def test_init_distributed_sets_highvram_before_importing_comfyui(fake_worker_imports, backend, file_bytes, mode, host,
                                                                highvram):
    worker, calls = fake_worker_imports
    with pytest.raises(_Imported):
        worker.init_distributed(0, 2, "file:///x", backend, 10, "/comfy", host, file_bytes=file_bytes, resident_mode=mode)
    assert [c[0] for c in calls] == ["gpu_memory", "import_comfy"]  # decided first, then ComfyUI imported
    flags = calls[1][1]
    assert flags.get("highvram", False) is highvram and flags["cpu"] is False
    assert "highvram" not in host


def test_init_distributed_on_cpu_ranks_never_queries_cuda(fake_worker_imports):
    worker, calls = fake_worker_imports
    with pytest.raises(_Imported):
        worker.init_distributed(0, 2, "file:///x", "gloo", 10, "/comfy", {}, file_bytes=FLUX, resident_mode="on")
    assert calls == [("import_comfy", {"cpu": True})]


# --- XDIT_RESIDENT_WEIGHTS at the boundary ------------------------------------------------------------


@pytest.mark.parametrize(("switch", "var", "raw", "mode"), [
    *[(ResidentWeights, "XDIT_RESIDENT_WEIGHTS", raw, mode)
      for raw, mode in [(None, AUTO), ("", AUTO), (" ON ", ON), ("off", OFF), ("auto", AUTO)]],
    *[(PrefetchWeights, "XDIT_PREFETCH", raw, mode)
      for raw, mode in [(None, PrefetchWeights.AUTO), ("", PrefetchWeights.AUTO), (" OFF ", PrefetchWeights.OFF),
                        ("auto", PrefetchWeights.AUTO)]],
])
def test_weight_switches_from_env(monkeypatch, switch, var, raw, mode):
    """The two pool-start switches read their variable trimmed and case-blind; unset or blank is auto."""
    if raw is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, raw)
    assert switch.from_env() is mode


def _spec(path="/nonexistent/model.safetensors", devices=None):
    devices = devices or DeviceSet(DeviceKind.CUDA, (0, 1), "0,1")
    return DispatcherSpec(load=LoadSpec(LoaderKind.DIFFUSION_MODEL, path), devices=devices)


def test_bad_resident_weights_is_a_config_error_before_any_worker_starts(monkeypatch):
    from xdit_multigpu.engine.engine import Engine
    from xdit_multigpu.engine.pool import Timeouts, WorkerPool
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup

    monkeypatch.setenv("XDIT_RESIDENT_WEIGHTS", "gpu")
    started = []
    req = SampleRequest(None, None, [], [], 1, 2, 3.0, "euler", "simple")
    with pytest.raises(ConfigError, match="XDIT_RESIDENT_WEIGHTS: is \"gpu\". Set it to one of"):
        Engine(Timeouts(), lambda spec, t: started.append(spec)).sample(_spec(), req, lookup("SD3"), 24, True, "M")
    assert started == []
    monkeypatch.setattr("xdit_multigpu.executor.cluster.ensure_cluster", lambda address: started.append(address))
    with pytest.raises(ConfigError, match="XDIT_RESIDENT_WEIGHTS"):
        WorkerPool.start(_spec(), Timeouts())
    assert started == []


# --- phases ------------------------------------------------------------------------------------------


class FakeExecutor:
    """``RayExecutor``'s start-time surface: what the pool passes, what the ranks answer."""

    last: FakeExecutor | None = None

    def __init__(self, devices, cluster, *, worker_cls, start_timeout):
        self.world_size = devices.world_size
        self.init_kwargs: dict = {}
        FakeExecutor.last = self

    def init_process_group(self, backend, timeout_s, comfy_root, cli_args, *, file_bytes=None, resident=None,
                           model_path=None, prefetch=None):
        self.init_kwargs = {"file_bytes": file_bytes, "resident": resident, "model_path": model_path,
                            "prefetch": prefetch}
        return [{"rank": r, "import_s": 4.0 + r, "pg_s": 0.5, "resident": True, "resident_reason": "fits"}
                for r in range(self.world_size)]

    def collective_rpc(self, method, args=(), timeout=0.0):
        assert method == "load_model"
        return [{"load_s": 6.0 + r, "family": "sd3"} for r in range(self.world_size)]

    def shutdown(self):
        pass


def test_pool_start_records_phases_and_sends_the_file_size(monkeypatch, tmp_path, caplog):
    from xdit_multigpu.engine.pool import StartPhases, Timeouts, WorkerPool

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x" * 1234)
    monkeypatch.setenv("XDIT_RESIDENT_WEIGHTS", "on")
    monkeypatch.setattr("xdit_multigpu.executor.cluster.ensure_cluster",
                        lambda address: SimpleNamespace(comfy_root="/comfy"))
    monkeypatch.setattr("xdit_multigpu.executor.ray_executor.RayExecutor", FakeExecutor)
    with caplog.at_level(logging.INFO, logger="xdit_multigpu.pool"):
        pool = WorkerPool.start(_spec(str(model)), Timeouts())
    assert FakeExecutor.last.init_kwargs == {"file_bytes": 1234, "resident": "on", "model_path": str(model),
                                             "prefetch": "auto"}
    p = pool.start_phases
    assert isinstance(p, StartPhases) and p.import_s == (4.0, 5.0) and p.pg_s == (0.5, 0.5)
    assert p.rank_load_s == (6.0, 7.0) and p.resident and p.resident_reason == "fits"
    assert min(p.cluster_s, p.actors_s, p.init_s, p.load_s) >= 0
    assert p.cluster_s + p.actors_s + p.init_s + p.load_s == pytest.approx(pool.start_s, abs=0.01)
    assert "(cluster " in caplog.text and "import <= 5.0 s" in caplog.text and "weights in GPU: fits" in caplog.text
    # a file that is not on this node: size unknown, the workers keep today's placement in auto mode
    monkeypatch.setenv("XDIT_RESIDENT_WEIGHTS", "auto")
    monkeypatch.setenv("XDIT_PREFETCH", "off")
    WorkerPool.start(_spec(str(tmp_path / "elsewhere.safetensors")), Timeouts())
    assert FakeExecutor.last.init_kwargs == {"file_bytes": None, "resident": "auto",
                                             "model_path": str(tmp_path / "elsewhere.safetensors"), "prefetch": "off"}


def test_start_phases_from_mixed_ranks_and_as_json():
    from xdit_multigpu.engine.pool import StartPhases

    init = [{"import_s": 3.0, "pg_s": 0.2, "resident": True, "resident_reason": "fits"},
            {"import_s": 3.5, "pg_s": 0.1, "resident": False, "resident_reason": "host ComfyUI runs with --lowvram"}]
    p = StartPhases.from_facts({"cluster_s": 0.01, "actors_s": 2.0, "init_s": 4.0, "load_s": 6.0}, init, [{"load_s": 5.9}])
    assert not p.resident and p.resident_reason == "fits | host ComfyUI runs with --lowvram"
    d = p.as_dict()
    assert d["import_s"] == [3.0, 3.5] and d["rank_load_s"] == [5.9] and d["load_s"] == 6.0
    empty = StartPhases.from_facts({"cluster_s": 0, "actors_s": 0, "init_s": 0, "load_s": 0}, None, None)
    assert not empty.resident and "import <= ? s" in empty.describe()


def test_report_shows_phases_and_renders_old_json_as_before():
    from tests.unit.test_bench_report import _report
    from xdit_multigpu.bench.report import render
    from xdit_multigpu.bench.schema import problems
    from xdit_multigpu.bench.summary import summarize

    old = _report()
    old["summary"] = summarize(old)
    before = render(old, {})
    assert "Pool start phases" not in before
    new = _report()
    new["models"]["flux-dev"]["engine"]["4"]["pool_start_phases"] = {
        "cluster_s": 0.1, "actors_s": 2.5, "init_s": 8.0, "load_s": 7.0, "import_s": [6.0, 6.5, 6.1, 6.2],
        "pg_s": [0.4, 0.3, 0.3, 0.3], "rank_load_s": [6.8, 6.9, 6.7, 6.8], "resident": True,
        "resident_reason": "23.8 GB file, twice for a LoRA's backup, fits 75% of the GPU's 85.0 GB (85.0 GB free)"}
    new["summary"] = summarize(new)
    assert problems(new) == []
    md = render(new, {})
    assert md.replace(md[md.index("### Pool start phases"):md.index("## Side by side")], "") == before
    assert ("| flux-dev | 4 | 38.0 | 0.1 | 2.5 | 8.0 | 6.5 | 0.4 | 7.0 | 6.9 | GPU (23.8 GB file, twice for a LoRA's "
            "backup, fits 75% of the GPU's 85.0 GB (85.0 GB free)) |") in md
