"""On one device KSampler (xDiT Multi-GPU) is the stock KSampler for Lumina 2, Z-Image, Wan 2.1 and Wan 2.2
T2V: identical latents (max abs diff 0), Wan with a 5-D video latent.

Wan files are detected by ComfyUI and go through ``Load UNet (xDiT Multi-GPU)``; Lumina 2 / Z-Image are built
from their explicit config through ComfyUI's own ``model_config_from_unet_config`` (detection sets heads and
RoPE axes only at hidden 2304 / 3840), see ``xdit_multigpu.testing.tiny_models_video``. Also: the tiny files
map to the expected ComfyUI class and registered spec, and the loader node refuses a Wan I2V file.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.comfy.conftest import MODELS_DIR
from tests.comfy.test_nodes_one_device import _load

pytestmark = pytest.mark.comfy

FAMILIES = ["lumina2", "zimage", "wan21", "wan22"]
SPEC = {"lumina2": "lumina2", "zimage": "lumina2", "wan21": "wan", "wan22": "wan"}


@pytest.fixture(scope="module")
def video_models(comfy_root: str) -> dict:
    import folder_paths

    from xdit_multigpu.testing.tiny_models_video import write_video_models

    models = write_video_models(str(MODELS_DIR), comfy_root=comfy_root)
    for tiny in models.values():
        folder = str(pathlib.Path(tiny.path).parent)
        if folder not in folder_paths.get_folder_paths(tiny.folder):
            folder_paths.add_model_folder_path(tiny.folder, folder)
    return models


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_file_maps_to_spec(video_models, family):
    from xdit_multigpu.config import LoaderKind, LoadSpec
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.worker import comfy_runtime

    tiny = video_models[family]
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    patcher = comfy_runtime.load_diffusion_model(load)
    assert type(patcher.model.model_config).__name__ == tiny.config_class
    spec = lookup_config(patcher.model.model_config)
    assert spec is not None and spec.name == SPEC[family]
    assert spec.heads(patcher.model.model_config.unet_config) == tiny.heads
    if family == "zimage":  # the Z-Image code path: pad tokens and its modulation
        dm = patcher.model.diffusion_model
        assert dm.pad_tokens_multiple == 32 and dm.time_scale == 1000.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_one_device_equals_stock_ksampler(video_models, family, sampler):
    import nodes
    import torch

    from xdit_multigpu.nodes.sampler import XDiTKSampler
    from xdit_multigpu.testing.tiny_models import conditioning_for
    from xdit_multigpu.testing.tiny_models_video import empty_video_latent

    tiny = video_models[family]
    model, spec = _load(tiny)
    pos = conditioning_for(tiny, seed=1)
    neg = conditioning_for(tiny, seed=2, tokens=tiny.context_tokens - 5)
    latent = empty_video_latent(tiny, 16, frames=3)
    args = dict(seed=123, steps=3, cfg=3.0, sampler_name=sampler, scheduler="normal", positive=pos, negative=neg,
                latent_image=latent, denoise=1.0)
    (stock,) = nodes.KSampler().sample(model, **args)
    out = XDiTKSampler().sample(model, xdit_dispatcher=spec, **args)
    ours = out["result"][0]["samples"]
    assert torch.isfinite(stock["samples"]).all()
    assert ours.shape == stock["samples"].shape == latent["samples"].shape
    assert torch.equal(ours, stock["samples"]), (ours - stock["samples"]).abs().max()
    assert "one device" in out["ui"]["text"][0]


def test_loader_refuses_wan_i2v(video_models, tmp_path):
    """An I2V Wan file (``img_emb`` -> WAN21_I2V, not registered) fails at the node before any worker."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    from xdit_multigpu.nodes.loaders import XDiTUNetLoader

    import torch

    sd = load_file(video_models["wan21"].path)
    sd = {k: v for k, v in sd.items()}
    sd["img_emb.proj.0.bias"] = torch.zeros(1280)
    sd["patch_embedding.weight"] = torch.zeros(512, 36, 1, 2, 2)
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    save_file(sd, str(folder / "xdit_tiny_wan_i2v.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    msg = XDiTUNetLoader.VALIDATE_INPUTS(unet_name="xdit_tiny_wan_i2v.safetensors", weight_dtype="default",
                                         gpu_devices="cpu:2", parallel_strategy="Hybrid",
                                         scheduling_strategy="round_robin")
    assert isinstance(msg, str) and "WAN21_I2V" in msg and "Wan 2.1 / 2.2 T2V" in msg, msg
