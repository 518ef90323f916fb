"""Node validation (``VALIDATE_INPUTS``, before any worker starts) for Chroma and Qwen-Image files.

``engine.model_info`` runs ComfyUI's detection on the safetensors *header* only (meta tensors), so a
file holding just the keys detection looks at, at tiny shapes, is detected exactly as the real
checkpoint is (Chroma: 24 heads; Qwen-Image: the class defaults). Chroma Radiance (pixel space, NeRF
head) is its own ``supported_models`` class, listed by the Chroma spec. Combinations the families cannot
do are refused at the node, naming the field and the fix.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy

# The keys ComfyUI's model_detection reads for each layout (comfy/model_detection.py).
CHROMA_KEYS = {"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (32, 64),
               "txt_in.weight": (32, 16), "distilled_guidance_layer.norms.0.scale": (8,)}
RADIANCE_KEYS = {"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "txt_in.weight": (32, 16),
                 "distilled_guidance_layer.norms.0.scale": (8,), "nerf_blocks.0.norm.scale": (8,)}
QWEN_KEYS = {"txt_norm.weight": (16,), "img_in.weight": (32, 64), "transformer_blocks.0.img_mod.1.weight": (8, 8)}


@pytest.fixture(scope="module")
def header_files(comfy_root, tmp_path_factory):
    import folder_paths
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("diffusion_models")
    names = {}
    for fam, keys in (("chroma", CHROMA_KEYS), ("chroma_radiance", RADIANCE_KEYS), ("qwen_image", QWEN_KEYS)):
        names[fam] = f"xdit_header_{fam}.safetensors"
        save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(folder / names[fam]))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    folder_paths.filename_list_cache.clear()
    return names


def _validate(name: str, devices: str = "cpu:2", strategy: str = "Hybrid"):
    from xdit_multigpu.nodes.loaders import XDiTUNetLoader

    return XDiTUNetLoader.VALIDATE_INPUTS(name, "default", devices, strategy, "round_robin")


@pytest.mark.parametrize(("family", "config_class", "spec_name"), [
    ("chroma", "Chroma", "chroma"), ("chroma_radiance", "ChromaRadiance", "chroma"),
    ("qwen_image", "QwenImage", "qwen_image"),
])
def test_detected_and_accepted(header_files, family, config_class, spec_name):
    import folder_paths

    from xdit_multigpu.config import LoaderKind
    from xdit_multigpu.engine.model_info import inspect_model_file

    name = header_files[family]
    info = inspect_model_file("unet_name", folder_paths.get_full_path("diffusion_models", name), name,
                              LoaderKind.DIFFUSION_MODEL)
    assert info is not None and info.config_class == config_class and info.spec.name == spec_name
    assert info.heads == 24  # real checkpoints: Ulysses 2 / 3 / 4 / 6 / 8, the rest on Ring
    for devices, strategy in (("cpu:2", "Hybrid"), ("cpu:4", "USP"), ("cpu:2", "CFG"), ("cpu:8", "Hybrid")):
        assert _validate(name, devices, strategy) is True, (devices, strategy)


@pytest.mark.parametrize("family", ["chroma", "chroma_radiance", "qwen_image"])
def test_unsupported_combinations_are_refused_at_the_node(header_files, family):
    name = header_files[family]
    msg = _validate(name, "cpu:4", "CFG")
    assert isinstance(msg, str), msg
    assert msg.startswith("parallel_strategy: CFG parallel runs cond and uncond on exactly 2"), msg
    assert "choose Hybrid" in msg
    msg = _validate(name, "cpu:2", "Tensor")
    assert isinstance(msg, str) and msg.startswith("parallel_strategy: Tensor is not yet available"), msg
