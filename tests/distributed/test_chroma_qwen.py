"""Parallel sampling == one-device sampling for Chroma, Chroma Radiance and Qwen-Image (tiny fp32, CPU
gloo ranks).

Tiny models: explicit unet_config through ComfyUI's ``supported_models.Chroma`` / ``QwenImage`` (ComfyUI's
detection hard-codes 3072-wide layouts; see ``xdit_multigpu.testing.tiny_models_chroma_qwen``).
One spawn per (family, ranks) runs every case; rank 0 computes the one-device references afterwards
in the same process (``_cases_chroma_qwen``). Per family and rank count (2 and 4):

* every declared strategy x euler / dpmpp_2m with CFG 2.5: Ulysses, Ring, CFG (2 ranks); Ulysses,
  Ring, Ulysses x Ring, CFG x Ulysses, CFG x Ring (4 ranks) -- the planner's Hybrid choices among them;
* uneven shards (18 x 18 latent: 81 tokens, exact all-gather path) on Ulysses(-x-Ring) and on Ring;
  cond / uncond of different text lengths; CFG scale 1 (one active cond);
* Chroma (latent) and Chroma Radiance (pixel space, NeRF head run on the gathered tokens): a
  full-square attention mask; Qwen-Image: Qwen-Image-Edit reference latents (even, and 15
  reference tokens on the positive only) and a Qwen-Image ControlNet (alone, and with the 15 reference
  tokens, so the residuals' end at token L falls inside a shard);
* text rows sharded with the image when T divides (default) and replicated (``XDIT_SHARD_TEXT=0``);
  each case checks which of the two ran;
* negative controls that must differ by > 1e-2: attention left local (``no_override``) and every rank
  given sp rank 0's RoPE rows (``wrong_rope``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _cases import Case  # noqa: E402
from _cases_chroma_qwen import NEGATIVE, image_tokens, reference_key, run_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

from xdit_multigpu.config import ParallelStrategy  # noqa: E402
from xdit_multigpu.engine import planner  # noqa: E402
from xdit_multigpu.models import families  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-4
HEADS = 4  # both tiny models
SAMPLERS = ("euler", "dpmpp_2m")
PLANS = {2: [(1, 2, 1), (1, 1, 2), (2, 1, 1)], 4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)]}
SPECS = {"chroma": families.CHROMA, "chroma_radiance": families.CHROMA, "qwen_image": families.QWEN_IMAGE}
EXTRA = {"chroma": ("mask",), "chroma_radiance": ("mask",), "qwen_image": ("ref", "control", "control_ref", "ref_odd")}


def _cases(family: str, ranks: int) -> list[Case]:
    sp_plan = (1, 2, 1) if ranks == 2 else (1, 2, 2)
    cfg_plan = (2, 1, 1) if ranks == 2 else (2, 2, 1)
    cases = [Case(p, sampler=s, steps=2 if s == "euler" else 3) for p in PLANS[ranks] for s in SAMPLERS]
    cases += [
        Case(sp_plan, size=18),  # 81 tokens: uneven shards
        Case((1, 1, ranks), size=18, sampler="dpmpp_2m", steps=3),
        Case(cfg_plan, variant="neg_text"),
        Case(cfg_plan, cfg_scale=1.0),
        *(Case(sp_plan, variant=v) for v in EXTRA[family]),
        Case((1, 1, ranks), variant=EXTRA[family][-1]),
        Case(sp_plan, variant="text_replicated"),
        Case(sp_plan, variant="no_override"),
        Case(sp_plan, variant="wrong_rope"),
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
    for family in SPECS:
        for ranks in (2, 4):
            for i, c in enumerate(_cases(family, ranks)):
                cid = (f"{family}-w{ranks}-cfg{c.plan[0]}u{c.plan[1]}r{c.plan[2]}-{c.sampler}-s{c.size}"
                       f"-c{c.cfg_scale}{'-' + c.variant if c.variant else ''}")
                out.append(pytest.param(family, ranks, i, id=cid))
    return out


@pytest.mark.parametrize(("family", "ranks", "index"), _params())
def test_matches_one_device(family: str, ranks: int, index: int, comfy_root: str) -> None:
    cases, res, _ = _results(family, ranks, comfy_root)
    case = cases[index]
    assert all(r["spec"] == SPECS[family].name for r in res)
    ref = res[0]["reference"][reference_key(case)]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    spread = [float(np.abs(r["parallel"][index] - res[0]["parallel"][index]).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    if case.variant in NEGATIVE:
        assert min(diffs) > 1e-2, f"negative control {case.variant} was not caught: diffs {diffs}"
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
    if case.variant and reference_key(case)[-1]:  # the feature changes the one-device result
        plain = res[0]["reference"].get(reference_key(dataclasses.replace(case, variant="")))
        assert plain is None or float(np.abs(plain - ref).max()) > 1e-2, f"{case.variant} has no effect"
    sp = case.plan[1] * case.plan[2]
    if sp > 1:  # which attention path ran: USP unless the shards are uneven or a mask is set
        expect_fallback = image_tokens(case) % sp != 0 or case.variant in ("mask", "ref_odd", "control_ref")
        assert [r["fallback"][index] for r in res] == [expect_fallback] * ranks, "unexpected attention path"
    # text rows sharded (T = 8 divides) in some forward unless every image shard is uneven, a mask is set
    # or the switch is off (ref_odd / control_ref: the uncond has no reference tokens, so it is even)
    expect_text = sp > 1 and (case.size // 2) ** 2 % sp == 0 and case.variant not in ("mask", "text_replicated")
    expected = [expect_text] * ranks
    if case.variant == "neg_text" and case.plan[0] == 2:  # the uncond's CFG ranks see T = 5 only
        expected = [expect_text] * sp + [False] * sp
    assert [r["text_sharded"][index] for r in res] == expected, "unexpected text split"
    assert max(spread) == 0.0, f"{case}: ranks disagree with rank 0 by {spread}"


@pytest.mark.parametrize("family", list(SPECS))
def test_hybrid_plans_are_among_the_cases(family: str) -> None:
    """What the planner's Hybrid strategy gives each family on 2 and 4 devices is run above."""
    spec = SPECS[family]
    for devices in (2, 4):
        p = planner.plan(ParallelStrategy.HYBRID, devices, True, HEADS, spec.axes)
        assert (p.cfg, p.ulysses, p.ring) in {c.plan for c in _cases(family, p.world_size)}


@pytest.mark.parametrize("family", list(SPECS))
def test_original_patcher_untouched(family: str, comfy_root: str) -> None:
    for ranks in (2, 4):
        _, res, _ = _results(family, ranks, comfy_root)
        assert all(r["base_untouched"] for r in res)
        assert res[0]["methods_restored"]
