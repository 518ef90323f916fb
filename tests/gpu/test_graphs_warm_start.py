"""CUDA graph warm start on GPUs: a later request captures its first denoiser call (no eager warm-up).

Per plan (tiny Flux and SD3, bf16; 1 GPU, Ulysses 2, Ring 2, CFG 2): request A runs with graphs (its
first call eager, the second captured); request B, a new seed and step count in the same pool, must capture its first
call (rank 0's counters: no eager call, one warm start, no failed capture) and its latent must equal
request B sampled eagerly (``XDIT_CUDA_GRAPHS=off``) within the bf16 bound of the graphs test.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from tests.conftest import COMFYUI_PATH

pytestmark = pytest.mark.gpu
REL_L2 = 1e-2
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 GPUs")
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(COMFYUI_PATH, cpu=False)
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    yield write_tiny_models(str(tmp_path_factory.mktemp("tiny")), families=["flux", "sd3"])
    out = os.environ.get("OUT")
    if out and RESULTS:
        with open(os.path.join(out, "graphs_warm_start.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def _run(engine, spec, req, model_spec, heads, graphs: str):
    os.environ["XDIT_CUDA_GRAPHS"] = graphs
    try:
        out = engine.sample(spec, req, model_spec, heads, req.cfg != 1.0, None)
    finally:
        os.environ.pop("XDIT_CUDA_GRAPHS", None)
    assert out.fallback_reason is None, out.fallback_reason
    stats = engine.pool(spec).executor.collective_rpc("bench_stats", timeout=60)[0]
    return out, stats.get("graphs")


# (devices, cfg, strategy, ulysses_degree): one GPU; Ulysses 2; Ring 2 (ulysses_degree 1); CFG 2
PLANS = [(1, 1.0, "Hybrid", 0), (2, 1.0, "USP", 0), (2, 1.0, "USP", 1), (2, 4.0, "CFG", 0)]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_later_request_warm_starts_and_equals_eager(tiny, family):
    import comfy.sample

    from xdit_multigpu.bench.engine_rows import make_engine
    from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    t = tiny[family]
    latent = empty_latent(t, 512, 512)["samples"]
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, t.path, unet_config_json=t.unet_config_json)
    model_spec = lookup(t.config_class)
    base = SampleRequest(noise=comfy.sample.prepare_noise(latent, 5), latent_image=latent,
                         positive=conditioning_for(t, seed=1, width=512, height=512),
                         negative=conditioning_for(t, seed=2, width=512, height=512), seed=5, steps=6, cfg=1.0,
                         sampler_name="euler", scheduler="simple")
    engine = make_engine()
    try:
        for n, cfg, strategy, degree in PLANS:
            spec = DispatcherSpec(load, DeviceSet.parse(",".join(map(str, range(n))), n), ParallelStrategy(strategy),
                                  family=model_spec.name, ulysses_degree=degree)
            first = dataclasses.replace(base, cfg=cfg)
            # another seed and step count: another full signature (ComfyUI's sample_sigmas), the same shape
            later = dataclasses.replace(first, seed=6, noise=comfy.sample.prepare_noise(latent, 6), steps=7)
            _, g_first = _run(engine, spec, first, model_spec, t.heads, "on")
            graphed, g_later = _run(engine, spec, later, model_spec, t.heads, "on")
            eager, _ = _run(engine, spec, later, model_spec, t.heads, "off")
            a, b = graphed.latent.float(), eager.latent.float()
            rel = float((a - b).norm() / b.norm())
            row = {"family": family, "gpus": n, "cfg": cfg, "plan": graphed.plan.describe(), "rel_l2": rel,
                   "max_abs": float((a - b).abs().max()), "graphs_first": g_first, "graphs_later": g_later}
            RESULTS.append(row)
            print(json.dumps(row), flush=True)
            assert g_first["eager"] >= 1 and not g_first.get("warm_starts"), row  # a new pool: warm-up first
            assert g_later["eager"] == 0 and g_later["warm_starts"] >= 1, row
            assert not g_later["failed"] and not g_later["warm_start_failed"], row
            assert g_later["replayed"] >= later.steps - 1, row
            assert rel <= REL_L2, row
    finally:
        engine.release_all(stop_ray=False)
