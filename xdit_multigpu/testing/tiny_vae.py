"""Random-weight AutoencoderKL VAEs in ComfyUI's layouts, built through ``comfy.sd.VAE`` itself.

``flux_vae``: the real Flux.1 VAE architecture (ch 128, ch_mult 1,2,4,4, 16 latent channels, no quant
convs), given to ComfyUI as a state dict so that its own detection builds it (the bench's model).
``tiny_kl_vae``: an SD-layout AutoencoderKL with small channels (ch 32, ch_mult 1,1,1,1: still 8x, 4
latent channels), through ``comfy.sd.VAE(config=...)`` because ComfyUI's detection fixes ch at 128.

Weights are seeded random with a variance that keeps activations finite through the network (GroupNorm
gains 1, convolutions ~ N(0, 1/fan_in)): speed and tiling do not depend on the values.
"""

from __future__ import annotations

from typing import Any

FLUX_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
TINY_DDCONFIG: dict[str, Any] = dict(FLUX_DDCONFIG, z_channels=4, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)


def _random_state(module: Any, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in module.state_dict().items():
        if t.ndim == 1 and key.endswith(".weight"):  # GroupNorm gains
            sd[key] = torch.ones(t.shape)
        elif t.ndim == 1:
            sd[key] = torch.randn(t.shape, generator=gen) * 0.02
        else:
            fan_in = t[0].numel()
            sd[key] = torch.randn(t.shape, generator=gen) / fan_in**0.5
    return sd


def flux_vae(device: Any = None, dtype: Any = None, seed: int = 0) -> Any:
    """The Flux.1 VAE (random weights) as ComfyUI's VAELoader would build it from the file."""
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd

    enc = {"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": FLUX_DDCONFIG}
    dec = {"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": FLUX_DDCONFIG}
    reg = {"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"}
    module = ae.AutoencodingEngine(encoder_config=enc, decoder_config=dec, regularizer_config=reg)
    vae = comfy.sd.VAE(sd=_random_state(module, seed), device=device, dtype=dtype)
    vae.throw_exception_if_invalid()
    return vae


def tiny_kl_vae(device: Any = None, dtype: Any = None, seed: int = 0) -> Any:
    """A small SD-layout AutoencoderKL (8x, 4 latent channels) through ComfyUI's VAE class."""
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd

    params = {"ddconfig": dict(TINY_DDCONFIG), "embed_dim": TINY_DDCONFIG["z_channels"]}
    module = ae.AutoencoderKL(**params)
    vae = comfy.sd.VAE(sd=_random_state(module, seed), device=device, dtype=dtype, config={"params": params})
    vae.throw_exception_if_invalid()
    return vae
