"""Pins of the ComfyUI code the prefetch relies on (``worker/prefetch.py`` and
``comfy_runtime.load_diffusion_model_from_state_dict``).

A prefetching worker reads the file itself and calls ComfyUI's state-dict loaders, which must therefore be
exactly what ComfyUI's file loaders call after ``load_torch_file(path, return_metadata=True)``: the same
functions, the same arguments (``metadata`` included), the same error when nothing is detected, and a
state dict built the same way (safetensors' ``safe_open``, keys in ``f.keys()`` order, ``f.metadata()``).
A ComfyUI update that changes any of these must fail here, naming the symbol, rather than load a
prefetched model differently from the file.

Source checks compare with all whitespace removed, like ``test_host_pins.py``.
"""

from __future__ import annotations

import pytest

from tests.comfy.test_host_pins import _has, _params
from xdit_multigpu.worker.prefetch import SAFETENSORS_SUFFIXES

pytestmark = pytest.mark.comfy


def test_state_dict_loaders_take_metadata(comfy_root: str) -> None:
    import comfy.sd

    assert _params(comfy.sd.load_diffusion_model_state_dict)[:3] == ["sd", "model_options", "metadata"]
    params = _params(comfy.sd.load_state_dict_guess_config)
    assert params[:3] == ["sd", "output_vae", "output_clip"]
    assert {"model_options", "metadata"} <= set(params)
    assert _params(comfy.sd.model_detection_error_hint) == ["path", "state_dict"]


def test_file_loaders_are_load_torch_file_plus_the_state_dict_loaders(comfy_root: str) -> None:
    """What ``load_diffusion_model_from_state_dict`` repeats after the prefetch, with the same error text."""
    import comfy.sd

    _has(comfy.sd.load_diffusion_model,
         "sd, metadata = comfy.utils.load_torch_file(unet_path, return_metadata=True)",
         "model = load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata)",
         "if model is None:", 'logging.error("ERROR UNSUPPORTED DIFFUSION MODEL {}".format(unet_path))',
         r'raise RuntimeError("ERROR: Could not detect model type of: {}\n{}".format(unet_path, '
         "model_detection_error_hint(unet_path, sd)))")
    _has(comfy.sd.load_checkpoint_guess_config,
         "sd, metadata = comfy.utils.load_torch_file(ckpt_path, return_metadata=True)",
         "out = load_state_dict_guess_config(sd, output_vae, output_clip, output_clipvision, embedding_directory, "
         "output_model, model_options, te_model_options=te_model_options, metadata=metadata)",
         "if out is None:",
         r'raise RuntimeError("ERROR: Could not detect model type of: {}\n{}".format(ckpt_path, '
         "model_detection_error_hint(ckpt_path, sd)))")


def test_load_torch_file_builds_the_dict_the_prefetch_rebuilds(comfy_root: str) -> None:
    """Suffixes that go to safetensors, keys in ``safe_open(...).keys()`` order, ``f.metadata()`` as metadata."""
    import comfy.utils

    _has(comfy.utils.load_torch_file,
         'if ckpt.lower().endswith(".safetensors") or ckpt.lower().endswith(".sft"):',
         'with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:',
         "for k in f.keys():", "tensor = f.get_tensor(k)", "sd[k] = tensor", "metadata = f.metadata()")
    assert SAFETENSORS_SUFFIXES == (".safetensors", ".sft")


def test_loaders_copy_the_weights_into_the_model(comfy_root: str) -> None:
    """ComfyUI copies the state dict's tensors into the model's own parameters (``load_state_dict``), so the
    prefetch buffer can be freed after the load. Layers that adopt the given tensor instead (ComfyUI's
    ``mixed_precision_ops``: ``weight.to(device)`` is the tensor itself once it is on the device) are
    copied out by ``Prefetch.release_aliases``, and ``load_model`` reports whether the buffer was freed."""
    import comfy.model_base

    _has(comfy.model_base.BaseModel.load_model_weights, "to_load[k[len(unet_prefix):]] = sd.pop(k)",
         "self.diffusion_model.load_state_dict(to_load, strict=False)")


def test_unet_state_dict_loader_builds_through_model_config_from_unet(comfy_root: str) -> None:
    """``patching.build_on_device`` relies on: the loader finds its config through the module attribute
    ``model_detection.model_config_from_unet`` and builds with ``get_model(new_sd, "")`` (no device), then
    moves the model to the offload device; configs' ``get_model`` takes ``device`` and hands it to the model."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models_base

    _has(comfy.sd.load_diffusion_model_state_dict,
         'model_config = model_detection.model_config_from_unet(sd, "", metadata=metadata)',
         'model = model_config.get_model(new_sd, "")', "model = model.to(offload_device)")
    assert callable(comfy.model_detection.model_config_from_unet)
    assert _params(comfy.supported_models_base.BASE.get_model) == ["self", "state_dict", "prefix", "device"]
    _has(comfy.model_base.BaseModel.__init__,
         "self.diffusion_model = unet_model(**unet_config, device=device, operations=operations)")
