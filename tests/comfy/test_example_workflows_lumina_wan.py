"""``example_workflows/{lumina2,z_image,wan21_t2v,wan22_t2v}_xdit_multigpu.json`` are complete, valid graphs
for this ComfyUI: every node type exists, every required input is a widget value or a link, choice widgets
hold values the node offers (CLIPLoader type ``lumina2`` / ``wan``, sampler, scheduler), Wan's latent is a
video latent node and its output an animated WEBP, and with the xDiT nodes swapped for the stock nodes
they extend they are the stock graph a user would load.

They are not executed here: no tiny Gemma 2 / Qwen3 4B / umT5-XXL text encoder (nor Wan VAE) exists, and
the model files are the real ones a user picks; the diffusion models themselves are covered by
``test_nodes_one_device_lumina_wan.py`` and the distributed tier.
"""

from __future__ import annotations

import json

import pytest

from tests.comfy.test_example_workflows_chroma_qwen import FILE_INPUTS
from tests.conftest import REPO

pytestmark = pytest.mark.comfy

# workflow -> (CLIPLoader type, latent node, output node, CFG in use)
WORKFLOWS = {
    "lumina2_xdit_multigpu": ("lumina2", "EmptySD3LatentImage", "SaveImage", True),
    "z_image_xdit_multigpu": ("lumina2", "EmptySD3LatentImage", "SaveImage", False),  # Turbo: cfg 1
    "wan21_t2v_xdit_multigpu": ("wan", "EmptyHunyuanLatentVideo", "SaveAnimatedWEBP", True),
    "wan22_t2v_xdit_multigpu": ("wan", "Wan22ImageToVideoLatent", "SaveAnimatedWEBP", True),
}


def _object_info() -> dict:
    """Input specs and their order per node class (V3 nodes through their INPUT_TYPES shim)."""
    import nodes
    from comfy_extras import nodes_hunyuan, nodes_images, nodes_model_advanced, nodes_sd3, nodes_wan

    from xdit_multigpu.nodes import NODE_CLASS_MAPPINGS
    from xdit_multigpu.testing.workflow import object_info_of

    classes = {**nodes.NODE_CLASS_MAPPINGS, **nodes_model_advanced.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS,
               "EmptySD3LatentImage": nodes_sd3.EmptySD3LatentImage,
               "EmptyHunyuanLatentVideo": nodes_hunyuan.EmptyHunyuanLatentVideo,
               "Wan22ImageToVideoLatent": nodes_wan.Wan22ImageToVideoLatent,
               "SaveAnimatedWEBP": nodes_images.SaveAnimatedWEBP}
    return object_info_of(classes)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_is_a_complete_stock_graph(comfy_root: str, name: str) -> None:
    from xdit_multigpu.testing.workflow import stock_equivalent, ui_to_api

    clip_type, latent_node, output_node, uses_cfg = WORKFLOWS[name]
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    info = _object_info()
    prompt = ui_to_api(workflow, info)
    kinds = {n["class_type"] for n in prompt.values()}
    assert kinds >= {"XDiTUNetLoader", "XDiTKSampler", "XDiTCLIPLoader", latent_node, output_node}
    for nid, node in prompt.items():
        spec = info[node["class_type"]]["input"]
        missing = [k for k in spec.get("required", {}) if k not in node["inputs"]]
        assert not missing, f"{name} node {nid} ({node['class_type']}) lacks {missing}"
        for key, value in node["inputs"].items():
            kind = spec.get("required", {}).get(key, spec.get("optional", {}).get(key, [None]))[0]
            if isinstance(kind, list) and key not in FILE_INPUTS and not isinstance(value, list):
                assert value in kind, f"{name} node {nid}: {key}={value!r} is not one of {kind}"
    clip = next(n for n in prompt.values() if n["class_type"] == "XDiTCLIPLoader")
    assert clip["inputs"]["type"] == clip_type
    sampler = next(n for n in prompt.values() if n["class_type"] == "XDiTKSampler")
    assert sampler["inputs"]["xdit_dispatcher"][1] == 1 and (sampler["inputs"]["cfg"] > 1.0) == uses_cfg
    latent = next(n for n in prompt.values() if n["class_type"] == latent_node)
    if latent_node != "EmptySD3LatentImage":  # a video: several latent frames
        assert latent["inputs"]["length"] > 1 and "start_image" not in latent["inputs"]  # T2V, no image
    stock = stock_equivalent(prompt)
    assert not any(n["class_type"].startswith("XDiT") for n in stock.values())
    assert all(n["class_type"] in info for n in stock.values())
