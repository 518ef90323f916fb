"""Parallel sampling == one-device sampling for Lumina 2, Z-Image, Wan 2.1 T2V and Wan 2.2 T2V (tiny fp32,
CPU gloo ranks, euler and dpmpp_2m with CFG 2.5).

Same harness as ``test_model_coverage.py``. Models: explicit unet_configs through ComfyUI's own
``supported_models`` classes (``_cases_lumina_wan``; detection maps Z-Image only at hidden 3840 and Wan
only with 128-wide heads). Plans per rank count: the planner's Hybrid choice and every declared
strategy (2 ranks: Ulysses 2, Ring 2, CFG 2; 4 ranks: Ulysses 4, Ring 4, Ulysses 2 x Ring 2,
CFG 2 x Ulysses 2, CFG 2 x Ring 2). Extra cases per rank count:

* an uneven token count (Lumina 2: 9 x 9 = 81 image tokens; Wan: 3 frames x 3 x 3 = 27 video tokens)
  on Ulysses and on Ring (exact all-gather path). Z-Image pads its 81 tokens to 96 with learned pad
  tokens, which are sharded with the rest (even shards, USP path);
* a shorter negative prompt (two text lengths in one sampling; Lumina 2's carries a caption mask for the
  unsharded caption refiner);
* Wan 2.2: a TI2V-style noise mask (frame 0 kept), so the timestep and ``e0`` are per frame and must be
  spread over the tokens before slicing;
* Wan: 8 video tokens per rank and 8 text tokens (the override cannot tell cross- from self-attention
  by shape); negative control: without the ``cross_attn`` object patch twice as many attention calls
  take the sequence path;
* CFG 2 with cfg 1.0 (one active cond), and a negative control (sharding without the distributed
  attention must differ from one device by > 1e-2).
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
from _cases_lumina_wan import VCase, image_tokens, run_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

from xdit_multigpu.config import ParallelStrategy  # noqa: E402
from xdit_multigpu.engine import planner  # noqa: E402
from xdit_multigpu.models import families  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-4
SAMPLERS = ("euler", "dpmpp_2m")
HEADS = 4  # every tiny model here
# family -> (registered spec name, latent side, frames, uneven side, uneven frames)
FAMILIES: dict[str, tuple[str, int, int, int, int]] = {
    "lumina2": ("lumina2", 16, 1, 18, 1),
    "zimage": ("lumina2", 16, 1, 18, 1),
    "wan21": ("wan", 8, 2, 6, 3),
    "wan22": ("wan", 8, 2, 6, 3),
}
SPECS = {"lumina2": families.LUMINA2, "wan": families.WAN_T2V}
SP_PLANS = {2: [(1, 2, 1), (1, 1, 2), (2, 1, 1)], 4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)]}


def _cases(family: str, ranks: int) -> list[VCase]:
    spec = SPECS[FAMILIES[family][0]]
    _, size, frames, odd, odd_frames = FAMILIES[family]
    hybrid = planner.plan(ParallelStrategy.HYBRID, ranks, True, HEADS, spec.axes)
    plans = list(dict.fromkeys([(hybrid.cfg, hybrid.ulysses, hybrid.ring), *SP_PLANS[ranks]]))
    cases = [VCase(p, sampler=s, size=size, frames=frames, steps=2 if s == "euler" else 3)
             for p in plans for s in SAMPLERS]
    sp_plan = (1, 2, 1) if ranks == 2 else (1, 2, 2)
    cases += [
        VCase(sp_plan, size=odd, frames=odd_frames),  # uneven token count
        VCase((1, 1, ranks), size=odd, frames=odd_frames, sampler="dpmpp_2m", steps=3),
        VCase((2, 1, ranks // 2) if ranks == 4 else sp_plan, size=size, frames=frames, variant="neg_text"),
        VCase(sp_plan, size=size, frames=frames, variant="no_override"),  # negative control
    ]
    if ranks == 2:
        cases.append(VCase((2, 1, 1), size=size, frames=frames, cfg_scale=1.0))  # one active cond
    if family.startswith("wan") and ranks == 2:  # 16 video tokens: 8 per rank == 8 text tokens
        cases.append(VCase((1, 2, 1), size=8, frames=1, variant="text_eq_local"))
        cases.append(VCase((1, 2, 1), size=8, frames=1, variant="no_cross_patch"))
    if family == "wan22":
        cases.append(VCase(sp_plan, size=size, frames=frames, variant="frame_mask"))
        cases.append(VCase(sp_plan, size=odd, frames=odd_frames, variant="frame_mask"))
    return cases


@functools.lru_cache(maxsize=None)
def _results(family: str, ranks: int, comfy_path: str) -> tuple[list[VCase], list[dict[str, Any]], float]:
    cases = _cases(family, ranks)
    t0 = time.perf_counter()
    res = run_ranks(run_cases, ranks, (family, cases), comfy_path, timeout_s=900)
    return cases, res, time.perf_counter() - t0


def _params() -> list[Any]:
    out = []
    for family in FAMILIES:
        for ranks in (2, 4):
            for i, c in enumerate(_cases(family, ranks)):
                cid = (f"{family}-w{ranks}-cfg{c.plan[0]}u{c.plan[1]}r{c.plan[2]}-{c.sampler}"
                       f"-s{c.size}x{c.frames}-c{c.cfg_scale}{'-' + c.variant if c.variant else ''}")
                out.append(pytest.param(family, ranks, i, id=cid))
    return out


@pytest.mark.parametrize(("family", "ranks", "index"), _params())
def test_matches_one_device(family: str, ranks: int, index: int, comfy_root: str) -> None:
    cases, res, _ = _results(family, ranks, comfy_root)
    case = cases[index]
    assert res[0]["spec"] == FAMILIES[family][0]
    ref = res[0]["reference"][case.reference_key]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    spread = [float(np.abs(r["parallel"][index] - res[0]["parallel"][index]).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    assert res[0]["methods_restored"], "the one-device reference ran with an object patch of a parallel clone"
    if case.variant == "no_override":
        assert min(diffs) > 1e-2, f"negative control was not caught: diffs {diffs}"
        return
    if case.variant == "no_cross_patch":
        # Without the cross_attn object patch a rank holding as many video tokens as the text has sends
        # cross-attention through the sequence path too (2 calls per block instead of 1). Numerically that
        # stays equal here (all ranks hold the same text: duplicated keys), but with uneven shards the ranks
        # would run different collectives; the count is what the patch guarantees.
        patched = cases.index(VCase((1, 2, 1), size=8, frames=1, variant="text_eq_local"))
        assert [r["seq_calls"][index] for r in res] == [2 * r["seq_calls"][patched] for r in res]
        assert res[0]["seq_calls"][patched] > 0
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
    sp = case.plan[1] * case.plan[2]
    if sp > 1:  # USP unless the shards are uneven
        expect_fallback = image_tokens(family, case) % sp != 0
        assert [r["fallback"][index] for r in res] == [expect_fallback] * ranks, "unexpected attention path"
        # NextDiT shards the caption too when the image shards are even (T = 8 here, Z-Image pads to 32);
        # Wan has no text in its self-attention
        expect_text = FAMILIES[family][0] == "lumina2" and not expect_fallback
        flags = [r["text_sharded"][index] for r in res]
        if family == "lumina2" and expect_text and case.variant == "neg_text" and case.plan[0] > 1:
            # CFG: the half holding the 5-token negative keeps it whole (Z-Image pads both to 32)
            assert sorted(flags) == [False] * (ranks // 2) + [True] * (ranks // 2), flags
        else:
            assert flags == [expect_text] * ranks, "unexpected text sharding"
    assert max(spread) == 0.0, f"{case}: ranks disagree with rank 0 by {spread}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_original_patcher_untouched(family: str, comfy_root: str) -> None:
    for ranks in (2, 4):
        _, res, _ = _results(family, ranks, comfy_root)
        assert all(r["base_untouched"] for r in res)


def test_uneven_cases_are_uneven() -> None:
    """The 'uneven' cases really do not divide (else they would not test the uneven path)."""
    for family in ("lumina2", "wan21", "wan22"):
        _, _, _, odd, odd_frames = FAMILIES[family]
        tokens = image_tokens(family, VCase((1, 2, 1), size=odd, frames=odd_frames))
        assert tokens % 2 and tokens % 4, (family, tokens)
    assert image_tokens("zimage", VCase((1, 2, 1), size=18)) == 96  # 81 real + 15 pad tokens
