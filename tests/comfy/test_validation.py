"""Bad node inputs are refused before anything starts, with a message naming the field and the fix."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.comfy


def _validate(name: str, devices: str = "cpu", strategy: str = "Hybrid", scheduling: str = "round_robin"):
    from xdit_multigpu.nodes.loaders import XDiTUNetLoader

    return XDiTUNetLoader.VALIDATE_INPUTS(name, "default", devices, strategy, scheduling)


@pytest.mark.parametrize(
    ("devices", "needle"),
    [
        ("", "gpu_devices: is empty"),
        ("0,,1", "gpu_devices: \"0,,1\" is malformed"),
        ("1,1", "gpu_devices: \"1,1\" lists GPU 1 more than once"),
        ("0,7", "gpu_devices: GPU 0 is out of range: this machine has no CUDA GPU"),
    ],
)
def test_bad_gpu_devices(tiny_models, devices, needle):
    msg = _validate(os.path.basename(tiny_models["sd3"].path), devices)
    assert isinstance(msg, str) and msg.startswith(needle), msg


def test_strategy_the_model_cannot_do(tiny_models):
    from xdit_multigpu.config import DeviceSet, ParallelStrategy
    from xdit_multigpu.errors import ConfigError
    from xdit_multigpu.models import lookup
    from xdit_multigpu.nodes.common import _check_strategy

    # SDXL is CFG-only (a UNet's convolutions need the whole image). Its tiny file loads only from an
    # explicit config, so the check itself is exercised here; the loader calls it for every detected file.
    with pytest.raises(ConfigError) as err:
        _check_strategy(lookup("SDXL"), ParallelStrategy.USP, DeviceSet.parse("cpu:2", 0))
    assert str(err.value).startswith("parallel_strategy: USP (sequence parallel) is not available for SDXL")
    assert "Choose Hybrid or CFG" in str(err.value)
    msg = _validate(os.path.basename(tiny_models["sd3"].path), "cpu:4", "CFG")
    assert isinstance(msg, str) and "exactly 2 devices" in msg and "gpu_devices lists 4" in msg
    msg = _validate(os.path.basename(tiny_models["sd3"].path), "cpu:2", "PipeFusion")
    assert isinstance(msg, str) and msg.startswith("parallel_strategy: PipeFusion is not yet available")


def test_missing_unreadable_and_undetectable_files(tiny_models, tmp_path):
    import folder_paths
    import torch
    from safetensors.torch import save_file

    msg = _validate("no_such_model.safetensors")
    assert isinstance(msg, str) and msg.startswith('unet_name: "no_such_model.safetensors" was not found')

    folder = os.path.dirname(tiny_models["sd3"].path)
    broken = os.path.join(folder, "xdit_test_truncated.safetensors")
    with open(broken, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    unknown = os.path.join(folder, "xdit_test_unknown.safetensors")
    save_file({"foo.weight": torch.zeros(2, 2)}, unknown)
    folder_paths.filename_list_cache.clear()
    try:
        msg = _validate("xdit_test_truncated.safetensors")
        assert isinstance(msg, str) and "could not be read" in msg and msg.startswith("unet_name:")
        msg = _validate("xdit_test_unknown.safetensors")
        assert isinstance(msg, str) and msg.startswith('unet_name: ComfyUI cannot detect the model in "xdit_test_unknown')
    finally:
        os.remove(broken)
        os.remove(unknown)


def test_valid_inputs_pass(tiny_models):
    for fam in ("sd3", "pixart_sigma", "hunyuan_dit"):
        assert _validate(os.path.basename(tiny_models[fam].path), "cpu:2") is True
    assert _validate(os.path.basename(tiny_models["sd3"].path), "cpu:4", "USP") is True


def test_ulysses_degree_is_checked_against_the_model_and_the_devices(tiny_models):
    from xdit_multigpu.nodes.loaders import XDiTUNetLoader

    name = os.path.basename(tiny_models["sd3"].path)  # tiny SD3: 4 heads

    def validate(devices: str, strategy: str, degree: int):
        return XDiTUNetLoader.VALIDATE_INPUTS(name, "default", devices, strategy, "round_robin", ulysses_degree=degree)

    assert validate("cpu:4", "USP", 2) is True and validate("cpu:4", "Hybrid", 0) is True
    msg = validate("cpu:4", "USP", 3)
    assert msg == "ulysses_degree: is 3, which does not divide the 4-way sequence split. Use one of [1, 2, 4], or 0 for automatic", msg
    msg = validate("cpu:8", "USP", 8)
    assert isinstance(msg, str) and "does not divide the model's 4 attention heads" in msg and "[1, 2, 4]" in msg
    msg = validate("cpu:2", "CFG", 2)
    assert isinstance(msg, str) and msg.startswith("ulysses_degree: is 2, but CFG parallel splits no sequence")
    spec = XDiTUNetLoader().load(name, "default", "cpu:4", "USP", "round_robin", ulysses_degree=2)[-1]
    assert spec.ulysses_degree == 2
