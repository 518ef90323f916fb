"""Conditioning features on the parallel path == one device (tiny fp32 Flux and SD3, CPU gloo ranks).

Features, built with ComfyUI's own nodes: inpainting noise mask (denoise 0.6), area conditioning
(ConditioningSetArea; an odd 6 x 10 latent area gives uneven shards), mask conditioning
(ConditioningSetMask, "default" and "mask bounds"), several positive conds (ConditioningCombine),
ControlNet (ControlNetApplyAdvanced with a tiny ComfyUI ControlNet; also on an odd 9 x 9 token grid) and,
for Flux, Kontext reference latents (``reference_latents``, even and odd token counts, with ControlNet).

Plans: Ulysses and Ring on 2 ranks (plus CFG alone for ControlNet / area); Ulysses x Ring and CFG x
Ulysses on 4. One spawn per (model, ranks).
``control_wrong_rows`` is a negative control: ControlNet residual rows of the wrong place must fail.
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
from _conditioning_cases import FLUX_ONLY, FeatureCase, case_id, run_feature_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-4
PLANS = {2: [(1, 2, 1), (1, 1, 2)], 4: [(1, 2, 2), (2, 2, 1)]}
FEATURES = ("inpaint", "area", "area_odd", "mask", "mask_bounds", "combine", "control", "kontext", "kontext_odd",
            "kontext_control")
FIRST_PLAN_ONLY = ("area", "mask", "kontext")  # their odd / bounds variants run on every plan


def _cases(model: str, world: int) -> list[FeatureCase]:
    cases = []
    for k, plan in enumerate(PLANS[world]):
        for f in FEATURES:
            if (f in FLUX_ONLY and model != "flux") or (k and f in FIRST_PLAN_ONLY):
                continue
            cases.append(FeatureCase(plan, f, denoise=0.6 if f == "inpaint" else 1.0))
    sp_plan = PLANS[world][0]
    cases += [FeatureCase(sp_plan, "control", size=18),  # 81 tokens: uneven shards
              FeatureCase(PLANS[world][-1], "control", size=18),
              FeatureCase(sp_plan, "control_wrong_rows")]
    if world == 2:  # CFG parallel alone (no sequence split): ControlNet and area conds per CFG rank
        cases += [FeatureCase((2, 1, 1), "control"), FeatureCase((2, 1, 1), "area_odd")]
    if model == "flux":
        cases.append(FeatureCase(PLANS[world][-1], "kontext_control", size=18))
    return cases


@functools.lru_cache(maxsize=None)
def _results(model: str, world: int, comfy_path: str) -> tuple[list[FeatureCase], list[dict[str, Any]], float]:
    cases = _cases(model, world)
    t0 = time.perf_counter()
    res = run_ranks(run_feature_cases, world, (model, cases), comfy_path, timeout_s=900)
    return cases, res, time.perf_counter() - t0


def _params() -> list[Any]:
    return [pytest.param(m, w, i, id=case_id(m, w, c))
            for m in ("flux", "sd3") for w in (2, 4) for i, c in enumerate(_cases(m, w))]


@pytest.mark.parametrize(("model", "world", "index"), _params())
def test_feature_matches_one_device(model: str, world: int, index: int, comfy_root: str) -> None:
    cases, res, _ = _results(model, world, comfy_root)
    case = cases[index]
    ref = res[0]["reference"][case.reference_key]
    plain = res[0]["plain"][(case.size, case.denoise)]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    assert float(np.abs(ref - plain).max()) > 1e-2, f"{case.feature} does not change the one-device result"
    if case.feature == "control_wrong_rows":
        assert min(diffs) > 1e-3, f"negative control was not caught: diffs {diffs}"
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
    spread = [float(np.abs(r["parallel"][index] - res[0]["parallel"][index]).max()) for r in res]
    assert max(spread) == 0.0, f"{case}: ranks disagree with rank 0 by {spread}"
