"""``parallel_devices`` of Load VAE (xDiT) and its environment knobs: parsed once, errors name the field."""

from __future__ import annotations

import pytest

from xdit_multigpu.config import VAEBlend, VAEParallelConfig, parse_vae_parallel
from xdit_multigpu.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text", ["", "  ", "cpu", "cpu:1", "1"])
def test_off_or_one_device_is_the_stock_vae(text: str) -> None:
    assert parse_vae_parallel(text, 4) is None


def test_devices() -> None:
    assert parse_vae_parallel("cpu:3", 0) == VAEParallelConfig(devices=("cpu", "cpu", "cpu"))
    cfg = parse_vae_parallel(" 0, 2 ,3", 4)
    assert cfg is not None and cfg.devices == ("cuda:0", "cuda:2", "cuda:3") and cfg.describe() == "GPU 0,2,3"
    assert parse_vae_parallel("all", 2).devices == ("cuda:0", "cuda:1")
    assert cfg.tile_pixels == 0 and cfg.blend is VAEBlend.HOST and cfg.max_batch == 1


@pytest.mark.parametrize(
    ("text", "gpus", "problem"),
    [("0,0", 2, "lists GPU 0 more than once"), ("0,x", 2, "is malformed"), ("0,2", 2, "GPU 2 is out of range"),
     ("cpu:99", 0, "asks for 99 CPU ranks"), ("all", 0, '"all" finds no CUDA GPU')],
)
def test_errors_name_the_field_and_the_fix(text: str, gpus: int, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_vae_parallel(text, gpus)
    assert str(e.value).startswith("parallel_devices: ") and problem in str(e.value)
    assert e.value.fix  # says how to fix it


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDIT_VAE_TILE_PIXELS", "4194304")
    monkeypatch.setenv("XDIT_VAE_TILE_TIMEOUT_S", "30")
    monkeypatch.setenv("XDIT_VAE_BLEND", "Device")
    monkeypatch.setenv("XDIT_VAE_TILE_BATCH", "2")
    cfg = parse_vae_parallel("cpu:2", 0)
    assert (cfg.tile_pixels, cfg.timeout_s, cfg.blend, cfg.max_batch) == (4194304, 30.0, VAEBlend.DEVICE, 2)
    monkeypatch.setenv("XDIT_VAE_BLEND", "gpu")
    with pytest.raises(ConfigError, match="^XDIT_VAE_BLEND: "):
        parse_vae_parallel("cpu:2", 0)
    monkeypatch.setenv("XDIT_VAE_TILE_PIXELS", "-1")
    with pytest.raises(ConfigError, match="^XDIT_VAE_TILE_PIXELS: "):
        parse_vae_parallel("cpu:2", 0)
