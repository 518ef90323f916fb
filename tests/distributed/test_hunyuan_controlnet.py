"""HunyuanDiT ControlNet under sequence parallelism == one device (tiny fp32 model, CPU gloo ranks).

ComfyUI's HunyuanDiT forward adds ``control["output"].pop()`` to the long-skip input of every block after
the middle, outside the block replace, while our stream is sharded; the residual list hands out this
rank's rows. The tiny model has 40 blocks (hidden 64) because ComfyUI's ``HunYuanControlNet`` always
emits 19 residuals, one per long skip of a 40-block model. ``control_wrong_rows`` (every rank takes the
first rows) is the negative control.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _conditioning_cases import FeatureCase, case_id, run_feature_cases  # noqa: E402
from _harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed
TOL = 1e-4
MODEL = "hunyuan_dit_cn"


def _cases(world: int) -> list[FeatureCase]:
    plans = [(1, 2, 1), (1, 1, 2), (2, 1, 1)] if world == 2 else [(1, 2, 2), (2, 2, 1)]
    cases = [FeatureCase(p, "control") for p in plans]
    return cases + [FeatureCase(plans[0], "control", size=18), FeatureCase(plans[0], "control_wrong_rows")]


@functools.lru_cache(maxsize=None)
def _results(world: int, comfy_path: str) -> tuple[list[FeatureCase], list[dict[str, Any]]]:
    cases = _cases(world)
    return cases, run_ranks(run_feature_cases, world, (MODEL, cases), comfy_path, timeout_s=900)


@pytest.mark.parametrize(("world", "index"), [pytest.param(w, i, id=case_id(MODEL, w, c))
                                              for w in (2, 4) for i, c in enumerate(_cases(w))])
def test_hunyuan_controlnet_matches_one_device(world: int, index: int, comfy_root: str) -> None:
    cases, res = _results(world, comfy_root)
    case = cases[index]
    ref = res[0]["reference"][case.reference_key]
    plain = res[0]["plain"][(case.size, case.denoise)]
    diffs = [float(np.abs(r["parallel"][index] - ref).max()) for r in res]
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1.0, "reference is degenerate"
    assert float(np.abs(ref - plain).max()) > 1e-2, "the ControlNet does not change the one-device result"
    if case.feature == "control_wrong_rows":
        assert min(diffs) > 1e-3, f"negative control was not caught: diffs {diffs}"
        return
    assert max(diffs) <= TOL, f"{case}: max |parallel - one device| per rank {diffs} > {TOL}"
