"""``Load UNet (xDiT Multi-GPU)`` and ``Load Checkpoint (xDiT Multi-GPU)``.

Each is the stock loader (same inputs, same MODEL / CLIP / VAE outputs, loaded by the stock code) plus
an ``XDIT_DISPATCHER`` describing where and how the KSampler (xDiT Multi-GPU) will run that model.
The main process keeps its MODEL on ComfyUI's offload device (RAM); workers load their own copies.
"""

from __future__ import annotations

from typing import Any

from ..config import LoaderKind
from ..engine.registry import remember_model
from .common import (
    CATEGORY,
    DISPATCHER,
    TIP_DISPATCHER,
    build_dispatcher,
    dispatcher_inputs,
    optional_inputs,
    validation_message,
)


class XDiTUNetLoader:
    """Stock ``UNETLoader`` + dispatcher."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", DISPATCHER)
    RETURN_NAMES = ("MODEL", "xdit_dispatcher")
    OUTPUT_TOOLTIPS = ("The diffusion model (as the stock Load Diffusion Model node).", TIP_DISPATCHER)
    DESCRIPTION = "Loads a diffusion model for multi-GPU sampling with KSampler (xDiT Multi-GPU)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        stock = nodes.UNETLoader.INPUT_TYPES()["required"]
        return {
            "required": {
                "unet_name": (stock["unet_name"][0], {"tooltip": "Diffusion model file (models/diffusion_models)."}),
                "weight_dtype": (stock["weight_dtype"][0], {"tooltip": "Weight precision, as the stock loader."}),
                **dispatcher_inputs(),
            },
            "optional": optional_inputs(),
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, unet_name: str, weight_dtype: str, gpu_devices: str, parallel_strategy: str, scheduling_strategy: str,
        **optional: Any,
    ) -> bool | str:
        return validation_message(
            build_dispatcher, "unet_name", "diffusion_models", unet_name, LoaderKind.DIFFUSION_MODEL,
            gpu_devices, parallel_strategy, scheduling_strategy, weight_dtype, **optional,
        )

    def load(
        self, unet_name: str, weight_dtype: str, gpu_devices: str, parallel_strategy: str, scheduling_strategy: str,
        **optional: Any,
    ) -> tuple[Any, Any]:
        import nodes

        spec = build_dispatcher(
            "unet_name", "diffusion_models", unet_name, LoaderKind.DIFFUSION_MODEL,
            gpu_devices, parallel_strategy, scheduling_strategy, weight_dtype, **optional,
        )
        (model,) = nodes.UNETLoader().load_unet(unet_name, weight_dtype)
        remember_model(model, spec)
        return (model, spec)


class XDiTCheckpointLoader:
    """Stock ``CheckpointLoaderSimple`` + dispatcher (workers load only the diffusion model)."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", DISPATCHER)
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "xdit_dispatcher")
    OUTPUT_TOOLTIPS = (
        "The diffusion model.",
        "The CLIP model used for encoding text prompts.",
        "The VAE used for encoding and decoding images.",
        TIP_DISPATCHER,
    )
    DESCRIPTION = "Loads a checkpoint for multi-GPU sampling with KSampler (xDiT Multi-GPU)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        stock = nodes.CheckpointLoaderSimple.INPUT_TYPES()["required"]
        return {
            "required": {
                "ckpt_name": (stock["ckpt_name"][0], {"tooltip": "Checkpoint file (models/checkpoints)."}),
                **dispatcher_inputs(),
            },
            "optional": optional_inputs(),
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, ckpt_name: str, gpu_devices: str, parallel_strategy: str, scheduling_strategy: str, **optional: Any
    ) -> bool | str:
        return validation_message(
            build_dispatcher, "ckpt_name", "checkpoints", ckpt_name, LoaderKind.CHECKPOINT,
            gpu_devices, parallel_strategy, scheduling_strategy, "default", **optional,
        )

    def load(
        self, ckpt_name: str, gpu_devices: str, parallel_strategy: str, scheduling_strategy: str, **optional: Any
    ) -> tuple[Any, Any, Any, Any]:
        import nodes

        spec = build_dispatcher(
            "ckpt_name", "checkpoints", ckpt_name, LoaderKind.CHECKPOINT,
            gpu_devices, parallel_strategy, scheduling_strategy, "default", **optional,
        )
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)
        remember_model(model, spec)
        return (model, clip, vae, spec)
