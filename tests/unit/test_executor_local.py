"""LocalExecutor and the executor error helpers (unit tier: no Ray, no ComfyUI)."""

from __future__ import annotations

import pytest

from xdit_multigpu.errors import WorkerError
from xdit_multigpu.executor.local import LocalExecutor
from xdit_multigpu.executor.ray_executor import _last_line, _physical_gpu

pytestmark = pytest.mark.unit


class Fake:
    def add(self, a, b=0):
        return a + b

    def fail(self):
        raise KeyError("nope")


def test_local_returns_one_result_and_accepts_per_rank_args():
    ex = LocalExecutor(Fake())
    assert ex.world_size == 1
    assert ex.collective_rpc("add", (1,), {"b": 2}) == [3]
    assert ex.collective_rpc("add", per_rank_args=[(5,)]) == [5]
    with pytest.raises(ValueError, match="2 entries for 1 rank"):
        ex.collective_rpc("add", per_rank_args=[(1,), (2,)])
    ex.check_health()


def test_local_unknown_method_is_worker_error_and_sampler_errors_pass_through():
    ex = LocalExecutor(Fake())
    with pytest.raises(WorkerError, match="missing: the worker has no such method"):
        ex.collective_rpc("missing")
    # The host's own sampler errors (interrupt, OOM) must reach ComfyUI unchanged.
    with pytest.raises(KeyError):
        ex.collective_rpc("fail")


def test_local_shutdown_is_idempotent_and_final():
    ex = LocalExecutor(Fake())
    ex.shutdown()
    ex.shutdown()
    with pytest.raises(WorkerError, match="shut down"):
        ex.collective_rpc("add", (1,))
    with pytest.raises(WorkerError):
        ex.check_health()


def test_last_line_prefers_the_remote_cause():
    class RayTaskErrorLike(Exception):
        def __init__(self):
            super().__init__("ray::X.execute()\n  File 'w.py', line 3\nValueError: boom on rank 1\n")
            self.cause = ValueError("boom on rank 1")

    assert _last_line(RayTaskErrorLike()) == "ValueError: boom on rank 1"
    assert _last_line(RuntimeError("first\n\nlast line\n")) == "last line"
    assert _last_line(RuntimeError("")) == "RuntimeError"


def test_physical_gpu_respects_host_restriction(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _physical_gpu(3) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert [_physical_gpu(0), _physical_gpu(1)] == ["2", "5"]
