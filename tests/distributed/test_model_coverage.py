"""Parallel sampling == one-device sampling for SDXL, PixArt-Σ/α and HunyuanDiT (tiny fp32, CPU gloo ranks).

Same harness as ``test_parallel_matches_one_device.py`` (one spawn per (model, ranks) runs every case;
rank 0 computes the one-device references afterwards in the same process). Plans per device count:

* what the planner's Hybrid strategy picks for 2 and 4 devices (for a CFG-only family on 4 devices that
  is CFG 2 on 2 ranks, the other 2 devices stay idle: the engine starts only ``plan.world_size`` ranks);
* for families with sequence-parallel axes, every declared strategy at 2 and 4 ranks: Ulysses, Ring,
  Ulysses x Ring, CFG x Ulysses, CFG x Ring.

EPS / V-prediction tiny models sample from a zero latent at denoise 0.3 by default so that latents stay
O(10) (see ``_cases.OUTPUT_LAYER``); the cfg 2.5 vs 1.0 difference is O(1), so a wrong attention shows.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _cases import Case, run_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

from xdit_multigpu.config import ParallelPlan, ParallelStrategy  # noqa: E402
from xdit_multigpu.engine import planner  # noqa: E402
from xdit_multigpu.models import families  # noqa: E402
from xdit_multigpu.models.registry import Axis, ModelSpec  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-4
SAMPLERS = ("euler", "dpmpp_2m")
# family -> (registry spec, latent side, default denoise, attention heads of the tiny model, rank counts)
FAMILIES: dict[str, tuple[ModelSpec, int, float, int, tuple[int, ...]]] = {
    "sdxl": (families.SDXL, 16, 0.3, 8, (2, 4)),
    "pixart": (families.PIXART, 40, 0.3, 4, (2, 4)),  # PixArt-Σ, 20 x 20 tokens
    "pixart_alpha": (families.PIXART, 40, 0.3, 6, (2,)),  # micro-conditions; 6 heads
    "hunyuan_dit": (families.HUNYUAN_DIT, 16, 1.0, 4, (2, 4)),  # 8 x 8 tokens, long skips
}
SP_PLANS = {2: [(1, 2, 1), (1, 1, 2)], 4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)]}


def hybrid_plan(family: str, devices: int, cfg_active: bool = True) -> ParallelPlan:
    spec, _, _, heads, _ = FAMILIES[family]
    return planner.plan(ParallelStrategy.HYBRID, devices, cfg_active, heads, spec.axes)


def _plans(family: str, ranks: int) -> list[tuple[int, int, int]]:
    """Plans that run on exactly ``ranks`` ranks: the planner's Hybrid choices plus every SP strategy."""
    spec, _, _, _, worlds = FAMILIES[family]
    if ranks not in worlds:
        return []
    plans: list[tuple[int, int, int]] = []
    for devices in (2, 4):
        p = hybrid_plan(family, devices)
        if p.world_size == ranks:
            plans.append((p.cfg, p.ulysses, p.ring))
    if ranks == 2 and spec.supports(Axis.CFG):
        plans.append((2, 1, 1))
    if spec.supports(Axis.ULYSSES) and spec.supports(Axis.RING):
        plans += SP_PLANS[ranks]
    return list(dict.fromkeys(plans))


def _has_sp(family: str) -> bool:
    return FAMILIES[family][0].supports(Axis.ULYSSES)


def _cases(family: str, ranks: int) -> list[Case]:
    _, size, denoise, _, _ = FAMILIES[family]
    plans = _plans(family, ranks)
    cases = [Case(p, sampler=s, denoise=denoise, size=size, steps=2 if s == "euler" else 3)
             for p in plans for s in SAMPLERS]
    if not cases:
        return []
    if ranks == 2:
        cases.append(Case((2, 1, 1), denoise=denoise, size=size, cfg_scale=1.0))  # one active cond
    if _has_sp(family):
        sp_plan = (1, 2, 1) if ranks == 2 else (1, 2, 2)
        cases += [
            Case(sp_plan, denoise=denoise, size=size + 2),  # odd token grid: uneven shards, all-gather path
            Case((1, 1, ranks), denoise=denoise, size=size + 2),
            Case(sp_plan, denoise=denoise, size=size, variant="no_override"),  # negative control
        ]
    return cases


@functools.lru_cache(maxsize=None)
def _results(family: str, ranks: int, comfy_path: str) -> tuple[list[Case], list[dict[str, Any]], float]:
    cases = _cases(family, ranks)
    t0 = time.perf_counter()
    res = run_ranks(run_cases, ranks, (family, cases), comfy_path, timeout_s=900)
    return cases, res, time.perf_counter() - t0


def _params() -> list[Any]:
    out = []
    for family in FAMILIES:
        for ranks in (2, 4):
            for i, c in enumerate(_cases(family, ranks)):
                cid = (f"{family}-w{ranks}-cfg{c.plan[0]}u{c.plan[1]}r{c.plan[2]}-{c.sampler}-d{c.denoise}"
                       f"-s{c.size}-c{c.cfg_scale}{'-' + c.variant if c.variant else ''}")
                out.append(pytest.param(family, ranks, i, id=cid))
    return out


@pytest.mark.parametrize(("family", "ranks", "index"), _params())
def test_matches_one_device(family: str, ranks: int, index: int, comfy_root: str) -> None:
    cases, res, _ = _results(family, ranks, comfy_root)
    case = cases[index]
    ref = res[0]["reference"][case.reference_key]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    spread = [float(np.abs(r["parallel"][index] - res[0]["parallel"][index]).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    assert res[0]["methods_restored"], "the one-device reference ran with an object patch of a parallel clone"
    if case.variant == "no_override":
        assert min(diffs) > 1e-2, f"negative control was not caught: diffs {diffs}"
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
    sp = case.plan[1] * case.plan[2]
    if sp > 1:  # which attention path ran: USP unless the shards are uneven or heads do not divide
        heads = FAMILIES[family][3]
        expect_fallback = (case.size // 2) ** 2 % sp != 0 or heads % case.plan[1] != 0
        assert [r["fallback"][index] for r in res] == [expect_fallback] * ranks, "unexpected attention path"
    assert max(spread) == 0.0, f"{case}: ranks disagree with rank 0 by {spread}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hybrid_plan_per_device_count(family: str) -> None:
    """What the planner gives each family on 2 and 4 devices (the plans the cases above run)."""
    spec = FAMILIES[family][0]
    assert hybrid_plan(family, 2).world_size == 2 and hybrid_plan(family, 2).cfg == 2
    four = hybrid_plan(family, 4)
    if spec.supports(Axis.ULYSSES):
        assert (four.cfg, four.ulysses, four.ring) == (2, 2, 1)
    else:  # CFG only: 2 of the 4 devices stay idle, the engine starts 2 ranks
        assert (four.cfg, four.ulysses, four.ring) == (2, 1, 1) and "idle" in four.reason
    assert hybrid_plan(family, 4, cfg_active=False).cfg == 1


def test_pixart_kv_compression_refuses_sequence_parallel(comfy_root: str) -> None:
    """sr_ratio > 1 downsamples K/V over the whole grid: SP is refused at install, CFG stays allowed."""
    from _cases import build_model

    from xdit_multigpu.errors import UnsupportedModelError

    base = build_model("pixart_kv")
    assert base.model.diffusion_model.blocks[1].attn.sr_ratio == 2
    clone = base.clone()
    with pytest.raises(UnsupportedModelError, match="KV compression") as err:
        families.PIXART.sequence_parallel(clone, None)  # refuses before touching the context
    assert err.value.field == "parallel_strategy" and "CFG" in str(err.value)
    assert not clone.object_patches and not base.object_patches
    assert families.PIXART.supports(Axis.CFG)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_original_patcher_untouched(family: str, comfy_root: str) -> None:
    for ranks in FAMILIES[family][4]:
        if _cases(family, ranks):
            _, res, _ = _results(family, ranks, comfy_root)
            assert all(r["base_untouched"] for r in res)
