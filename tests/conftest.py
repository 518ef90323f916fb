"""Test tiers (markers): unit (pure), distributed (gloo, several processes), comfy (real ComfyUI host),
gpu (device machines only). Tiers that need the ComfyUI host fail loudly when it is missing and
``XDIT_REQUIRE_HOST=1`` (set by ``make test``), instead of skipping silently.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH") or str(REPO / ".host" / "comfyui")


def host_available() -> bool:
    return os.path.isfile(os.path.join(COMFYUI_PATH, "main.py"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require = os.environ.get("XDIT_REQUIRE_HOST") == "1"
    for item in items:
        if item.get_closest_marker("comfy") or item.get_closest_marker("distributed"):
            if not host_available():
                if require:
                    raise pytest.UsageError(f"ComfyUI host missing at {COMFYUI_PATH}: run tools/setup-host")
                item.add_marker(pytest.mark.skip(reason=f"no ComfyUI host at {COMFYUI_PATH}"))
        if item.get_closest_marker("gpu"):
            try:
                import torch

                has_gpu = torch.cuda.is_available()
            except ImportError:
                has_gpu = False
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="gpu tier: needs CUDA (runs on the device machines)"))


@pytest.fixture(scope="session")
def comfy_root() -> str:
    """Import ComfyUI (CPU) from the test host once per session; returns its root."""
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(COMFYUI_PATH, cpu=True)
    return COMFYUI_PATH
