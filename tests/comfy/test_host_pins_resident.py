"""Pins of the ComfyUI code that resident weights (``worker/resident.py``) rely on.

A worker that decides "resident" sets ``args.highvram`` before importing ``comfy.model_management``,
which then runs in HIGH_VRAM mode: ``unet_offload_device()`` is the GPU, so ComfyUI's loader builds the
model there and copies the file into it once. A ComfyUI update that changes any link of that chain (or
the memory behaviour this pack's docs describe) must fail here, naming the symbol, rather than silently
put the weights back in system RAM or change what a LoRA costs on the GPU.

Source checks compare with all whitespace removed, like ``test_host_pins.py``.
"""

from __future__ import annotations

import pytest

from tests.comfy.test_host_pins import _has
from xdit_multigpu.worker.resident import HOST_OFFLOAD_FLAGS, HOST_RESIDENT_FLAGS

pytestmark = pytest.mark.comfy


def test_flags_exist_on_comfys_args(comfy_root: str) -> None:
    """The flags ``decide`` reads and ``worker_flags`` sets are ComfyUI's (``apply_cli_args`` skips unknown ones)."""
    from comfy.cli_args import args

    for name in HOST_RESIDENT_FLAGS + HOST_OFFLOAD_FLAGS:
        assert isinstance(getattr(args, name, None), bool), f"comfy.cli_args.args.{name} is gone"


def test_highvram_flag_selects_high_vram_at_import(comfy_root: str) -> None:
    """``vram_state`` is fixed when ``comfy.model_management`` is imported, from ``args.highvram``; lowvram /
    novram are checked first (so a host's --lowvram wins, as ``decide`` assumes)."""
    import comfy.model_management as mm

    _has(mm, "if args.lowvram:", "elif args.novram:", "elif args.highvram or args.gpu_only:",
         "vram_state = VRAMState.HIGH_VRAM", "if cpu_state != CPUState.GPU:", "vram_state = VRAMState.DISABLED")
    assert mm.VRAMState.HIGH_VRAM.name == "HIGH_VRAM"  # resident.confirm compares the name


def test_unet_offload_device_is_the_gpu_under_high_vram(comfy_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.model_management as mm
    import torch

    _has(mm.unet_offload_device, "if vram_state == VRAMState.HIGH_VRAM:", "return get_torch_device()",
         'return torch.device("cpu")')
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)
    assert mm.unet_offload_device() == mm.get_torch_device()
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    assert mm.unet_offload_device() == torch.device("cpu")


def test_diffusion_loader_materialises_on_the_offload_device(comfy_root: str) -> None:
    """The single copy: the model moves to ``unet_offload_device()`` before the file's tensors are copied
    into it (``load_state_dict``), and the patcher keeps that device as its offload device."""
    import comfy.model_base
    import comfy.sd

    _has(comfy.sd.load_diffusion_model_state_dict, "offload_device = model_management.unet_offload_device()",
         'model = model_config.get_model(new_sd, "")', "model = model.to(offload_device)",
         'model.load_model_weights(new_sd, "")',
         "comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)")
    _has(comfy.model_base.BaseModel.load_model_weights, "self.diffusion_model.load_state_dict(to_load, strict=False)")
    # checkpoints (LoaderKind.CHECKPOINT): built directly on the GPU under HIGH_VRAM
    _has(comfy.model_management.unet_inital_load_device, "if vram_state == VRAMState.HIGH_VRAM",
         "return torch_dev")


def test_high_vram_loads_fully_and_never_frees_by_offloading(comfy_root: str) -> None:
    """What HIGH_VRAM changes at sampling time: no partial (lowvram) load, so a model that does not fit
    fails instead of being split; and unloading moves to the offload device, i.e. frees nothing."""
    import comfy.model_management as mm
    from comfy.model_patcher import ModelPatcher

    _has(mm.load_models_gpu, "if lowvram_available and (vram_set_state == VRAMState.LOW_VRAM or "
         "vram_set_state == VRAMState.NORMAL_VRAM) and not force_full_load:")
    _has(ModelPatcher.detach, "self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)")


def test_patched_weights_back_up_on_the_offload_device(comfy_root: str) -> None:
    """A LoRA (model delta) patches a weight after backing up the original on ``offload_device``: under
    HIGH_VRAM the original stays on the GPU beside the patched copy (README: memory of resident weights)."""
    from comfy.model_patcher import ModelPatcher

    _has(ModelPatcher.patch_weight_to_device,
         "self.backup[key] = collections.namedtuple('Dimension', ['weight', 'inplace_update'])"
         "(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)")


def test_latents_stay_on_the_intermediate_device(comfy_root: str) -> None:
    """Workers get ``--highvram``, never ``--gpu-only``: ComfyUI's intermediate device (where samplers put
    their outputs) depends on ``gpu_only`` alone, so rank 0's latent comes back as before."""
    import comfy.model_management as mm

    _has(mm.intermediate_device, "if args.gpu_only:", "return get_torch_device()", 'return torch.device("cpu")')
