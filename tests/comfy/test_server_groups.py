"""GPU groups through a real ComfyUI server: 8 simultaneous API clients against one dispatcher with two
groups (``cpu:1|cpu:1``) all get their own correct image and the prompts are spread over both groups;
two xDiT KSamplers on independent branches of one workflow run at the same time on different groups
(the node is async); a batch is split over the groups and equals the stock workflow's batch."""

from __future__ import annotations

import copy
import pathlib
import threading
import uuid

import numpy as np
import pytest

from tests.conftest import COMFYUI_PATH, REPO

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(900)]
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def server():
    from xdit_multigpu.testing.server import ComfyServer, prepare_base_dir
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    base = prepare_base_dir(REPO / ".host" / "test-server-groups")
    tiny = write_tiny_models(str(base / "models"), families=["sd3", "clip_l", "vae16"], comfy_root=COMFYUI_PATH)
    srv = ComfyServer(pathlib.Path(COMFYUI_PATH), base, extra_args=["--output-directory", str(base / "output")])
    srv.start()
    srv.tiny = tiny
    srv.info = srv.get("/object_info")
    yield srv
    srv.stop()


def _prompt(server, devices, scheduling="round_robin", seed=1, batch=1):
    from xdit_multigpu.testing.demo import adapt_to_tiny, load_example

    prompt = adapt_to_tiny(load_example("sd3_xdit_multigpu", server.info), server.tiny, devices, 2, 64)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "XDiTUNetLoader":
            inputs["scheduling_strategy"] = scheduling
        if node["class_type"] == "XDiTKSampler":
            inputs["seed"] = seed
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"groups_{uuid.uuid4().hex[:8]}"
        if "batch_size" in inputs:
            inputs["batch_size"] = batch
    return prompt


def _images(entry, server) -> list[np.ndarray]:
    from PIL import Image

    from xdit_multigpu.testing.server import saved_images

    return [np.asarray(Image.open(p)).astype(np.int16) for p in sorted(saved_images(entry, server.base / "output"))]


def _status(entry, prompt) -> str:
    from xdit_multigpu.testing.demo import node_text

    return node_text(entry, "XDiTKSampler", prompt)


def test_eight_clients_get_their_own_images_spread_over_both_groups(server):
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompts = [_prompt(server, "cpu:1|cpu:1", seed=100 + i) for i in range(8)]
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        code, body = server.queue(copy.deepcopy(prompts[i]), client_id=f"client-{i}")
        assert code == 200, body
        results[i] = server.wait(body["prompt_id"], timeout=600)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=700)
    assert sorted(results) == list(range(8))
    groups = []
    for i in range(8):
        assert results[i]["status"]["status_str"] == "success", results[i]["status"]
        status = _status(results[i], prompts[i])
        assert "one device" not in status, status
        groups.append(0 if "-> group 0" in status else 1 if "-> group 1" in status else None)
        stock = server.run(stock_equivalent(prompts[i]), timeout=300)
        (ours,), (ref,) = _images(results[i], server), _images(stock, server)
        assert np.abs(ours - ref).max() <= 1, f"client {i}: image differs from its own stock image"
    assert sorted(groups) == [0] * 4 + [1] * 4, groups  # round_robin over both groups
    firsts = [_images(results[i], server)[0] for i in range(8)]
    assert all(np.abs(firsts[0] - f).max() > 1 for f in firsts[1:]), "different seeds gave the same image"


def test_two_branches_of_one_workflow_sample_at_the_same_time(server):
    """least_loaded sends the second KSampler to the other group only if the first is still running."""
    prompt = _prompt(server, "cpu:1|cpu:1", scheduling="least_loaded", seed=5)
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "XDiTKSampler")
    decode = next(i for i, n in prompt.items() if n["class_type"] == "VAEDecode")
    save = next(i for i, n in prompt.items() if n["class_type"] == "SaveImage")
    prompt["k2"] = copy.deepcopy(prompt[sampler])
    prompt["k2"]["inputs"]["seed"] = 6
    prompt["d2"] = {"class_type": "VAEDecode", "inputs": {**prompt[decode]["inputs"], "samples": ["k2", 0]}}
    prompt["s2"] = {"class_type": "SaveImage", "inputs": {**prompt[save]["inputs"], "images": ["d2", 0]}}
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    texts = [entry["outputs"][k]["text"][0] for k in (sampler, "k2")]
    assert sorted("-> group 0" in t for t in texts) == [False, True], texts
    assert sorted("-> group 1" in t for t in texts) == [False, True], texts


def test_batch_is_split_over_the_groups_and_equals_the_stock_batch(server):
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _prompt(server, "cpu:1|cpu:1", seed=9, batch=4)
    ours = server.run(copy.deepcopy(prompt), timeout=600)
    assert ours["status"]["status_str"] == "success", ours["status"]
    status = _status(ours, prompt)
    assert "batch 4 over 2 groups by round_robin" in status and "2 item(s), group 1" in status, status
    stock = server.run(stock_equivalent(prompt), timeout=300)
    a, b = _images(ours, server), _images(stock, server)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1
