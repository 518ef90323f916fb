"""The CUDA-graph wrapper inside ComfyUI's real sampler (tiny models, CPU stand-in backend).

``ReplayBackend`` replays a "graph" by running the captured call again on the captured input tensors,
so these tests prove what the CPU can: every denoiser call after the first two is served from the
captured inputs with the step's values copied in, and the latent equals eager sampling exactly.
Real ``torch.cuda.graph`` capture is compared with eager sampling in the GPU tier
(tests/gpu/test_graphs_bf16.py).
"""

from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.comfy


def _request(tiny, sampler: str, cfg: float, steps: int = 4):
    import comfy.sample

    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    side = max(256, 8 * tiny.min_latent)
    latent = empty_latent(tiny, side, side)["samples"]
    return SampleRequest(noise=comfy.sample.prepare_noise(latent, 7), latent_image=latent,
                         positive=conditioning_for(tiny, seed=1, width=side, height=side),
                         negative=conditioning_for(tiny, seed=2, width=side, height=side),
                         seed=7, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple")


def _patcher(tiny):
    from xdit_multigpu.config import LoaderKind, LoadSpec
    from xdit_multigpu.worker import comfy_runtime

    return comfy_runtime.load_diffusion_model(
        LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json))


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart_sigma", "sdxl"])
@pytest.mark.parametrize("sampler,cfg", [("euler", 1.0), ("dpmpp_2m", 3.0)])
def test_replayed_sampling_equals_eager(tiny_models, family, sampler, cfg):
    import torch

    from xdit_multigpu.config import CudaGraphs
    from xdit_multigpu.testing.graph_backend import ReplayBackend
    from xdit_multigpu.worker import comfy_runtime
    from xdit_multigpu.worker.graphs import install

    tiny = tiny_models[family]
    patcher, req = _patcher(tiny), _request(tiny, sampler, cfg)
    eager = comfy_runtime.run_sampler(patcher, req)
    clone, stats = install(patcher, CudaGraphs.AUTO, ReplayBackend())
    graphed = comfy_runtime.run_sampler(clone, req)
    assert stats.off_reason is None and stats.captured >= 1, stats
    assert stats.replayed >= req.steps - 2, stats  # one call per step at least; first two: warm-up, capture
    assert torch.equal(graphed, eager), (graphed - eager).abs().max()


def test_stale_inputs_would_be_caught(tiny_models, monkeypatch):
    """Negative control: a replay that skips copying the step's values gives a different latent."""
    import torch

    from xdit_multigpu.config import CudaGraphs
    from xdit_multigpu.testing.graph_backend import ReplayBackend
    from xdit_multigpu.worker import comfy_runtime, graphs

    tiny = tiny_models["flux"]
    patcher, req = _patcher(tiny), _request(tiny, "euler", 1.0, steps=5)
    eager = comfy_runtime.run_sampler(patcher, req)

    def stale_replay(self, tensors):
        self.graph.replay()
        return self.output.clone()

    monkeypatch.setattr(graphs._Graph, "replay", stale_replay)
    clone, stats = graphs.install(patcher, CudaGraphs.AUTO, ReplayBackend())
    graphed = comfy_runtime.run_sampler(clone, req)
    assert stats.replayed >= 2 and not torch.equal(graphed, eager)


def test_other_nodes_code_keeps_auto_eager_and_on_replays_it(tiny_models):
    import comfy.patcher_extension
    import torch

    from xdit_multigpu.config import CudaGraphs
    from xdit_multigpu.testing.graph_backend import ReplayBackend
    from xdit_multigpu.worker import comfy_runtime
    from xdit_multigpu.worker.graphs import install

    tiny = tiny_models["sd3"]
    patcher, req = _patcher(tiny), _request(tiny, "euler", 3.0)
    eager = comfy_runtime.run_sampler(patcher, req)
    calls = []

    def other_node_wrapper(executor, *args, **kwargs):  # e.g. another custom node's APPLY_MODEL wrapper
        calls.append(1)
        return executor(*args, **kwargs)

    other = patcher.clone()
    other.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_node", other_node_wrapper)
    auto, stats = install(other, CudaGraphs.AUTO, ReplayBackend())
    assert torch.equal(comfy_runtime.run_sampler(auto, req), eager)
    assert stats.captured == 0 and "other_node_wrapper" in stats.off_reason
    forced, stats = install(other, CudaGraphs.ON, ReplayBackend())
    assert torch.equal(comfy_runtime.run_sampler(forced, req), eager)
    assert stats.replayed >= 2 and len(calls) == 2 * req.steps  # outer wrapper still runs every call, eagerly
    object_patched = patcher.clone()
    object_patched.add_object_patch("diffusion_model.some_forward", lambda *a: a)
    assert "object patch" in install(object_patched, CudaGraphs.AUTO, ReplayBackend())[1].off_reason


def test_auto_only_for_families_verified_on_gpus(tiny_models):
    import torch

    from xdit_multigpu.config import CudaGraphs
    from xdit_multigpu.models import lookup
    from xdit_multigpu.testing.graph_backend import ReplayBackend
    from xdit_multigpu.worker import comfy_runtime
    from xdit_multigpu.worker.graphs import install

    tiny = tiny_models["hunyuan_dit"]
    family = lookup(tiny.config_class)
    assert not family.cuda_graphs and lookup("Flux").cuda_graphs
    patcher, req = _patcher(tiny), _request(tiny, "euler", 3.0)
    same, stats = install(patcher, CudaGraphs.AUTO, ReplayBackend(), family=family)
    assert same is patcher and "capture refuses" in stats.off_reason  # GPU run 5: HunyuanDiT's forward
    unverified = dataclasses.replace(family, cuda_graphs_refused="")  # a family no GPU run has tried yet
    same, stats = install(patcher, CudaGraphs.AUTO, ReplayBackend(), family=unverified)
    assert same is patcher and "not yet verified" in stats.off_reason
    forced, stats = install(patcher, CudaGraphs.ON, ReplayBackend(), family=family)
    assert torch.equal(comfy_runtime.run_sampler(forced, req), comfy_runtime.run_sampler(patcher, req))
    assert stats.replayed >= req.steps - 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_later_request_warm_starts_and_still_equals_eager(tiny_models, family):
    """Two requests sharing the worker's ``WarmShapes``: the second (another seed and step count, so
    another full signature of the same shape) captures its first denoiser call (no eager warm-up), and
    both latents equal eager sampling exactly."""
    import comfy.sample
    import torch

    from xdit_multigpu.config import CudaGraphs
    from xdit_multigpu.testing.graph_backend import ReplayBackend
    from xdit_multigpu.worker import comfy_runtime
    from xdit_multigpu.worker.graphs import WarmShapes, install

    tiny = tiny_models[family]
    patcher, req = _patcher(tiny), _request(tiny, "dpmpp_2m", 3.0)
    eager = comfy_runtime.run_sampler(patcher, req)
    warm = WarmShapes()
    stats = []
    for seed in (7, 8):
        clone, s = install(patcher, CudaGraphs.AUTO, ReplayBackend(), warm=warm)
        this = dataclasses.replace(req, seed=seed, noise=comfy.sample.prepare_noise(req.latent_image, seed),
                                   steps=req.steps + seed - 7)
        graphed = comfy_runtime.run_sampler(clone, this)
        reference = eager if seed == 7 else comfy_runtime.run_sampler(patcher, this)
        assert torch.equal(graphed, reference), (graphed - reference).abs().max()
        assert seed == 7 or not torch.equal(graphed, eager)  # a different image: stale inputs would show
        stats.append(s)
    assert (stats[0].eager, stats[0].warm_starts) == (1, 0), stats[0]
    assert (stats[1].eager, stats[1].warm_starts, stats[1].captured) == (0, 1, 1), stats[1]
    assert stats[1].replayed == stats[0].replayed + 2 and not stats[1].warm_start_failed, stats[1]  # one more step
