"""MODEL modifications travel to the workers: the xDiT KSampler path (``sample_latent``) on 2 CPU ranks
with a LoRA from the stock ``LoraLoaderModelOnly``, ``ModelSamplingSD3`` and ``RescaleCFG`` equals the
stock one-device sampler on the same MODEL; what cannot travel falls back to one device, named.
"""

from __future__ import annotations

import os
import threading

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
pytest.importorskip("ray")
TOL = 1e-4
CPU2 = DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2")
ARGS = dict(seed=7, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple", denoise=1.0)


@pytest.fixture(scope="module")
def sd3(comfy_root, tmp_path_factory):
    """(tiny, LoadSpec, plain patcher from the loader, LoRA file name)."""
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    import folder_paths

    from xdit_multigpu.testing.tiny_lora import write_tiny_lora
    from xdit_multigpu.testing.tiny_models import write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    root = tmp_path_factory.mktemp("models")
    tiny = write_tiny_models(str(root), ["sd3"])["sd3"]
    write_tiny_lora(tiny.path, str(root / "loras" / "xdit_tiny_sd3_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(root / "loras"))
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path)
    return tiny, load, comfy_runtime.load_diffusion_model(load), "xdit_tiny_sd3_lora.safetensors"


@pytest.fixture(scope="module")
def engine(monkeypatch_module):
    """The process-wide engine ``sample_latent`` uses, with test timeouts; released at the end."""
    from xdit_multigpu.engine import engine as engine_mod
    from xdit_multigpu.engine.pool import Timeouts
    from xdit_multigpu.executor.cluster import shutdown_cluster

    eng = engine_mod.Engine(Timeouts(start_s=240, sample_s=240, collective_s=120, health_s=20))
    monkeypatch_module.setattr(engine_mod, "_engine", eng)
    yield eng
    eng.release_all()
    shutdown_cluster()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def flux(sd3, tmp_path_factory):
    """(tiny, LoadSpec, plain patcher, LoRA file name) for the tiny Flux (explicit config)."""
    from xdit_multigpu.testing.tiny_lora import write_tiny_lora
    from xdit_multigpu.testing.tiny_models import write_tiny_models
    from xdit_multigpu.worker import comfy_runtime

    root = tmp_path_factory.mktemp("flux")
    tiny = write_tiny_models(str(root), ["flux"])["flux"]
    lora_dir = os.path.dirname(os.path.dirname(sd3[0].path)) + "/loras"
    write_tiny_lora(tiny.path, os.path.join(lora_dir, "xdit_tiny_flux_lora.safetensors"))
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, tiny.path, unet_config_json=tiny.unet_config_json)
    return tiny, load, comfy_runtime.load_diffusion_model(load), "xdit_tiny_flux_lora.safetensors"


def _run(tiny, model, load, strategy=ParallelStrategy.HYBRID):
    """(xDiT KSampler result on cpu:2, stock one-device latent) for ``model``."""
    from xdit_multigpu.engine.registry import remember_model
    from xdit_multigpu.engine.sampling import sample_latent, stock_sample
    from xdit_multigpu.testing.tiny_models import conditioning_for, empty_latent

    spec = DispatcherSpec(load=load, devices=CPU2, strategy=strategy, family=tiny.family)
    remember_model(model, spec)
    pos, neg = conditioning_for(tiny, seed=1), conditioning_for(tiny, seed=2)
    latent = empty_latent(tiny, 128, 128)
    a = ARGS
    ours = sample_latent(model, spec, a["seed"], a["steps"], a["cfg"], a["sampler_name"], a["scheduler"], pos, neg,
                         latent, a["denoise"])
    stock = stock_sample(model, a["seed"], a["steps"], a["cfg"], a["sampler_name"], a["scheduler"], pos, neg, latent,
                         a["denoise"])
    return ours, stock["samples"]


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _lora(model, name, strength=0.8):
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


@pytest.mark.parametrize("strategy", [ParallelStrategy.HYBRID, ParallelStrategy.USP])
def test_lora_from_stock_node_runs_parallel_and_matches_one_device(engine, sd3, strategy):
    tiny, load, plain, lora_name = sd3
    model = _lora(plain, lora_name)
    assert len(model.patches) > 0  # ComfyUI mapped the LoRA keys onto the SD3 weights
    ours, stock = _run(tiny, model, load, strategy)
    assert ours.parallel, ours.status
    assert f"with {len(model.patches)} weight patch(es)" in ours.status, ours.status
    assert _max_diff(ours.latent["samples"], stock) <= TOL
    _, plain_stock = _run(tiny, plain, load, strategy)
    assert _max_diff(stock, plain_stock) > 1e-2, "the LoRA changed nothing: ComfyUI did not apply it"


def test_lora_weights_travel_once_then_options_change(engine, sd3):
    """The same LoRA with a different ModelSampling shift: the pool keeps the weights, options change."""
    import comfy_extras.nodes_model_advanced as nma

    tiny, load, plain, lora_name = sd3
    model = _lora(plain, lora_name, 0.5)
    first, stock = _run(tiny, model, load)
    assert first.parallel and _max_diff(first.latent["samples"], stock) <= TOL
    pool = engine.pool(DispatcherSpec(load=load, devices=CPU2, strategy=ParallelStrategy.HYBRID, family="sd3"))
    assert pool.weights_key.startswith(str(model.patches_uuid))
    sent = []
    rpc = pool.executor.collective_rpc

    def spy(method, args=(), **kw):
        sent.extend(a.delta for a in args if method == "sample")
        return rpc(method, args, **kw)

    pool.executor.collective_rpc = spy
    try:
        shifted = nma.ModelSamplingSD3().patch(model, 6.0)[0]
        second, stock2 = _run(tiny, shifted, load)
    finally:
        pool.executor.collective_rpc = rpc
    assert len(sent) == 1 and sent[0].weights is None and sent[0].weights_key == pool.weights_key  # not resent
    assert second.parallel and _max_diff(second.latent["samples"], stock2) <= TOL
    assert _max_diff(stock, stock2) > 1e-3


def test_model_sampling_sd3_shift_matches_one_device(engine, sd3):
    import comfy_extras.nodes_model_advanced as nma

    tiny, load, plain, _ = sd3
    model = nma.ModelSamplingSD3().patch(plain, 9.0)[0]
    ours, stock = _run(tiny, model, load, ParallelStrategy.USP)
    assert ours.parallel, ours.status
    assert _max_diff(ours.latent["samples"], stock) <= TOL
    _, plain_stock = _run(tiny, plain, load, ParallelStrategy.USP)
    assert _max_diff(stock, plain_stock) > 1e-3


def test_flux_lora_and_model_sampling_flux_match_one_device(engine, flux):
    import comfy_extras.nodes_model_advanced as nma

    tiny, load, plain, lora_name = flux
    model = nma.ModelSamplingFlux().patch(_lora(plain, lora_name), 1.5, 0.8, 128, 128)[0]
    ours, stock = _run(tiny, model, load, ParallelStrategy.USP)
    assert ours.parallel, ours.status
    assert _max_diff(ours.latent["samples"], stock) <= TOL
    _, plain_stock = _run(tiny, plain, load, ParallelStrategy.USP)
    assert _max_diff(stock, plain_stock) > 1e-3


def test_rescale_cfg_matches_one_device(engine, sd3):
    import comfy_extras.nodes_model_advanced as nma

    tiny, load, plain, _ = sd3
    model = nma.RescaleCFG().patch(plain, 0.7)[0]
    ours, stock = _run(tiny, model, load)
    assert ours.parallel, ours.status
    assert _max_diff(ours.latent["samples"], stock) <= TOL
    _, plain_stock = _run(tiny, plain, load)
    assert _max_diff(stock, plain_stock) > 1e-4


_MODULE_LAMBDA = lambda args: args["cond"] * 0 + args["uncond"]  # noqa: E731  (cannot be found by name)


def _closure_over_a_lock():
    lock = threading.Lock()

    def post_cfg(args):
        with lock:
            return args["denoised"]

    return post_cfg


def test_modification_that_cannot_travel_falls_back_and_is_named(engine, sd3):
    tiny, load, plain, _ = sd3
    model = plain.clone()
    model.set_model_sampler_post_cfg_function(_closure_over_a_lock())
    model.model_options["sampler_cfg_function"] = _MODULE_LAMBDA
    ours, stock = _run(tiny, model, load)
    assert not ours.parallel
    assert "model_options['sampler_post_cfg_function']" in ours.status, ours.status
    assert "_closure_over_a_lock.<locals>.post_cfg" in ours.status and "captures 'lock'" in ours.status, ours.status
    assert "model_options['sampler_cfg_function']" in ours.status and "<lambda>" in ours.status, ours.status
    assert _max_diff(ours.latent["samples"], stock) == 0.0
    print(ours.status)
