"""``ModelSpec``: everything the pack knows about one model family, as data.

``parallel/`` never names a model; each family module in ``models/`` declares one ``ModelSpec`` and
registers it here. Lookup is by the exact name of ComfyUI's ``supported_models`` config class, never by
a base class: ``Flux2`` subclasses ``Flux`` but has another layout, so an unlisted subclass is reported
as unsupported instead of being driven by hooks written for its parent. This module imports no ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._compat import StrEnum


class Axis(StrEnum):
    """A way of splitting one generation that a family supports."""

    CFG = "cfg"  # cond / uncond on different ranks (generic, CALC_COND_BATCH wrapper)
    ULYSSES = "ulysses"  # sequence parallel, all-to-all over heads (needs heads % degree == 0)
    RING = "ring"  # sequence parallel, K/V passed round a ring


class SequenceParallelInstaller(Protocol):
    """Installs sequence parallelism on a cloned ModelPatcher through ComfyUI extension points.

    Contract: after ``install(patcher, ctx)``, calling the model on the full latent on every rank of
    ``ctx``'s sequence group returns, on every rank, the same output as the unpatched model (image
    tokens are sharded on entry and all-gathered before the final layer).
    """

    def __call__(self, patcher: Any, ctx: Any) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str  # short id used in logs and the support matrix, e.g. "flux"
    display: str  # what users read, e.g. "Flux.1 (dev / schnell)"
    config_classes: tuple[str, ...]  # ComfyUI supported_models class names this spec covers
    axes: frozenset[Axis]
    heads: Callable[[Mapping[str, Any]], int]  # attention heads, from the detected unet_config
    hook: str  # which ComfyUI extension point carries the sequence split (documentation + matrix)
    sequence_parallel: SequenceParallelInstaller | None = None
    notes: str = ""
    # ControlNet under sequence parallel: residual lists indexed per block and added to the image rows
    # [0, n) of the stream (see parallel/control.py). False: ControlNet is refused with SP.
    control_residuals: bool = False
    # XDIT_CUDA_GRAPHS=auto replays CUDA graphs for this family: set once a GPU run showed the graphed
    # latent equal to the eager one (tests/gpu/test_graphs_bf16.py). False: eager unless "on".
    cuda_graphs: bool = False
    # Why capture fails for this family on GPUs (shown in the support matrix); such a call stays eager.
    cuda_graphs_refused: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def supports(self, axis: Axis) -> bool:
        return axis in self.axes


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    for cls_name in spec.config_classes:
        other = _REGISTRY.get(cls_name)
        if other is not None and other.name != spec.name:
            raise ValueError(f"{cls_name} is already registered to {other.name}")
        _REGISTRY[cls_name] = spec
    return spec


def lookup(config_class_name: str) -> ModelSpec | None:
    """Spec registered for a ComfyUI ``supported_models`` class name, or None."""
    return _REGISTRY.get(config_class_name)


def lookup_config(model_config: object) -> ModelSpec | None:
    """Spec for a ComfyUI ``supported_models`` config instance (or class)."""
    cls = model_config if isinstance(model_config, type) else type(model_config)
    return lookup(cls.__name__)


def all_specs() -> list[ModelSpec]:
    seen: dict[str, ModelSpec] = {}
    for spec in _REGISTRY.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())
