"""What a model file is, learned before anything is loaded: used to validate node inputs.

For ``.safetensors`` files only the header is read: ComfyUI's own detection runs on a state dict of
``meta`` tensors (keys, shapes and dtypes are all it looks at), so validation costs milliseconds even
for a 24 GB model. Other formats are detected when they are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import LoaderKind
from ..errors import ConfigError, UnsupportedModelError
from ..models import all_specs, lookup
from ..models.registry import ModelSpec
from ..worker.prefetch import DTYPES, read_header_json

_ST_DTYPES = {code: torch_name for code, (torch_name, _) in DTYPES.items()}  # safetensors code -> torch dtype name


@dataclass(frozen=True)
class ModelFileInfo:
    config_class: str  # ComfyUI supported_models class name, e.g. "Flux"
    unet_config: dict[str, Any]
    spec: ModelSpec

    @property
    def heads(self) -> int:
        return self.spec.heads(self.unet_config)


def read_safetensors_header(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, reading only its header. Lenient on purpose:
    detection needs keys and shapes, so a dtype this pack does not know reads as float32 here."""
    header, _ = read_header_json(path)
    meta = header.pop("__metadata__", None) or {}
    return header, meta


def _meta_state_dict(header: dict[str, Any]) -> dict[str, Any]:
    import torch

    sd = {}
    for key, entry in header.items():
        dtype = getattr(torch, _ST_DTYPES.get(entry.get("dtype", "F32"), "float32"))
        sd[key] = torch.empty(entry["shape"], dtype=dtype, device="meta")
    return sd


def detect_config(path: str, kind: LoaderKind) -> tuple[str, dict[str, Any]] | None:
    """ComfyUI's detection on the file's header: (config class name, unet_config) or None."""
    import comfy.model_detection as md

    header, metadata = read_safetensors_header(path)
    sd = _meta_state_dict(header)
    prefix = md.unet_prefix_from_state_dict(sd) if kind is LoaderKind.DIFFUSION_MODEL else "model.diffusion_model."
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} or sd
    config = md.model_config_from_unet(sub, "", metadata=metadata)
    if config is None:
        converted = md.convert_diffusers_mmdit(sub, "")
        config = md.model_config_from_unet(converted, "") if converted is not None else None
    if config is None:
        return None
    return type(config).__name__, dict(config.unet_config)


def inspect_model_file(field: str, path: str | None, name: str, kind: LoaderKind) -> ModelFileInfo | None:
    """Validate a model file for the parallel path. Returns None for formats checked only at load.

    Raises ``ConfigError`` (missing / unreadable / undetectable) or ``UnsupportedModelError``.
    """
    if not path or not os.path.isfile(path):
        raise ConfigError(field, f'"{name}" was not found in the models folder', "Pick a file from the list or refresh")
    if not os.access(path, os.R_OK):
        raise ConfigError(field, f'"{name}" is not readable', "Fix the file's permissions")
    if not path.endswith(".safetensors"):
        return None
    try:
        detected = detect_config(path, kind)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(field, f'"{name}" could not be read ({e})', "Re-download the file; it may be truncated") from e
    if detected is None:
        raise ConfigError(
            field, f'ComfyUI cannot detect the model in "{name}"', "Check that it is a diffusion model ComfyUI supports"
        )
    cls_name, unet_config = detected
    spec = lookup(cls_name)
    if spec is None:
        names = ", ".join(s.display for s in all_specs())
        raise UnsupportedModelError(
            field,
            f'"{name}" is a {cls_name} model, which this pack cannot run in parallel yet (supported: {names})',
            "Use ComfyUI's stock loader and KSampler for it",
        )
    return ModelFileInfo(cls_name, unet_config, spec)
