"""Fixtures for the comfy tier: tiny model files registered in ComfyUI's model folders (CPU host)."""

from __future__ import annotations

import pathlib

import pytest

from tests.conftest import REPO

MODELS_DIR = REPO / ".host" / "models"


@pytest.fixture(scope="session")
def tiny_models(comfy_root: str) -> dict:
    """All default tiny models, written once into ``.host/models`` and registered with folder_paths."""
    import folder_paths

    from xdit_multigpu.testing.tiny_models import write_tiny_models

    models = write_tiny_models(str(MODELS_DIR), comfy_root=comfy_root)
    for tiny in models.values():
        folder = pathlib.Path(tiny.path).parent
        if str(folder) not in folder_paths.get_folder_paths(tiny.folder):
            folder_paths.add_model_folder_path(tiny.folder, str(folder))
    return models
