"""On one device KSampler (xDiT Multi-GPU) is the stock KSampler: identical latents (max abs diff 0).

Detected families go through ``Load UNet (xDiT Multi-GPU)``; Flux and SDXL, which ComfyUI's detection
refuses at tiny sizes, are built from their explicit config through ComfyUI's own
``model_config_from_unet_config`` (see xdit_multigpu.testing.tiny_models).
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.comfy

FAMILIES = ["flux", "sd3", "sdxl", "pixart_sigma", "hunyuan_dit"]


def _load(tiny, devices: str = "cpu"):
    from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec
    from xdit_multigpu.engine.registry import remember_model
    from xdit_multigpu.nodes.loaders import XDiTUNetLoader
    from xdit_multigpu.worker import comfy_runtime

    if tiny.detected:
        model, spec = XDiTUNetLoader().load(os.path.basename(tiny.path), "default", devices, "Hybrid", "round_robin")
        return model, spec
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    model = comfy_runtime.load_diffusion_model(load)
    spec = DispatcherSpec(load, DeviceSet.parse(devices, 0), family=tiny.family)
    remember_model(model, spec)
    return model, spec


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_one_device_equals_stock_ksampler(tiny_models, family, sampler):
    import nodes
    import torch

    from xdit_multigpu.nodes.sampler import XDiTKSampler
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    tiny = tiny_models[family]
    side = max(256, 8 * tiny.min_latent)
    model, spec = _load(tiny)
    pos = conditioning_for(tiny, seed=1, width=side, height=side)
    neg = conditioning_for(tiny, seed=2, width=side, height=side)
    latent = empty_latent(tiny, side, side)
    args = dict(seed=123, steps=3, cfg=3.0, sampler_name=sampler, scheduler="normal", positive=pos, negative=neg,
                latent_image=latent, denoise=1.0)
    (stock,) = nodes.KSampler().sample(model, **args)
    out = XDiTKSampler().sample(model, xdit_dispatcher=spec, **args)
    ours = out["result"][0]["samples"]
    assert torch.isfinite(stock["samples"]).all()
    assert ours.shape == stock["samples"].shape
    assert torch.equal(ours, stock["samples"]), (ours - stock["samples"]).abs().max()
    assert "one device" in out["ui"]["text"][0]
