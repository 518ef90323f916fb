"""The optional xfuser attention backend (``XDIT_ATTENTION_BACKEND=xfuser``) == one device, on CPU ranks.

Same harness as ``test_parallel_matches_one_device``: tiny fp32 Flux (joint text, RoPE) and SD3 (MMDiT),
Ulysses, Ring, Ulysses x Ring and CFG x USP at 2 and 4 ranks, with xfuser's ``xFuserLongContextAttention``
doing the all-to-alls, the ring and the joint-text handling (our LSE kernel runs the blocks on CPU). Each
case must also show that xfuser really ran (its call counter moved) and the negative control (attention
left local) must fail the tolerance.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _cases import Case, run_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("xfuser") is None, reason="xfuser is not installed (optional)"),
]

TOL = 1e-4
PLANS = {2: [(1, 2, 1), (1, 1, 2)], 4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)]}


def _cases(world: int) -> list[Case]:
    sp = (1, 2, 1) if world == 2 else (1, 2, 2)
    # The default backend first on the same degrees: the groups are reused (as in a worker) and the
    # backend must still switch with the request's plan.
    cases = [Case(PLANS[world][0])]
    cases += [Case(p, sampler=s, attention="xfuser") for p in PLANS[world] for s in ("euler", "dpmpp_2m")]
    return cases + [Case(sp, variant="neg_text", attention="xfuser"), Case(sp, variant="no_override", attention="xfuser")]


@functools.lru_cache(maxsize=None)
def _results(model: str, world: int, comfy_path: str) -> tuple[list[Case], list[dict[str, Any]]]:
    cases = _cases(world)
    return cases, run_ranks(run_cases, world, (model, cases), comfy_path, timeout_s=600)


CASES = [(m, w, i) for m in ("flux", "sd3") for w in (2, 4) for i in range(len(_cases(w)))]


@pytest.mark.parametrize(("model", "world", "index"), CASES,
                         ids=[f"{m}-w{w}-{_cases(w)[i].plan}-{_cases(w)[i].attention}-{_cases(w)[i].sampler}{_cases(w)[i].variant}"
                              for m, w, i in CASES])
def test_xfuser_backend_matches_one_device(model: str, world: int, index: int, comfy_root: str) -> None:
    cases, res = _results(model, world, comfy_root)
    case = cases[index]
    ref = res[0]["reference"][case.reference_key]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    if case.variant == "no_override":
        assert min(diffs) > 1e-2, f"negative control was not caught: diffs {diffs}"
        return
    if case.attention != "xfuser":
        assert all(r["xfuser_calls"][index] == 0 for r in res)
    else:
        assert all(r["xfuser_calls"][index] > 0 for r in res), "xfuser's attention did not run"
    assert not any(r["fallback"][index] for r in res), "the exact all-gather path ran instead"
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
