"""Every ComfyUI call the pack makes to load a diffusion model and sample, in one place.

Used in three places with identical code, so that they cannot drift apart: inside Ray workers, by the
in-process one-device path, and by the fallback. Imports ComfyUI lazily (the package must import
without it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from ..config import LoaderKind, LoadSpec
from ..engine.request import SampleRequest
from ..patching import build_on_device

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def model_options_for(weight_dtype: str) -> dict[str, Any]:
    """``model_options`` exactly as ComfyUI's ``UNETLoader`` builds them for ``weight_dtype``."""
    import torch

    opts: dict[str, Any] = {}
    if weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
        opts["dtype"] = torch.float8_e4m3fn
        if weight_dtype == "fp8_e4m3fn_fast":
            opts["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        opts["dtype"] = torch.float8_e5m2
    return opts


def load_diffusion_model(spec: LoadSpec) -> Any:
    """Load the diffusion model of ``spec`` with ComfyUI's own loader; returns a ``ModelPatcher``.

    ``spec.unet_config_json`` (tests only) gives the architecture of a file ComfyUI cannot detect, e.g.
    a Flux smaller than detection's hard-coded 24 x 128 heads; it goes through ComfyUI's own
    ``model_config_from_unet_config`` so the rest of the path is the stock one.
    """
    import comfy.sd
    import comfy.utils

    opts = model_options_for(spec.weight_dtype)
    if spec.unet_config_json:
        return _load_with_explicit_config(spec.path, json.loads(spec.unet_config_json), opts)
    if spec.kind is LoaderKind.CHECKPOINT:
        out = comfy.sd.load_checkpoint_guess_config(
            spec.path, output_vae=False, output_clip=False, model_options=opts
        )
        return out[0]
    return comfy.sd.load_diffusion_model(spec.path, model_options=opts)


def load_diffusion_model_from_state_dict(spec: LoadSpec, sd: dict[str, Any], metadata: dict[str, str] | None) -> Any:
    """``load_diffusion_model`` for the file of ``spec`` already read into ``sd`` (``worker/prefetch.py``).

    The same ComfyUI calls that ``comfy.sd.load_diffusion_model`` / ``load_checkpoint_guess_config``
    make after ``load_torch_file(path, return_metadata=True)``, with their error when nothing is
    detected. ComfyUI pops the tensors it loads from ``sd``; the caller must not keep ``sd`` afterwards.
    """
    import comfy.sd

    opts = model_options_for(spec.weight_dtype)
    if spec.kind is LoaderKind.CHECKPOINT:
        out = comfy.sd.load_state_dict_guess_config(
            sd, output_vae=False, output_clip=False, model_options=opts, metadata=metadata
        )
        model = out[0] if out is not None else None
    else:
        device = _device_of(sd)  # the weights are on the GPU already: no CPU-built model to move there
        with build_on_device(device) if device is not None else contextlib.nullcontext():
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts, metadata=metadata)
        if model is None:
            logging.error("ERROR UNSUPPORTED DIFFUSION MODEL %s", spec.path)
    if model is None:
        hint = comfy.sd.model_detection_error_hint(spec.path, sd)
        raise RuntimeError(f"ERROR: Could not detect model type of: {spec.path}\n{hint}")
    return model


def _device_of(sd: dict[str, Any]) -> Any:
    """The device of the state dict's tensors when that is not the CPU (a prefetched GPU buffer), else None."""
    device = next((t.device for t in sd.values() if hasattr(t, "device")), None)
    return device if device is not None and device.type != "cpu" else None


def _load_with_explicit_config(path: str, unet_config: dict[str, Any], opts: dict[str, Any]) -> Any:
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if model_config is None:
        raise ValueError(f"unet_config matches no ComfyUI model: {unet_config}")
    load_device = mm.get_torch_device()
    dtype = opts.get("dtype") or mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=model_config.supported_inference_dtypes
    )
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def prepare_noise(patcher: Any, latent: dict[str, Any], seed: int, disable_noise: bool = False) -> tuple[Any, Any]:
    """(latent_image, noise) exactly as ``nodes.common_ksampler`` makes them."""
    import comfy.sample
    import torch

    latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return latent_image, noise


def progress_callback(progress: Callable[[int, int, Any], None] | None) -> Callable[..., None] | None:
    """ComfyUI's sampler ``callback(step, x0, x, total_steps)`` -> ``progress(step + 1, total_steps, x0)``,
    the values ``latent_preview.prepare_callback`` gives the progress bar."""
    if progress is None:
        return None

    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:  # noqa: ARG001
        progress(step + 1, total_steps, x0)

    return callback


def run_sampler(patcher: Any, req: SampleRequest, callback: Any = None, disable_pbar: bool = True) -> Any:
    """``comfy.sample.sample`` with the request's settings (the call ``common_ksampler`` makes).

    Runs under ``torch.inference_mode()`` as ComfyUI's executor runs every node: without it, autograd
    would record every step (memory and time) in a worker process.
    """
    import torch

    with torch.inference_mode():
        if req.batch is None or req.batch.total == req.batch.stop - req.batch.start:
            return _sample(patcher, req, callback, disable_pbar)
        from ..patching import batch_slice_noise

        with batch_slice_noise(req.batch.start, req.batch.stop, req.batch.total):
            return _sample(patcher, req, callback, disable_pbar)


def _sample(patcher: Any, req: SampleRequest, callback: Any, disable_pbar: bool) -> Any:
    import comfy.sample

    return comfy.sample.sample(
        patcher,
        req.noise,
        req.steps,
        req.cfg,
        req.sampler_name,
        req.scheduler,
        req.positive,
        req.negative,
        req.latent_image,
        denoise=req.denoise,
        disable_noise=req.disable_noise,
        start_step=req.start_step,
        last_step=req.last_step,
        force_full_denoise=req.force_full_denoise,
        noise_mask=req.noise_mask,
        callback=callback,
        disable_pbar=disable_pbar,
        seed=req.seed,
    )
