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
