"""``parallelize``: validate a plan against a model, then apply CFG and sequence parallel, in that order.

Everything is installed on a *clone* of the ComfyUI ModelPatcher through extension points (wrappers,
``transformer_options`` entries, block-replace patches); nothing touches ComfyUI globals, so a
one-device run on the original patcher in the same process is unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import AttentionBackend, ParallelPlan
from ..errors import ConfigError, UnsupportedModelError
from ..models.registry import Axis, ModelSpec
from .attention import SequenceAttention, make_attention_override
from .cfg import apply_cfg
from .control import CONTROL_KEY, make_control_wrapper
from .groups import ParallelGroups
from .sequence import SequenceParallel
from .tuning import Tuning

log = logging.getLogger(__name__)


def unet_config_of(patcher: Any) -> Mapping[str, Any]:
    """The detected architecture of the patcher's model (``model_config.unet_config``)."""
    config = getattr(getattr(patcher.model, "model_config", None), "unet_config", None)
    return config if isinstance(config, Mapping) else {}


def validate(spec: ModelSpec, plan: ParallelPlan, unet_config: Mapping[str, Any], groups: ParallelGroups) -> None:
    """Raise ConfigError / UnsupportedModelError (field + fix) unless ``plan`` can run ``spec``."""
    degrees = (plan.cfg, plan.ulysses, plan.ring)
    if degrees != (groups.plan.cfg, groups.plan.ulysses, groups.plan.ring) or plan.world_size != groups.world_size:
        raise ConfigError(
            "parallel_plan",
            f"the plan ({plan.describe()}) differs from the groups' ({groups.plan.describe()})",
            "Build ParallelGroups with the same plan",
        )
    for axis, degree in ((Axis.CFG, plan.cfg), (Axis.ULYSSES, plan.ulysses), (Axis.RING, plan.ring)):
        if degree > 1 and not spec.supports(axis):
            supported = ", ".join(sorted(a.value for a in spec.axes)) or "none"
            raise UnsupportedModelError(
                "parallel_strategy",
                f"{spec.display} does not support {axis.value} parallelism (degree {degree}); it supports {supported}",
                "Choose CFG parallel for this model" if spec.supports(Axis.CFG) else "Use one device",
            )
    if plan.sp > 1 and spec.sequence_parallel is None:
        raise UnsupportedModelError(
            "parallel_strategy", f"{spec.display} has no sequence-parallel installer", "Choose CFG parallel"
        )
    if plan.ulysses > 1:
        heads = spec.heads(unet_config)
        if heads <= 0 or heads % plan.ulysses:
            divisors = [d for d in range(2, heads + 1) if heads % d == 0] if heads > 0 else []
            raise ConfigError(
                "ulysses_degree",
                f"{spec.display} has {heads} attention heads, which do not divide over ulysses {plan.ulysses}",
                f"Use a ulysses degree in {divisors or [1]} and put the rest on ring",
            )


def parallelize(patcher: Any, spec: ModelSpec, plan: ParallelPlan, groups: ParallelGroups) -> Any:
    """Return a CLONE of ``patcher`` with CFG parallel (plan.cfg > 1) and sequence parallel (plan.sp > 1).

    ``plan.world_size == 1`` returns ``patcher`` unchanged. Every rank then calls ComfyUI's own
    ``comfy.sample.sample`` with the same noise / seed / conds and ends with the same latent.
    """
    if plan.world_size == 1:
        return patcher
    validate(spec, plan, unet_config_of(patcher), groups)
    clone = patcher.clone()
    if plan.cfg > 1:
        apply_cfg(clone, groups)
        log.info("xDiT: applied CFG parallel (degree %d) on rank %d", plan.cfg, groups.rank)
    if plan.sp > 1:
        apply_sequence(clone, spec, groups, plan.attention)
        log.info("xDiT: applied %s sequence parallel (ulysses %d x ring %d) on rank %d",
                 spec.name, plan.ulysses, plan.ring, groups.rank)
    return clone


def apply_sequence(patcher: Any, spec: ModelSpec, groups: ParallelGroups,
                   backend: AttentionBackend = AttentionBackend.YUNCHANG) -> SequenceParallel:
    """Install the family's sequence-parallel hooks on ``patcher`` (already a clone), plus the
    ``APPLY_MODEL`` wrapper that shards ControlNet residuals (or refuses them, see ``control.py``)."""
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    assert spec.sequence_parallel is not None
    tuning = Tuning.from_env()
    ctx = SequenceParallel(groups, make_attention_override(SequenceAttention(groups, tuning, backend)), tuning)
    spec.sequence_parallel(patcher, ctx)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CONTROL_KEY,
                                 make_control_wrapper(spec.control_residuals, spec.display, ctx.forward_state))
    return ctx
