"""What the Chroma and Qwen-Image installers refuse (``UnsupportedModelError`` naming the field and the
fix), on tiny ComfyUI models built from their explicit configs. No process group is needed: the
refusals come before any collective (install time, or the first block of a forward on every rank alike).
"""

from __future__ import annotations

import types

import pytest

pytestmark = pytest.mark.comfy


def _patcher(cls_name: str, config: dict):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    mc = getattr(comfy.supported_models, cls_name)(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


CTX = types.SimpleNamespace(attention_override=lambda func, *a, **kw: func(*a, **kw))  # shard / gather unused


@pytest.mark.parametrize("layout", ["skip_mmdit", "skip_dit", "flipped", "no_single"])
def test_chroma_layouts_the_hooks_cannot_split(comfy_root, layout):
    import torch

    from xdit_multigpu.errors import UnsupportedModelError
    from xdit_multigpu.models import families
    from xdit_multigpu.testing.tiny_models_chroma_qwen import CHROMA_TINY

    base = _patcher("Chroma", CHROMA_TINY)
    dm = base.model.diffusion_model
    if layout == "skip_mmdit":
        dm.skip_mmdit = [0]
    elif layout == "skip_dit":
        dm.skip_dit = [1]
    elif layout == "flipped":
        dm.double_blocks[0].flipped_img_txt = True
    else:
        dm.single_blocks = torch.nn.ModuleList()
    clone = base.clone()
    with pytest.raises(UnsupportedModelError, match="Chroma sequence parallel") as err:
        families.CHROMA.sequence_parallel(clone, CTX)
    assert err.value.field == "parallel_strategy" and "CFG parallel" in str(err.value)
    assert not clone.model_options.get("transformer_options", {}).get("patches_replace")


def test_chroma_controlnet_is_cfg_parallel_only() -> None:
    from xdit_multigpu.models import families

    assert not families.CHROMA.control_residuals and families.QWEN_IMAGE.control_residuals


def test_qwen_image_double_block_model_patches_are_refused(comfy_root):
    """DiffSynth-style ``patches["double_block"]`` see the full ``x`` and add to the image stream per
    block: the installed block-0 replace refuses them before sharding anything."""
    import torch

    from xdit_multigpu.errors import UnsupportedModelError
    from xdit_multigpu.models import families
    from xdit_multigpu.testing.tiny_models_chroma_qwen import QWEN_IMAGE_TINY

    clone = _patcher("QwenImage", QWEN_IMAGE_TINY).clone()
    families.QWEN_IMAGE.sequence_parallel(clone, CTX)
    to = clone.model_options["transformer_options"]
    assert sorted(to["patches_replace"]["dit"]) == [("double_block", 0), ("double_block", 1)]
    patch = to["patches_replace"]["dit"][("double_block", 0)]
    args = {"img": torch.zeros(1, 4, 128), "txt": torch.zeros(1, 3, 128), "vec": None, "pe": None,
            "transformer_options": {"patches": {"double_block": [lambda a: a]}}}
    with pytest.raises(UnsupportedModelError, match="double_block") as err:
        patch(args, {"original_block": lambda a: pytest.fail("block ran")})
    assert err.value.field == "parallel_strategy" and "CFG parallel" in str(err.value)
