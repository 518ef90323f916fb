"""``patching.build_on_device``: ComfyUI's ``load_diffusion_model_state_dict`` builds the diffusion model on
the given device (the configs from ``model_config_from_unet`` get ``device=``), the result equals the stock
load parameter for parameter and in the sampled latent, and the patch is gone afterwards (also on error).
Run on the CPU device of the real host: the call path is the GPU one, the device is what is available."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy


def test_state_dict_load_builds_on_the_device_and_equals_stock(tiny_models):
    import comfy.model_base
    import comfy.model_detection as md
    import comfy.sd
    import comfy.utils
    import torch

    from xdit_multigpu import patching
    from tests.comfy.test_prefetch_load import _sample

    tiny = tiny_models["sd3"]
    reference = comfy.sd.load_diffusion_model(tiny.path)
    original = md.model_config_from_unet
    seen: list[object] = []
    real_init = comfy.model_base.BaseModel.__init__

    def spy(self, model_config, *args, **kwargs):  # records the device the model is built with
        seen.append(kwargs.get("device"))
        return real_init(self, model_config, *args, **kwargs)

    with patching.swapped(comfy.model_base.BaseModel, "__init__", spy):
        with patching.build_on_device(torch.device("cpu")):
            assert md.model_config_from_unet is not original and patching.installed(patching.BUILD_ON_DEVICE)
            with patching.build_on_device(torch.device("cpu")):  # nested: idempotent, the outer one restores
                pass
            assert patching.installed(patching.BUILD_ON_DEVICE)
            got = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(tiny.path))
        stock = comfy.sd.load_diffusion_model(tiny.path)
    assert md.model_config_from_unet is original and not patching.installed(patching.BUILD_ON_DEVICE)
    assert seen == [torch.device("cpu"), None]  # ours with the device, stock (after the block) without
    assert stock is not None and got is not None
    ref_sd, got_sd = reference.model.state_dict(), got.model.state_dict()
    assert list(got_sd) == list(ref_sd) and all(torch.equal(got_sd[k], t) for k, t in ref_sd.items())
    assert torch.equal(_sample(got, tiny), _sample(reference, tiny))


def test_build_on_device_is_removed_on_error():
    import comfy.model_detection as md
    import torch

    from xdit_multigpu import patching

    original = md.model_config_from_unet
    with pytest.raises(RuntimeError, match="boom"):
        with patching.build_on_device(torch.device("cpu")):
            raise RuntimeError("boom")
    assert md.model_config_from_unet is original and not patching.installed(patching.BUILD_ON_DEVICE)
