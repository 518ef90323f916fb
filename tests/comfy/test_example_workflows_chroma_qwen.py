"""``example_workflows/chroma_xdit_multigpu.json`` and ``qwen_image_xdit_multigpu.json`` are complete,
valid graphs for this ComfyUI: every node type exists, every required input is a widget value or a
link, choice widgets hold values the node offers (CLIPLoader type ``chroma`` / ``qwen_image``, sampler,
scheduler), and with the xDiT nodes swapped for the stock nodes they extend they are the stock graph a
user would load.

They are not executed here: no tiny T5-XXL (Chroma) or Qwen2.5-VL (Qwen-Image) text encoder exists, and
the model files are the real ones a user picks; the diffusion models themselves are covered by
``test_nodes_one_device_chroma_qwen.py`` and the distributed tier.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.comfy

WORKFLOWS = {"chroma_xdit_multigpu": "chroma", "qwen_image_xdit_multigpu": "qwen_image"}
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "ckpt_name"}  # lists of the user's files: not checked


def _object_info() -> dict:
    """What ``/object_info`` reports per node (input specs and their order), from the node classes."""
    import nodes
    from comfy_extras import nodes_model_advanced, nodes_sd3

    from xdit_multigpu.nodes import NODE_CLASS_MAPPINGS
    from xdit_multigpu.testing.workflow import object_info_of

    # EmptySD3LatentImage is a V3 node (registered through nodes_sd3's extension; INPUT_TYPES still works)
    classes = {**nodes.NODE_CLASS_MAPPINGS, **nodes_model_advanced.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS,
               "EmptySD3LatentImage": nodes_sd3.EmptySD3LatentImage}
    return object_info_of(classes)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_is_a_complete_stock_graph(comfy_root: str, name: str) -> None:
    from xdit_multigpu.testing.workflow import stock_equivalent, ui_to_api

    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    info = _object_info()
    prompt = ui_to_api(workflow, info)
    assert {n["class_type"] for n in prompt.values()} >= {"XDiTUNetLoader", "XDiTKSampler", "XDiTCLIPLoader"}
    for nid, node in prompt.items():
        spec = info[node["class_type"]]["input"]
        missing = [k for k in spec.get("required", {}) if k not in node["inputs"]]
        assert not missing, f"{name} node {nid} ({node['class_type']}) lacks {missing}"
        for key, value in node["inputs"].items():
            kind = spec.get("required", {}).get(key, spec.get("optional", {}).get(key, [None]))[0]
            if isinstance(kind, list) and key not in FILE_INPUTS and not isinstance(value, list):
                assert value in kind, f"{name} node {nid}: {key}={value!r} is not one of {kind}"
    clip = next(n for n in prompt.values() if n["class_type"] == "XDiTCLIPLoader")
    assert clip["inputs"]["type"] == WORKFLOWS[name]
    sampler = next(n for n in prompt.values() if n["class_type"] == "XDiTKSampler")
    assert sampler["inputs"]["xdit_dispatcher"][1] == 1 and sampler["inputs"]["cfg"] > 1.0  # CFG in use
    stock = stock_equivalent(prompt)
    assert not any(n["class_type"].startswith("XDiT") for n in stock.values())
    assert all(n["class_type"] in info for n in stock.values())
