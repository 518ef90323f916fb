"""Parallel sampling == one-device sampling, on CPU ranks (gloo), for tiny fp32 Flux and SD3.

One spawn per (model, world size) runs every case of that world (plans x samplers x denoise + edge
cases) and rank 0 computes the one-device references in the same process afterwards. Each case is then
checked as its own test: max |parallel - reference| <= 1e-4 on every rank, and every rank's latent is
bit-identical to rank 0's. The ``no_override`` negative control (sequence sharded, attention left
local) must *fail* the tolerance, proving the comparison can catch a broken attention.
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

pytestmark = pytest.mark.distributed

TOL = 1e-4
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "uni_pc")
DENOISE = (1.0, 0.6)
PLANS = {
    2: [(1, 2, 1), (1, 1, 2), (2, 1, 1)],  # Ulysses, Ring, CFG
    4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)],  # + Ulysses x Ring, CFG x USP
}


def _edge_cases(model: str, world: int) -> list[Case]:
    sp_plan = (1, 2, 1) if world == 2 else (1, 2, 2)
    cfg_sp = (2, 1, 1) if world == 2 else (2, 2, 1)
    cases = [
        Case(sp_plan, size=18),  # 81 image tokens: uneven shards -> exact all-gather path
        Case(cfg_sp, size=18),
        Case(sp_plan, variant="neg_text"),  # cond / uncond with different text lengths (separate forwards)
        Case(cfg_sp, cfg_scale=1.0),  # one active cond: CFG ranks compute locally
        Case(sp_plan, sampler="dpmpp_2m", steps=3),
        Case(sp_plan, variant="no_override"),  # negative control
    ]
    if world == 2:
        cases.append(Case((1, 1, 2), size=18))
    if model == "flux":
        cases += [Case(sp_plan, variant="mask"), Case((1, 1, world), variant="mask")]
    return cases


def _cases(model: str, world: int) -> list[Case]:
    matrix = [Case(p, sampler=s, denoise=d) for p in PLANS[world] for s in SAMPLERS for d in DENOISE]
    return matrix + _edge_cases(model, world)


@functools.lru_cache(maxsize=None)
def _results(model: str, world: int, comfy_path: str) -> tuple[list[Case], list[dict[str, Any]], float]:
    cases = _cases(model, world)
    t0 = time.perf_counter()
    res = run_ranks(run_cases, world, (model, cases), comfy_path, timeout_s=900)
    return cases, res, time.perf_counter() - t0


def _ids(model: str, world: int) -> list[str]:
    return [f"{model}-w{world}-cfg{c.plan[0]}u{c.plan[1]}r{c.plan[2]}-{c.sampler}-d{c.denoise}-s{c.size}"
            f"-c{c.cfg_scale}-n{c.steps}{'-' + c.variant if c.variant else ''}" for c in _cases(model, world)]


def _check(model: str, world: int, index: int, comfy_root: str) -> None:
    cases, res, _ = _results(model, world, comfy_root)
    case = cases[index]
    ref = res[0]["reference"][case.reference_key]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    spread = [float(np.abs(r["parallel"][index] - res[0]["parallel"][index]).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    if case.variant == "no_override":
        assert min(diffs) > 1e-2, f"negative control was not caught: diffs {diffs}"
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
    if case.plan[1] * case.plan[2] > 1:  # which attention path ran: USP unless uneven shards or a mask
        expect_fallback = (case.size // 2) ** 2 % (case.plan[1] * case.plan[2]) != 0 or case.variant == "mask"
        assert [r["fallback"][index] for r in res] == [expect_fallback] * world, "unexpected attention path"
    assert max(spread) == 0.0, f"{case}: ranks disagree with rank 0 by {spread}"


@pytest.mark.parametrize("index", range(len(_cases("flux", 2))), ids=_ids("flux", 2))
def test_flux_2_ranks(index: int, comfy_root: str) -> None:
    _check("flux", 2, index, comfy_root)


@pytest.mark.parametrize("index", range(len(_cases("flux", 4))), ids=_ids("flux", 4))
def test_flux_4_ranks(index: int, comfy_root: str) -> None:
    _check("flux", 4, index, comfy_root)


@pytest.mark.parametrize("index", range(len(_cases("sd3", 2))), ids=_ids("sd3", 2))
def test_sd3_2_ranks(index: int, comfy_root: str) -> None:
    _check("sd3", 2, index, comfy_root)


@pytest.mark.parametrize("index", range(len(_cases("sd3", 4))), ids=_ids("sd3", 4))
def test_sd3_4_ranks(index: int, comfy_root: str) -> None:
    _check("sd3", 4, index, comfy_root)


@pytest.mark.parametrize(("model", "world"), [("flux", 2), ("flux", 4), ("sd3", 2), ("sd3", 4)])
def test_original_patcher_untouched(model: str, world: int, comfy_root: str) -> None:
    """parallelize installs everything on a clone: the loaded patcher has no override, patch or wrapper."""
    _, res, _ = _results(model, world, comfy_root)
    assert all(r["base_untouched"] for r in res)
