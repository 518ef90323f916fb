"""Load VAE / CLIP (xDiT): stock behaviour, plus a device choice (here: cpu, the only device in CI)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.comfy


def test_vae_on_chosen_device_decodes_like_stock(tiny_models):
    import nodes
    import torch

    from xdit_multigpu.nodes.encoders import XDiTVAELoader

    name = os.path.basename(tiny_models["vae16"].path)
    (stock,) = nodes.VAELoader().load_vae(name)
    (ours,) = XDiTVAELoader().load(name, "cpu")["result"]
    assert ours.device == torch.device("cpu") and ours.patcher.load_device == torch.device("cpu")
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stock.decode(latent), ours.decode(latent))
    assert XDiTVAELoader.VALIDATE_INPUTS("1").startswith("device: GPU 1 is out of range")


def test_clip_on_chosen_device_encodes_like_stock(tiny_models):
    import nodes
    import torch

    from xdit_multigpu.nodes.encoders import XDiTCLIPLoader, XDiTDualCLIPLoader

    name = os.path.basename(tiny_models["clip_l"].path)
    (stock,) = nodes.CLIPLoader().load_clip(name, "sd3")
    (ours,) = XDiTCLIPLoader().load(name, "sd3", "cpu")
    assert ours.patcher.load_device == torch.device("cpu")
    text = "a lighthouse on a cliff"
    (a,) = nodes.CLIPTextEncode().encode(stock, text)
    (b,) = nodes.CLIPTextEncode().encode(ours, text)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
    (dual,) = XDiTDualCLIPLoader().load(name, name, "sd3", "default")
    (stock_dual,) = nodes.DualCLIPLoader().load_clip(name, name, "sd3")
    (c,) = nodes.CLIPTextEncode().encode(dual, text)
    (d,) = nodes.CLIPTextEncode().encode(stock_dual, text)
    assert torch.equal(c[0][0], d[0][0])
