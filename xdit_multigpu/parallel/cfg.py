"""CFG parallel: the conds of one sampling step run on different ranks of the CFG group.

Installed as a keyed ``WrappersMP.CALC_COND_BATCH`` wrapper, i.e. around ComfyUI's ``_calc_cond_batch``,
so area / mask conds, hooks, ControlNet, every sampler and guider (3+ conds round-robin) keep working.

Contract: every rank of a CFG group calls the wrapper with the same ``conds`` (same seed, same inputs).
Active (non-None) conds are assigned round-robin over the CFG ranks; each rank runs ComfyUI's executor
with only its own conds (the others passed as None, for which ComfyUI returns zeros) and the outputs are
broadcast from their owners, so every rank returns all outputs. With fewer than two active conds
(ComfyUI's cfg == 1 optimisation) every rank computes everything locally. Model-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .comm import broadcast_
from .groups import ParallelGroups

WRAPPER_KEY = "xdit_multigpu.cfg_parallel"


def assign_conds(active: Sequence[int], cfg_size: int) -> dict[int, int]:
    """Owner CFG rank of every active cond index, round-robin in order: {cond index: cfg rank}."""
    if cfg_size < 1:
        raise ValueError(f"cfg_size must be >= 1, got {cfg_size}")
    return {cond: j % cfg_size for j, cond in enumerate(active)}


def local_conds(conds: Sequence[Any], owners: dict[int, int], cfg_rank: int) -> list[Any]:
    """``conds`` with the entries other ranks own replaced by None."""
    return [c if owners.get(i) == cfg_rank else None for i, c in enumerate(conds)]


def make_cfg_wrapper(groups: ParallelGroups) -> Callable[..., list[Any]]:
    """The ``CALC_COND_BATCH`` wrapper for this rank (a closure: see ``make_attention_override``)."""
    cfg_size, cfg_rank, cfg_ranks, group = groups.plan.cfg, groups.cfg_rank, groups.cfg_ranks, groups.cfg

    def calc_cond_batch(executor: Callable[..., list[Any]], model: Any, conds: list[Any], x_in: Any,
                        timestep: Any, model_options: dict[str, Any]) -> list[Any]:
        active = [i for i, c in enumerate(conds) if c is not None]
        if len(active) < 2:
            return executor(model, conds, x_in, timestep, model_options)
        owners = assign_conds(active, cfg_size)
        out = executor(model, local_conds(conds, owners, cfg_rank), x_in, timestep, model_options)
        for i in active:  # same order on every rank: one broadcast per active cond
            broadcast_(out[i], cfg_ranks[owners[i]], group)
        return out

    return calc_cond_batch


def apply_cfg(patcher: Any, groups: ParallelGroups) -> None:
    """Install CFG parallel on ``patcher`` (a clone: the wrapper lives in its own ``wrappers``)."""
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                 make_cfg_wrapper(groups))
