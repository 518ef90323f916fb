"""Node validation (``VALIDATE_INPUTS``, before any worker starts) for Chroma and Qwen-Image files.

``engine.model_info`` runs ComfyUI's detection on the safetensors *header* only (meta tensors), so a
file holding just the keys detection looks at, at tiny shapes, is detected exactly as the real
checkpoint is (Chroma: 24 heads; Qwen-Image: the class defaults). ChromaRadiance (pixel space, NeRF
head) is a different ``supported_models`` class that no spec lists: refused at the node, naming it.
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


@pytest.mark.parametrize(("family", "config_class", "heads"), [("chroma", "Chroma", 24), ("qwen_image", "QwenImage", 24)])
def test_detected_and_accepted(header_files, family, config_class, heads):
    import folder_paths

    from xdit_multigpu.config import LoaderKind
    from xdit_multigpu.engine.model_info import inspect_model_file

    name = header_files[family]
    info = inspect_model_file("unet_name", folder_paths.get_full_path("diffusion_models", name), name,
                              LoaderKind.DIFFUSION_MODEL)
    assert info is not None and info.config_class == config_class and info.spec.name == family
    assert info.heads == heads  # real checkpoints: Ulysses 2 / 3 / 4 / 6 / 8, the rest on Ring
    for devices, strategy in (("cpu:2", "Hybrid"), ("cpu:4", "USP"), ("cpu:2", "CFG"), ("cpu:8", "Hybrid")):
        assert _validate(name, devices, strategy) is True, (devices, strategy)


def test_chroma_radiance_is_refused_at_the_node(header_files):
    msg = _validate(header_files["chroma_radiance"])
    assert isinstance(msg, str) and msg.startswith("unet_name:"), msg
    assert "is a ChromaRadiance model, which this pack cannot run in parallel yet" in msg
    assert "Chroma" in msg and "Use ComfyUI's stock loader" in msg
