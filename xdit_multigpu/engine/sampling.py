"""The KSampler's decision: one device (stock path) or the worker pool, and the fallback between them.

The stock path is ``nodes.common_ksampler`` itself, so on one device (and in every fallback) the result
is bit-identical to the stock KSampler, with ComfyUI's progress bar and previews.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ..config import DispatcherSpec
from ..models import lookup_config
from .model_delta import DeltaDescription, describe_model
from .registry import spec_of_model

log = logging.getLogger("xdit_multigpu")


@dataclass(frozen=True)
class SampleResult:
    latent: dict[str, Any]
    status: str  # shown on the node and logged: the plan used, or why one device was used
    parallel: bool


def stock_sample(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                 positive: Any, negative: Any, latent: dict[str, Any], denoise: float) -> dict[str, Any]:
    import nodes

    from .engine import HOST_LOCK

    with HOST_LOCK:  # ComfyUI's model management is not thread-safe: one in-process sampler at a time
        (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                       denoise=denoise)
    return out


def parallel_blocker(model: Any, spec: DispatcherSpec, described: DeltaDescription | None = None) -> str | None:
    """Why this MODEL cannot go to the worker pool as it is, or None.

    ``described``: ``describe_model(model)``; its problems (modifications that cannot travel to the
    workers) block the parallel path, each one named.
    """
    if spec.devices.world_size <= 1:
        return f"one device requested ({spec.devices.describe()})" if spec.devices.ids else "no GPU is visible"
    loaded = spec_of_model(model)
    if loaded is None or loaded.load != spec.load:
        return "the MODEL input does not come from the xDiT loader that made this dispatcher"
    problems = (described or describe_model(model)).problems
    if problems:
        return "the MODEL carries modifications that cannot travel to the workers: " + "; ".join(problems)
    if lookup_config(model.model.model_config) is None:
        return f"{type(model.model.model_config).__name__} models are not supported on the parallel path"
    return None


def sample_latent(model: Any, spec: DispatcherSpec, seed: int, steps: int, cfg: float, sampler_name: str,
                  scheduler: str, positive: Any, negative: Any, latent: dict[str, Any], denoise: float) -> SampleResult:
    """Sample ``latent`` with the dispatcher's devices, or on one device with the reason why."""
    args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise)
    described = describe_model(model) if spec.devices.world_size > 1 else DeltaDescription(None)
    blocker = parallel_blocker(model, spec, described)
    if blocker is None:
        from .engine import get_engine

        t0 = time.perf_counter()
        outcome = get_engine().sample_ksampler(spec, model, *args, cfg_active=not math.isclose(cfg, 1.0),
                                               delta=described.delta)
        took = time.perf_counter() - t0
        out = latent.copy()
        out["samples"] = outcome.latent
        if outcome.fallback_reason is None:
            carried = f", with {described.delta.summary}" if described.delta is not None else ""
            groups = f"; {outcome.groups}" if outcome.groups else ""
            status = f"xDiT: {outcome.plan.describe()} ({spec.devices.describe()}){carried}{groups}, {took:.1f} s"
            return SampleResult(out, status, True)
        # The engine already sampled on one device (same call as the stock path) after a worker failure.
        return SampleResult(out, _one_device(outcome.fallback_reason, took), False)
    t0 = time.perf_counter()
    out = stock_sample(model, *args)
    return SampleResult(out, _one_device(blocker, time.perf_counter() - t0), False)


def _one_device(reason: str, seconds: float) -> str:
    return f"xDiT: sampled on one device with ComfyUI's sampler ({reason}), {seconds:.1f} s"
