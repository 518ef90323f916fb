"""The prefetch in the worker and the pool start: when ``init_distributed`` starts it (resident CUDA ranks
only, before ComfyUI is imported), how ``load_model`` uses it or falls back to ComfyUI's file loader, what
the start phases, their log line and the benchmark report say, and ``XDIT_PREFETCH`` at the boundary.

Unit tier: no Ray, no ComfyUI, no CUDA (ComfyUI's loaders are stand-ins; the prefetch reads on the CPU).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from xdit_multigpu.config import LoaderKind, LoadSpec
from xdit_multigpu.errors import ConfigError
from xdit_multigpu.worker import comfy_runtime, resident
from xdit_multigpu.worker import worker as worker_mod
from xdit_multigpu.worker.prefetch import Prefetch
from xdit_multigpu.worker.resident import ResidentDecision

pytestmark = pytest.mark.unit

H100 = (85_000_000_000, 85_000_000_000)


# --- init_distributed: the prefetch starts after the decision, before the ComfyUI import ------------------


class _Imported(Exception):
    pass


@pytest.fixture
def init_calls(monkeypatch):
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(resident, "gpu_memory", lambda: calls.append(("gpu_memory", None)) or H100)
    monkeypatch.setattr(worker_mod.Prefetch, "start", classmethod(
        lambda cls, path, device: calls.append(("prefetch", (path, device))) or SimpleNamespace(cancel=lambda: None)))

    def import_comfy(root, *, cpu, cli_args=None):
        calls.append(("import_comfy", cpu))
        raise _Imported

    monkeypatch.setattr(worker_mod, "import_comfy", import_comfy)
    return calls


@pytest.mark.parametrize(
    ("backend", "resident_mode", "path", "mode", "started"),
    [
        ("nccl", "on", "/m/flux.safetensors", "auto", True),
        ("nccl", "on", "/m/flux.SFT", "auto", True),
        ("nccl", "on", "/m/flux.safetensors", "off", False),  # XDIT_PREFETCH=off
        ("nccl", "off", "/m/flux.safetensors", "auto", False),  # weights in system RAM: ComfyUI's file loader
        ("nccl", "on", "/m/flux.ckpt", "auto", False),  # not safetensors
        ("nccl", "on", None, "auto", False),  # an older driver: no path
        ("gloo", "on", "/m/flux.safetensors", "auto", False),  # CPU ranks never
    ],
)
def test_init_distributed_starts_the_prefetch_before_importing_comfyui(init_calls, backend, resident_mode, path, mode,
                                                                      started):
    w = worker_mod.Worker()
    with pytest.raises(_Imported):
        w.init_distributed(0, 2, "file:///x", backend, 10, "/comfy", {}, file_bytes=10**9,
                           resident_mode=resident_mode, model_path=path, prefetch_mode=mode)
    names = [c[0] for c in init_calls]
    if started:
        assert names == ["gpu_memory", "prefetch", "import_comfy"]
        assert init_calls[1][1] == (path, "cuda:0") and w._prefetch is not None
    else:
        assert "prefetch" not in names and w._prefetch is None


@pytest.mark.parametrize(
    ("cpu", "resident_", "path", "mode", "note"),
    [
        (False, True, "/m/a.safetensors", "off", "off: XDIT_PREFETCH=off"),
        (True, False, "/m/a.safetensors", "auto", "off: CPU rank"),
        (False, False, "/m/a.safetensors", "auto", "off: weights in system RAM"),
        (False, True, "/m/a.gguf", "auto", "off: not a .safetensors file"),
        (False, True, None, "auto", "off: no model path given"),
    ],
)
def test_start_prefetch_says_why_not(cpu, resident_, path, mode, note):
    assert worker_mod.Worker()._start_prefetch(ResidentDecision(resident_, "r"), cpu, path, mode) == note


# --- load_model: use it, or fall back to ComfyUI's file loader ------------------------------------------


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = torch.nn.Linear(2, 2)
        self.model_config = SimpleNamespace(unet_config={})

    def get_dtype(self) -> torch.dtype:
        return torch.float32


@pytest.fixture
def model_file(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, path, metadata={"k": "v"})
    return path


@pytest.fixture
def loaders(monkeypatch):
    """ComfyUI's two loaders as stand-ins recording what they were given."""
    seen: dict[str, object] = {}

    def from_file(load):
        seen["file"] = load.path
        return SimpleNamespace(model=_Model())

    def from_sd(load, sd, metadata):
        seen["sd"] = {k: v.clone() for k, v in sd.items()}
        seen["metadata"] = metadata
        if seen.get("sd_fails"):
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        model = _Model()
        if seen.get("adopt"):  # a layer that adopts the file's tensor (as ComfyUI's mixed precision ops do)
            model.diffusion_model.weight = torch.nn.Parameter(sd["w"][:, :2], requires_grad=False)
        if seen.get("keep"):  # something outside the model's parameters holds a view
            model.kept = sd["b"]
        return SimpleNamespace(model=model)

    monkeypatch.setattr(comfy_runtime, "load_diffusion_model", from_file)
    monkeypatch.setattr(comfy_runtime, "load_diffusion_model_from_state_dict", from_sd)
    return seen


def _load(worker, path, **kw):
    return worker.load_model(LoadSpec(LoaderKind.DIFFUSION_MODEL, path, **kw))


def test_load_model_uses_the_prefetched_state_dict_and_frees_the_buffer(model_file, loaders):
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    facts = _load(w, model_file)
    assert "file" not in loaders and loaders["metadata"] == {"k": "v"}
    assert torch.equal(loaders["sd"]["w"], torch.arange(6.0).reshape(2, 3))
    assert facts["prefetch_used"] is True and facts["prefetch_buffer_freed"] is True
    assert facts["prefetch_aliases_copied"] == 0 and facts["prefetch_bytes"] == 32
    assert facts["prefetch_wait_s"] >= 0 and facts["sd_load_s"] >= 0 and facts["prefetch_read_s"] >= 0
    assert not p.buffer_alive() and w._prefetch is None


def test_adopted_tensors_are_copied_out_and_a_leftover_reference_is_reported(model_file, loaders, caplog):
    loaders["adopt"] = True
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    facts = _load(w, model_file)
    assert facts["prefetch_aliases_copied"] == 1 and facts["prefetch_buffer_freed"] is True and not p.buffer_alive()
    assert torch.equal(w.patcher.model.diffusion_model.weight, torch.tensor([[0.0, 1.0], [3.0, 4.0]]))
    loaders["keep"] = True
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    facts = _load(w, model_file)
    assert facts["prefetch_buffer_freed"] is False and p.buffer_alive()
    assert "is still referenced after ComfyUI's load" in caplog.text


def test_load_model_without_a_prefetch_is_todays_path(model_file, loaders):
    facts = _load(worker_mod.Worker(), model_file)
    assert loaders["file"] == model_file and "sd" not in loaders and facts["prefetch_used"] is False


def test_a_failed_prefetch_falls_back_to_comfyuis_file_loader(model_file, loaders, tmp_path, caplog):
    bad = str(tmp_path / "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(bad, "cpu")
    facts = _load(w, bad)
    assert loaders["file"] == bad and "sd" not in loaders
    assert facts["prefetch_used"] is False and facts["prefetch_note"].startswith("failed: ValueError: ")
    assert "the header is not valid JSON" in facts["prefetch_note"]
    assert "loading with ComfyUI's file loader" in caplog.text and not p.buffer_alive()


def test_a_failed_state_dict_load_falls_back_and_frees_the_buffer(model_file, loaders):
    loaders["sd_fails"] = True
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    facts = _load(w, model_file)
    assert loaders["file"] == model_file and facts["prefetch_used"] is False
    assert facts["prefetch_note"].startswith("failed: ComfyUI's state-dict load: OutOfMemoryError")
    assert not p.buffer_alive()  # dropped before ComfyUI's file loader runs


def test_a_hung_prefetch_times_out_into_the_file_loader(model_file, loaders, monkeypatch):
    w = worker_mod.Worker()
    w.timeout_s = 0.3
    monkeypatch.setattr(Prefetch, "result", lambda self, timeout, stall_s=None: (_ for _ in ()).throw(
        TimeoutError(f"prefetch not done after {timeout} s")))
    w._prefetch = Prefetch.start(model_file, "cpu")
    facts = _load(w, model_file)
    assert loaders["file"] == model_file
    assert facts["prefetch_note"] == "failed: TimeoutError: prefetch not done after 0.3 s"


@pytest.mark.parametrize("kw", [{"unet_config_json": "{}"}, {"path": "other"}])
def test_another_file_or_an_explicit_config_cancels_the_prefetch(model_file, loaders, tmp_path, kw):
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    path = str(tmp_path / "other.safetensors") if kw.pop("path", None) else model_file
    facts = _load(w, path, **kw)
    assert loaders["file"] == path and facts["prefetch_used"] is False and facts["prefetch_note"].startswith("not used")
    assert p.done and not p.buffer_alive()


def test_free_cancels_a_pending_prefetch(model_file):
    w = worker_mod.Worker()
    p = w._prefetch = Prefetch.start(model_file, "cpu")
    w.free()
    assert w._prefetch is None and p.done and not p.buffer_alive()


# --- start phases, log line, report, XDIT_PREFETCH ------------------------------------------------------

_INIT = [{"import_s": 13.0 + r, "pg_s": 0.3, "resident": True, "resident_reason": "fits", "prefetch": "started",
          "torch_s": 3.0, "cuda_init_s": 1.0 + r, "comfy_mm_s": 4.0, "comfy_sd_s": 5.0} for r in range(2)]
_LOAD = [{"load_s": 3.0, "prefetch_used": True, "prefetch_read_s": 6.0 + r, "prefetch_gbps": 4.0 - r,
          "prefetch_wait_s": 0.0, "sd_load_s": 2.5} for r in range(2)]


def test_start_phases_record_the_import_split_and_the_prefetch():
    from xdit_multigpu.engine.pool import StartPhases

    wall = {"cluster_s": 0.1, "actors_s": 3.4, "init_s": 14.3, "load_s": 3.1}
    p = StartPhases.from_facts(wall, _INIT, _LOAD)
    assert p.torch_s == (3.0, 3.0) and p.cuda_init_s == (1.0, 2.0) and p.comfy_sd_s == (5.0, 5.0)
    assert p.prefetch_used == (True, True) and p.prefetch_read_s == (6.0, 7.0) and p.sd_load_s == (2.5, 2.5)
    assert p.prefetch_note == "" and p.as_dict()["prefetch_used"] == [True, True]
    text = p.describe()
    assert "import <= 14.0 s [torch <= 3.0, CUDA init <= 2.0, model_management <= 4.0, comfy.sd <= 5.0 s]" in text
    assert ("prefetch on 2/2 ranks: read <= 7.0 s at >= 3.0 GB/s, waited <= 0.0 s, ComfyUI state-dict load "
            "<= 2.5 s") in text
    failed = [dict(_LOAD[0]), {"load_s": 12.0, "prefetch_used": False, "prefetch_note": "failed: ValueError: x"}]
    q = StartPhases.from_facts(wall, _INIT, failed)
    assert q.prefetch_used == (True, False)
    assert "on 1/2 ranks" in q.describe() and "(failed: ValueError: x)" in q.describe()
    off = [dict(f, prefetch="off: weights in system RAM", resident=False) for f in _INIT]
    r = StartPhases.from_facts(wall, off, [{"load_s": 12.0, "prefetch_used": False}] * 2)
    assert r.prefetch_note == "off: weights in system RAM" and "; prefetch off: weights in system RAM)" in r.describe()


def test_report_shows_the_prefetch_table_only_for_new_json():
    from tests.unit.test_bench_report import _report
    from xdit_multigpu.bench.report import render
    from xdit_multigpu.bench.summary import summarize
    from xdit_multigpu.engine.pool import StartPhases

    rep = _report()
    phases = StartPhases.from_facts({"cluster_s": 0.1, "actors_s": 3.4, "init_s": 14.3, "load_s": 3.1}, _INIT, _LOAD)
    rep["models"]["flux-dev"]["engine"]["4"]["pool_start_phases"] = phases.as_dict()
    rep["summary"] = summarize(rep)
    md = render(rep, {})
    assert "| flux-dev | 4 | 3.0 | 2.0 | 4.0 | 5.0 | 2/2 | 7.0 | 3.0 | 0.0 | 2.5 | – |" in md
    old = _report()
    old["models"]["flux-dev"]["engine"]["4"]["pool_start_phases"] = {"cluster_s": 0.1, "actors_s": 2.5, "init_s": 8.0,
                                                                     "load_s": 7.0, "resident": True}
    old["summary"] = summarize(old)
    assert "prefetch ranks" not in render(old, {})


# XDIT_PREFETCH parsing: tests/unit/test_pool_start.py::test_weight_switches_from_env (one table for both).


def test_bad_prefetch_is_a_config_error_before_any_worker_starts(monkeypatch):
    from tests.unit.test_pool_start import _spec
    from xdit_multigpu.engine.pool import Timeouts, WorkerPool

    monkeypatch.setenv("XDIT_PREFETCH", "on")
    started = []
    monkeypatch.setattr("xdit_multigpu.executor.cluster.ensure_cluster", lambda address: started.append(address))
    with pytest.raises(ConfigError, match=r"XDIT_PREFETCH: is \"on\". Set it to one of \['auto', 'off'\]"):
        WorkerPool.start(_spec(), Timeouts())
    assert started == []
