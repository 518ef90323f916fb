"""On one device KSampler (xDiT Multi-GPU) is the stock KSampler for Chroma, Chroma Radiance and Qwen-Image: identical
latents (max abs diff 0).

The tiny files load from their explicit unet_config through ComfyUI's own ``model_config_from_unet_config``
(ComfyUI's detection hard-codes 3072-wide layouts; see ``xdit_multigpu.testing.tiny_models_chroma_qwen``),
as Flux does in ``test_nodes_one_device.py``. Qwen-Image's empty latent becomes ``(1, 16, 1, H, W)`` in
ComfyUI's ``fix_empty_latent_channels`` (Wan21 latent format), in both samplers alike; Chroma Radiance
samples the 3-channel image itself (here 32 x 32 pixels: 2 x 2 patches of 16).
"""

from __future__ import annotations

import pathlib

import pytest

from tests.comfy.conftest import MODELS_DIR
from tests.comfy.test_nodes_one_device import _load

pytestmark = pytest.mark.comfy

FAMILIES = ["chroma", "chroma_radiance", "qwen_image"]


@pytest.fixture(scope="module")
def tiny_chroma_qwen(comfy_root: str) -> dict:
    import folder_paths

    from xdit_multigpu.testing.tiny_models import write_tiny_models

    models = write_tiny_models(str(MODELS_DIR), FAMILIES, comfy_root=comfy_root)
    for tiny in models.values():
        folder = str(pathlib.Path(tiny.path).parent)
        if folder not in folder_paths.get_folder_paths(tiny.folder):
            folder_paths.add_model_folder_path(tiny.folder, folder)
    return models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_one_device_equals_stock_ksampler(tiny_chroma_qwen, family, sampler):
    import nodes
    import torch

    from xdit_multigpu.nodes.sampler import XDiTKSampler
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    tiny = tiny_chroma_qwen[family]
    assert not tiny.detected and tiny.unet_config_json
    model, spec = _load(tiny)
    assert type(model.model.model_config).__name__ == tiny.config_class
    assert spec.family == family
    pos = conditioning_for(tiny, seed=1, width=256, height=256)
    neg = conditioning_for(tiny, seed=2, width=256, height=256)
    args = dict(seed=123, steps=3, cfg=3.0, sampler_name=sampler, scheduler="normal", positive=pos, negative=neg,
                latent_image=empty_latent(tiny, 256, 256), denoise=1.0)
    (stock,) = nodes.KSampler().sample(model, **args)
    out = XDiTKSampler().sample(model, xdit_dispatcher=spec, **args)
    ours = out["result"][0]["samples"]
    assert torch.isfinite(stock["samples"]).all() and float(stock["samples"].abs().max()) > 0.5
    assert ours.shape == stock["samples"].shape
    assert torch.equal(ours, stock["samples"]), (ours - stock["samples"]).abs().max()
    assert "one device" in out["ui"]["text"][0]
