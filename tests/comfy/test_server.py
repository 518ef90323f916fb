"""A real ComfyUI server (main.py --cpu on 127.0.0.1) with this pack, driven over HTTP."""

from __future__ import annotations

import copy
import pathlib

import numpy as np
import pytest

from tests.conftest import COMFYUI_PATH, REPO

pytestmark = pytest.mark.comfy

NODES = {
    "XDiTCheckpointLoader": "Load Checkpoint (xDiT Multi-GPU)",
    "XDiTUNetLoader": "Load UNet (xDiT Multi-GPU)",
    "XDiTKSampler": "KSampler (xDiT Multi-GPU)",
    "XDiTVAELoader": "Load VAE (xDiT)",
    "XDiTCLIPLoader": "Load CLIP (xDiT)",
    "XDiTDualCLIPLoader": "Load Dual CLIP (xDiT)",
}


TINY_LORA = "xdit_tiny_sd3_lora.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from xdit_multigpu.testing.server import ComfyServer, prepare_base_dir
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    base = prepare_base_dir(REPO / ".host" / "test-server")
    tiny = write_tiny_models(str(base / "models"), families=["sd3", "clip_l", "vae16"],
                             comfy_root=COMFYUI_PATH)
    from xdit_multigpu.testing.tiny_lora import write_tiny_lora

    write_tiny_lora(tiny["sd3"].path, str(base / "models" / "loras" / TINY_LORA))
    srv = ComfyServer(pathlib.Path(COMFYUI_PATH), base, extra_args=["--output-directory", str(base / "output")])
    srv.start()
    srv.tiny = tiny
    srv.info = srv.get("/object_info")
    yield srv
    srv.stop()


def _sd3_prompt(server, devices: str):
    from xdit_multigpu.testing.demo import adapt_to_tiny, load_example

    return adapt_to_tiny(load_example("sd3_xdit_multigpu", server.info), server.tiny, devices, 3, 128)


def _image(entry, server) -> np.ndarray:
    from PIL import Image

    from xdit_multigpu.testing.server import saved_images

    (path,) = saved_images(entry, server.base / "output")
    return np.asarray(Image.open(path)).astype(np.int16)


def test_object_info_lists_the_six_nodes(server):
    for cls, name in NODES.items():
        assert server.info[cls]["display_name"] == name
        assert server.info[cls]["category"] == "xDiT Multi-GPU"
        for section in server.info[cls]["input"].values():
            for inp, spec in section.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{cls}.{inp} has no tooltip"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("gpu_devices", "0,0", 'gpu_devices: "0,0" lists GPU 0 more than once'),
        ("gpu_devices", "", "gpu_devices: is empty"),
        ("gpu_devices", "zero", "is malformed"),
        ("gpu_devices", "3", "gpu_devices: GPU 3 is out of range"),
        ("unet_name", "missing.safetensors", 'unet_name: "missing.safetensors" was not found'),
        ("parallel_strategy", "Tensor", "parallel_strategy: Tensor is not yet available"),
    ],
)
def test_bad_inputs_are_node_errors_and_the_server_stays_up(server, field, value, needle):
    prompt = _sd3_prompt(server, "cpu")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    prompt[loader]["inputs"][field] = value
    code, body = server.queue(prompt)
    assert code == 400
    details = " ".join(e["details"] for e in body["node_errors"][loader]["errors"])
    assert needle in details, details
    assert server.get("/system_stats")["system"]  # still serving


def test_strategy_the_devices_cannot_do_is_a_node_error(server):
    """CFG parallel splits cond and uncond: 2 devices. (The model-capability refusal, e.g. USP on the
    CFG-only SDXL, is covered in test_validation: no detectable SDXL is small enough for a test.)"""
    prompt = _sd3_prompt(server, "cpu:4")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    prompt[loader]["inputs"]["parallel_strategy"] = "CFG"
    code, body = server.queue(prompt)
    assert code == 400
    assert "CFG parallel runs cond and uncond on exactly 2 devices" in str(body["node_errors"][loader])


def test_one_device_workflow_equals_stock_workflow(server):
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _sd3_prompt(server, "cpu")
    ours = server.run(copy.deepcopy(prompt), timeout=300)
    assert ours["status"]["status_str"] == "success", ours["status"]
    stock = server.run(stock_equivalent(prompt), timeout=300)
    assert stock["status"]["status_str"] == "success", stock["status"]
    a, b = _image(ours, server), _image(stock, server)
    assert a.shape == b.shape == (128, 128, 3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("strategy", ["Hybrid", "USP"])
def test_two_cpu_ranks_equal_stock_workflow(server, strategy):
    """The xDiT workflow on 2 CPU ranks (Ray actors, gloo) returns the stock workflow's image (±1/255)."""
    from xdit_multigpu.testing.demo import node_text
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _sd3_prompt(server, "cpu:2")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    prompt[loader]["inputs"]["parallel_strategy"] = strategy
    ours = server.run(copy.deepcopy(prompt), timeout=600)
    assert ours["status"]["status_str"] == "success", ours["status"]
    status = node_text(ours, "XDiTKSampler", prompt)
    expected = "cfg 2 x ulysses 1 x ring 1" if strategy == "Hybrid" else "cfg 1 x ulysses 2 x ring 1"
    assert expected in status and "one device" not in status, status
    stock = server.run(stock_equivalent(prompt), timeout=300)
    a, b = _image(ours, server), _image(stock, server)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


def test_stock_lora_loader_between_xdit_nodes_runs_parallel(server):
    """Load UNet (xDiT) -> stock LoraLoaderModelOnly -> KSampler (xDiT) on cpu:2: parallel, stock image."""
    from xdit_multigpu.testing.demo import node_text
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _sd3_prompt(server, "cpu:2")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "XDiTKSampler")
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": [loader, 0], "lora_name": TINY_LORA, "strength_model": 0.8}}
    prompt[sampler]["inputs"]["model"] = ["lora", 0]
    prompt[loader]["inputs"]["parallel_strategy"] = "Hybrid"
    ours = server.run(copy.deepcopy(prompt), timeout=600)
    assert ours["status"]["status_str"] == "success", ours["status"]
    status = node_text(ours, "XDiTKSampler", prompt)
    assert "cfg 2 x ulysses 1 x ring 1" in status and "one device" not in status, status
    stock = server.run(stock_equivalent(prompt), timeout=300)
    assert stock["status"]["status_str"] == "success", stock["status"]
    a, b = _image(ours, server), _image(stock, server)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()
    no_lora = copy.deepcopy(stock_equivalent(prompt))
    no_lora[sampler]["inputs"]["model"] = [loader, 0]
    plain = server.run(no_lora, timeout=300)
    assert np.abs(_image(plain, server) - b).max() > 1, "the LoRA did not change the stock image"


def test_rerun_with_a_new_seed_equals_stock(server):
    """Re-queue with only the seed changed: ComfyUI hands the KSampler its cached conditioning, which the
    ranks still hold from the first run (``executor.kept``: it does not travel again); the image is the
    stock workflow's for the new seed."""
    from xdit_multigpu.testing.demo import node_text
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _sd3_prompt(server, "cpu:2")
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "XDiTKSampler")
    prompt[loader]["inputs"]["parallel_strategy"] = "Hybrid"
    first = server.run(copy.deepcopy(prompt), timeout=600)
    assert first["status"]["status_str"] == "success", first["status"]
    prompt[sampler]["inputs"]["seed"] = int(prompt[sampler]["inputs"]["seed"]) + 1
    again = server.run(copy.deepcopy(prompt), timeout=600)
    assert again["status"]["status_str"] == "success", again["status"]
    status = node_text(again, "XDiTKSampler", prompt)
    assert "cfg 2 x ulysses 1 x ring 1" in status and "one device" not in status, status
    stock = server.run(stock_equivalent(prompt), timeout=300)
    a, b = _image(again, server), _image(stock, server)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()
    assert np.abs(a - _image(first, server)).max() > 1, "the new seed did not change the image"
