"""``XDIT_ATTENTION_BACKEND``: parsed once at the engine boundary, carried by the plan, and the xfuser
loader imports only xfuser's attention modules (pinned: the symbols and signature we call)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from xdit_multigpu.config import AttentionBackend, ParallelPlan
from xdit_multigpu.errors import ConfigError

pytestmark = pytest.mark.unit


def test_default_is_yunchang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDIT_ATTENTION_BACKEND", raising=False)
    assert AttentionBackend.from_env() is AttentionBackend.YUNCHANG
    monkeypatch.setenv("XDIT_ATTENTION_BACKEND", " XFuser ")
    assert AttentionBackend.from_env() is AttentionBackend.XFUSER


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDIT_ATTENTION_BACKEND", "flash")
    with pytest.raises(ConfigError, match="XDIT_ATTENTION_BACKEND.*flash.*yunchang.*xfuser"):
        AttentionBackend.from_env()


def test_plan_shows_a_non_default_backend_only_with_sequence_parallel() -> None:
    assert "xfuser" in ParallelPlan(1, 2, 1, attention=AttentionBackend.XFUSER).describe()
    assert "xfuser" not in ParallelPlan(2, 1, 1, attention=AttentionBackend.XFUSER).describe()
    assert "attention" not in ParallelPlan(1, 2, 2).describe()


@pytest.mark.skipif(importlib.util.find_spec("xfuser") is None, reason="xfuser is not installed (optional)")
def test_xfuser_loader_imports_only_the_attention_modules() -> None:
    """In a fresh interpreter (the loader registers bare xfuser packages, as it does in a worker)."""
    code = textwrap.dedent(
        """
        import inspect, sys
        from xdit_multigpu.parallel import xfuser_attention as xa
        cls, attn_type = xa.load()
        assert cls.__name__ == "xFuserLongContextAttention", cls
        params = inspect.signature(cls.forward).parameters
        for name in ("joint_tensor_query", "joint_tensor_key", "joint_tensor_value", "joint_strategy",
                     "softmax_scale"):
            assert name in params, name
        for name in ("TORCH_FLASH", "TORCH_EFFICIENT", "FA", "FA3"):
            assert hasattr(attn_type, name), name
        heavy = [m for m in ("diffusers.pipelines", "transformers", "xfuser.model_executor") if m in sys.modules]
        assert not heavy, heavy
        assert xa.load() == (cls, attn_type)  # cached
        import torch
        assert torch.cuda.is_available.__module__ == "torch.cuda"  # the import-time patch is gone
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
