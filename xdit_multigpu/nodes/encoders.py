"""``Load VAE (xDiT)``, ``Load CLIP (xDiT)``, ``Load Dual CLIP (xDiT)``: the stock loaders plus a device
choice, so text encoders and the VAE can live on a GPU the sampling group does not use (or on the CPU).
"""

from __future__ import annotations

from typing import Any

from ..config import VAEParallelConfig, parse_encoder_device, parse_vae_parallel
from ..errors import ConfigError
from .common import CATEGORY

TIP_DEVICE = (
    'Where this model runs: "default" (ComfyUI decides, as the stock loader), "cpu", or a GPU index such as '
    '"1" to keep the sampling GPUs free.'
)
TIP_PARALLEL = (
    'Empty (default): the stock VAE. GPU indices such as "0,1,2,3" (or "all"): tiled decode / encode of '
    "large images is spread over these GPUs, with results equal to ComfyUI's tiled VAE with the same tile "
    "settings (VAE Decode (Tiled), VAE Encode (Tiled), and VAE Decode / Encode of images too large to do "
    'whole). One GPU = the stock VAE. "cpu:2" runs two CPU slots (for tests).'
)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device(text: str) -> Any:
    """torch.device for the ``device`` input, or None for ComfyUI's default."""
    import torch

    dev = parse_encoder_device(text, _visible_gpus())
    return None if dev is None else torch.device(dev)


def _validate_device(device: str) -> bool | str:
    try:
        parse_encoder_device(device, _visible_gpus())
    except ConfigError as e:
        return str(e)
    return True


def _te_model_options(device: Any) -> dict[str, Any]:
    """``model_options`` for comfy.sd.load_clip placing the encoder on ``device``."""
    import comfy.model_management as mm

    if device is None:
        return {}
    # A GPU encoder is parked where ComfyUI parks text encoders; a CPU one stays on the CPU.
    offload = device if device.type == "cpu" else mm.text_encoder_offload_device()
    return {"load_device": device, "offload_device": offload}


def _load_clip(names: list[str], clip_type_name: str, device: str) -> Any:
    """The stock CLIPLoader / DualCLIPLoader call, with the encoder placed on ``device``."""
    import comfy.sd
    import folder_paths

    clip_type = getattr(comfy.sd.CLIPType, clip_type_name.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    return comfy.sd.load_clip(
        ckpt_paths=[folder_paths.get_full_path_or_raise("text_encoders", n) for n in names],
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=clip_type,
        model_options=_te_model_options(_device(device)),
    )


class XDiTVAELoader:
    """Stock ``VAELoader`` + device + tiles spread over ``parallel_devices``."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    DESCRIPTION = (
        "Loads a VAE (as the stock Load VAE) on a device of your choice; optionally spreads the tiles of large "
        "decodes / encodes over several GPUs (parallel_devices)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        names = nodes.VAELoader.INPUT_TYPES()["required"]["vae_name"][0]
        return {
            "required": {
                "vae_name": (names, {"tooltip": "VAE file (models/vae) or a TAESD preview decoder."}),
                "device": ("STRING", {"default": "default", "tooltip": TIP_DEVICE}),
            },
            # optional: prompts saved before this input existed still validate (empty = off)
            "optional": {"parallel_devices": ("STRING", {"default": "", "tooltip": TIP_PARALLEL})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device: str, parallel_devices: str = "") -> bool | str:
        ok = _validate_device(device)
        if ok is not True:
            return ok
        try:
            parse_vae_parallel(parallel_devices, _visible_gpus())
        except ConfigError as e:
            return str(e)
        return True

    def load(self, vae_name: str, device: str, parallel_devices: str = "") -> dict[str, Any]:
        import nodes

        dev = _device(device)
        par = parse_vae_parallel(parallel_devices, _visible_gpus())
        vae = nodes.VAELoader().load_vae(vae_name)[0] if dev is None else _load_vae_on(vae_name, dev)
        if par is None:
            one = " (parallel_devices: one device = the stock VAE)" if parallel_devices.strip() else ""
            status = f"VAE on {vae.device}{one}"
        else:
            vae, status = _parallel(vae, par)
        return {"ui": {"text": [status]}, "result": (vae,)}


def _load_vae_on(vae_name: str, dev: Any) -> Any:
    """The stock loader's state dict for each kind of name, then the VAE on ``dev``."""
    import os

    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes
    import torch

    stock = nodes.VAELoader()
    if vae_name == "pixel_space":
        sd = {"pixel_space_vae": torch.tensor(1.0)}
    elif vae_name in stock.image_taes:
        sd = stock.load_taesd(vae_name)
    else:
        folder = "vae_approx" if os.path.splitext(vae_name)[0] in stock.video_taes else "vae"
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise(folder, vae_name))
    vae = comfy.sd.VAE(sd=sd, device=dev)
    vae.throw_exception_if_invalid()
    return vae


def _parallel(vae: Any, par: VAEParallelConfig) -> tuple[Any, str]:
    """The parallel VAE (image VAEs), or the stock one with the reason (1-D / 3-D VAEs)."""
    import logging

    from ..engine.vae import parallelize

    if vae.latent_dim != 2 or vae.extra_1d_channel is not None:
        status = f"VAE on {vae.device}; parallel tiles are for image VAEs, this one is {vae.latent_dim}-D: stock VAE"
    else:
        vae = parallelize(vae, par)
        when = f"images over {par.tile_pixels} pixels or " if par.tile_pixels else ""
        status = (
            f"VAE on {vae.device}; tiles spread over {par.describe()} for tiled decode / encode and for "
            f"VAE Decode / Encode of {when}images ComfyUI estimates too large for {vae.device}"
        )
    logging.getLogger("xdit_multigpu").info("[xDiT] %s", status)
    return vae, status


class XDiTCLIPLoader:
    """Stock ``CLIPLoader`` + device (a GPU index, cpu or default)."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Loads a text encoder (as the stock Load CLIP) on a device of your choice."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        req = nodes.CLIPLoader.INPUT_TYPES()["required"]
        return {
            "required": {
                "clip_name": (req["clip_name"][0], {"tooltip": "Text encoder file (models/text_encoders)."}),
                "type": (req["type"][0], {"tooltip": "Which model family the encoder is for."}),
                "device": ("STRING", {"default": "default", "tooltip": TIP_DEVICE}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device: str) -> bool | str:
        return _validate_device(device)

    def load(self, clip_name: str, type: str, device: str) -> tuple[Any]:  # noqa: A002 (stock input name)
        return (_load_clip([clip_name], type, device),)


class XDiTDualCLIPLoader:
    """Stock ``DualCLIPLoader`` + device."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Loads two text encoders (as the stock DualCLIPLoader, e.g. clip_l + t5xxl for Flux) on a device."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        req = nodes.DualCLIPLoader.INPUT_TYPES()["required"]
        return {
            "required": {
                "clip_name1": (req["clip_name1"][0], {"tooltip": "First text encoder (models/text_encoders)."}),
                "clip_name2": (req["clip_name2"][0], {"tooltip": "Second text encoder (models/text_encoders)."}),
                "type": (req["type"][0], {"tooltip": "Which model family the encoders are for."}),
                "device": ("STRING", {"default": "default", "tooltip": TIP_DEVICE}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device: str) -> bool | str:
        return _validate_device(device)

    def load(self, clip_name1: str, clip_name2: str, type: str, device: str) -> tuple[Any]:  # noqa: A002
        return (_load_clip([clip_name1, clip_name2], type, device),)
