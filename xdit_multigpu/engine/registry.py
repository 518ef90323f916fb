"""Which MODEL objects came from which xDiT loader, so the KSampler can check the MODEL it is given.

Keyed weakly by ComfyUI's ``BaseModel`` instance (shared by every clone of a ModelPatcher), so a MODEL
that passed through LoRA or other patch nodes is still recognised, and nothing is kept alive.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..config import DispatcherSpec

_LOADED: weakref.WeakKeyDictionary[Any, DispatcherSpec] = weakref.WeakKeyDictionary()


def remember_model(patcher: Any, spec: DispatcherSpec) -> None:
    _LOADED[patcher.model] = spec


def spec_of_model(patcher: Any) -> DispatcherSpec | None:
    return _LOADED.get(getattr(patcher, "model", None)) if hasattr(patcher, "model") else None


def model_modifications(patcher: Any) -> list[str]:
    """What a MODEL carries beyond a freshly loaded one (weight patches, object patches, wrappers...).

    Workers load the plain file, so until modifications travel to them (LoRA, ModelSampling, ...), a
    modified MODEL is sampled on one device and the UI says which modifications caused it.
    """
    found = []
    if getattr(patcher, "patches", None):
        found.append(f"{len(patcher.patches)} weight patch(es) (e.g. a LoRA)")
    if getattr(patcher, "object_patches", None):
        found.append("object patches (" + ", ".join(sorted(patcher.object_patches)) + ")")
    opts = getattr(patcher, "model_options", {}) or {}
    extra = sorted(k for k, v in opts.items() if k != "transformer_options" and v)
    if extra:
        found.append("model options (" + ", ".join(extra) + ")")
    topts = opts.get("transformer_options", {}) or {}
    if any(topts.values()):
        found.append("transformer options (" + ", ".join(sorted(k for k, v in topts.items() if v)) + ")")
    if any(getattr(patcher, "wrappers", {}).values()) or any(getattr(patcher, "callbacks", {}).values()):
        found.append("wrappers / callbacks")
    return found
