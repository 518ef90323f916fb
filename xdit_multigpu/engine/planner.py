"""Pick the parallel degrees of one generation: pure arithmetic, no torch, no Ray.

The planner sees only numbers the node layer already knows (device count, whether CFG runs an uncond
pass, attention heads, the model's supported axes) and returns a ``ParallelPlan`` whose ``reason`` is
shown to the user. Rules:

* Hybrid: CFG 2 when the sampler runs cond + uncond, the model supports CFG splitting and the device count
  is even; the remaining degree is sequence parallel, split into Ulysses (largest divisor that also
  divides the heads, kept inside the fast-link group when one is given) x Ring (the rest).
  A model without sequence-parallel axes gets CFG only; devices beyond the number of conds stay idle.
* USP: all devices sequence parallel, CFG 1.
* CFG: cond / uncond on exactly 2 devices.
* PipeFusion / Tensor: not yet available.
"""

from __future__ import annotations

from collections.abc import Collection

from ..config import ParallelPlan, ParallelStrategy
from ..errors import ConfigError
from ..models.registry import Axis

FIELD = "parallel_strategy"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


ULYSSES_FIELD = "ulysses_degree"


def split_sequence(sp: int, heads: int, axes: Collection[Axis], fast_link_group: int | None = None,
                   requested: int = 0) -> tuple[int, int, str]:
    """Split a sequence-parallel degree into (ulysses, ring, why).

    Ulysses all-to-alls move every activation each step, so they should stay on the fastest links; ring
    passes K/V point to point and tolerates slower ones. Ulysses also needs ``heads % ulysses == 0``.
    ``requested`` > 0: the user's Ulysses degree (``ulysses_degree``), the rest on ring; checked here.
    """
    if requested > 0:
        return _requested_split(sp, heads, axes, requested)
    if sp == 1:
        return 1, 1, "no sequence split"
    if Axis.ULYSSES not in axes:
        return 1, sp, f"ring {sp} (the model has no Ulysses axis)"
    candidates = [d for d in _divisors(sp) if heads > 0 and heads % d == 0] or [1]
    if Axis.RING not in axes:
        if sp not in candidates:
            raise ConfigError(
                FIELD,
                f"{sp}-way sequence parallelism needs Ulysses {sp}, which does not divide the model's {heads} heads "
                "and the model has no ring axis",
                f"Use a device count that divides {heads}",
            )
        return sp, 1, f"ulysses {sp} divides {heads} heads"
    why = f"largest divisor of {sp} that divides {heads} heads"
    if fast_link_group and fast_link_group > 0:
        inside = [d for d in candidates if fast_link_group % d == 0]
        if inside and max(inside) < max(candidates):
            why += f" and stays inside the fast-link group of {fast_link_group}"
        candidates = inside or candidates
    uly = max(candidates)
    ring = sp // uly
    tail = f"; ring {ring} over the rest" if ring > 1 else ""
    return uly, ring, f"ulysses {uly} ({why}){tail}"


def _requested_split(sp: int, heads: int, axes: Collection[Axis], uly: int) -> tuple[int, int, str]:
    """``ulysses_degree`` as the user set it: Ulysses ``uly`` x Ring ``sp // uly``, or a ``ConfigError``."""
    valid = [d for d in _divisors(sp) if heads > 0 and heads % d == 0 and (d == 1 or Axis.ULYSSES in axes)
             and (d == sp or Axis.RING in axes)]
    if uly not in valid:
        why = (f"does not divide the {sp}-way sequence split" if sp % uly else
               f"does not divide the model's {heads} attention heads" if heads <= 0 or heads % uly else
               "needs a Ulysses axis, which this model lacks" if Axis.ULYSSES not in axes else
               f"leaves ring {sp // uly}, and this model has no ring axis")
        fix = f"Use one of {valid}, or 0 for automatic" if valid else "Use 0 (automatic)"
        raise ConfigError(ULYSSES_FIELD, f"is {uly}, which {why}", fix)
    ring = sp // uly
    return uly, ring, f"ulysses {uly} as set in ulysses_degree" + (f"; ring {ring} over the rest" if ring > 1 else "")


def plan(
    strategy: ParallelStrategy,
    world_size: int,
    cfg_active: bool,
    heads: int,
    spec_axes: Collection[Axis],
    fast_link_group: int | None = None,
    ulysses: int = 0,
) -> ParallelPlan:
    """The plan for ``world_size`` devices; raises ``ConfigError`` naming ``parallel_strategy`` (or
    ``ulysses_degree``, when ``ulysses`` > 0 cannot be met) and a fix. ``ulysses``: 0 = automatic."""
    strategy = ParallelStrategy(strategy)
    strategy.require_available()
    if world_size < 1:
        raise ConfigError("gpu_devices", f"lists {world_size} devices", 'List at least one GPU, or use "cpu:N"')
    axes = frozenset(spec_axes)
    has_sp = Axis.ULYSSES in axes or Axis.RING in axes
    cfg_ok = Axis.CFG in axes
    if ulysses < 0:
        raise ConfigError(ULYSSES_FIELD, f"is {ulysses}", "Use 0 (automatic) or a positive Ulysses degree")
    if world_size == 1:
        return ParallelPlan(1, 1, 1, reason="one device: nothing to split")
    if strategy is ParallelStrategy.CFG:
        if ulysses > 1:
            raise ConfigError(ULYSSES_FIELD, f"is {ulysses}, but CFG parallel splits no sequence",
                              "Use 0, or choose Hybrid or USP")
        return _plan_cfg(world_size, cfg_active, cfg_ok)
    if strategy is ParallelStrategy.USP:
        if not has_sp:
            raise ConfigError(
                FIELD, "USP needs sequence parallelism, which this model does not support", "Choose CFG or Hybrid"
            )
        uly, ring, why = split_sequence(world_size, heads, axes, fast_link_group, ulysses)
        return ParallelPlan(1, uly, ring, reason=f"USP on {world_size} devices: {why}")
    return _plan_hybrid(world_size, cfg_active, cfg_ok, has_sp, heads, axes, fast_link_group, ulysses)


def _plan_cfg(world_size: int, cfg_active: bool, cfg_ok: bool) -> ParallelPlan:
    if world_size != 2:
        raise ConfigError(
            FIELD,
            f"CFG splits cond and uncond over exactly 2 devices, but gpu_devices lists {world_size}",
            "List 2 GPUs, or choose Hybrid or USP to use all of them",
        )
    if not cfg_ok:
        raise ConfigError(FIELD, "this model does not support CFG splitting", "Choose Hybrid or USP")
    if not cfg_active:
        raise ConfigError(
            FIELD,
            "CFG parallel needs an uncond pass, but cfg is 1.0 so the sampler runs cond only",
            "Raise cfg above 1.0, or choose Hybrid or USP",
        )
    return ParallelPlan(2, 1, 1, reason="CFG: cond and uncond on 2 devices")


def _plan_hybrid(
    world_size: int,
    cfg_active: bool,
    cfg_ok: bool,
    has_sp: bool,
    heads: int,
    axes: frozenset[Axis],
    fast_link_group: int | None,
    ulysses: int = 0,
) -> ParallelPlan:
    if not has_sp:
        if ulysses > 1:
            raise ConfigError(ULYSSES_FIELD, f"is {ulysses}, but this model splits by CFG only", "Use 0")
        conds = 2 if cfg_active and cfg_ok else 1
        idle = world_size - conds
        why = "cond and uncond in parallel" if conds == 2 else "cfg is 1.0 (cond only), nothing to split"
        return ParallelPlan(
            conds,
            1,
            1,
            reason=f"Hybrid: this model splits by CFG only ({why}); {idle} of {world_size} devices stay idle",
        )
    cfg = 2 if cfg_active and cfg_ok and world_size % 2 == 0 else 1
    sp = world_size // cfg
    uly, ring, why = split_sequence(sp, heads, axes, fast_link_group, ulysses)
    if cfg == 2:
        cfg_why = "cfg 2 (cond and uncond in parallel)"
    elif not cfg_active:
        cfg_why = "cfg 1 (cfg is 1.0, no uncond pass)"
    elif not cfg_ok:
        cfg_why = "cfg 1 (the model does not support CFG splitting)"
    else:
        cfg_why = f"cfg 1 ({world_size} devices is odd)"
    return ParallelPlan(cfg, uly, ring, reason=f"Hybrid on {world_size} devices: {cfg_why}; {sp}-way sequence: {why}")
