"""The sequence-parallel fast paths on CPU ranks (gloo): fused Ulysses and sharded joint-attention text.

* ``FusedUlysses`` alone == full attention, in both of ComfyUI's layouts, batch 2, 2 and 4 ranks.
* Tiny Flux and SD3 (text length divisible by the ranks, so the text is sharded) under Ulysses 2 and
  Ring 2 on 2 ranks == one device (<= 1e-4), with every A/B switch (``XDIT_SHARD_TEXT``,
  ``XDIT_FUSED_ULYSSES``); the test also proves which path ran (fused calls, text sharded or not), so a
  silently disabled fast path fails it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fast_paths import PLANS, SWITCHES, fused_rank, model_rank  # noqa: E402
from _harness import run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
TOL = 1e-4


@pytest.mark.parametrize("world", [2, 4])
def test_fused_ulysses_equals_full_attention(world: int, comfy_root: str) -> None:
    """12 heads: 6 per rank on 2 ranks (chunks 1 / 2 / 3), 3 on 4 ranks (1 / 3; 2 falls back to 1).
    Pipelined head chunks give the one-chunk result bit for bit (heads are independent)."""
    chunks = (1, 2, 3)
    res = run_ranks(fused_rank, world, chunks, comfy_root, timeout_s=300)
    for r in res:
        for c in chunks:
            assert r[c]["bhsd"] <= 1e-5 and r[c]["bsd"] <= 1e-5, (c, r[c]["bhsd"], r[c]["bsd"])
            assert r[c]["calls"] == 2
            assert r[c]["chunks"] == (c if (12 // world) % c == 0 else 1)
            for key in ("bhsd_out", "bsd_out"):
                assert np.array_equal(r[c][key], r[1][key]), (c, key)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_fast_paths_equal_one_device(name: str, comfy_root: str) -> None:
    runs = [(p, env) for p in PLANS for env in SWITCHES]
    res = run_ranks(model_rank, 2, (name, runs), comfy_root, timeout_s=800)
    ref = res[0]["reference"]
    for i, (plan, env) in enumerate(runs):
        got = [r["runs"][i] for r in res]
        diff = max(float(np.abs(g["latent"] - ref).max()) for g in got)
        assert diff <= TOL, f"{name} {plan} {env}: max diff {diff}"
        g = got[0]
        assert g["forwards"] > 0
        want_sharded = env.get("XDIT_SHARD_TEXT") != "0"
        assert g["sharded"] == (g["forwards"] if want_sharded else 0), (plan, env, g["sharded"], g["forwards"])
        # SD3.5's x-block attends over the image alone: uniform even with replicated text
        want_fused = plan[2] == 1 and env.get("XDIT_FUSED_ULYSSES") != "0" and (want_sharded or name == "sd3")
        assert (g["fused"] > 0) == want_fused, (plan, env, g["fused"])
