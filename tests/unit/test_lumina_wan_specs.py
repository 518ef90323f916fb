"""Lumina 2 / Z-Image and Wan T2V specs: lookup by ComfyUI class name, heads from the detected configs,
Ulysses divisibility refused with a fix, the planner's plans for their real head counts, and the
installers' refusals (checked before they touch the patcher)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xdit_multigpu.config import ParallelPlan, ParallelStrategy
from xdit_multigpu.engine import planner
from xdit_multigpu.errors import ConfigError, UnsupportedModelError
from xdit_multigpu.models import lookup
from xdit_multigpu.models.families import LUMINA2, WAN_T2V
from xdit_multigpu.models.registry import Axis
from xdit_multigpu.parallel.apply import validate

pytestmark = pytest.mark.unit

# What ComfyUI's model_detection writes for the real files (hidden 2304 / 3840; Wan heads = dim // 128).
LUMINA2_DETECTED = {"image_model": "lumina2", "dim": 2304, "n_heads": 24, "n_kv_heads": 8}
ZIMAGE_DETECTED = {"image_model": "lumina2", "dim": 3840, "n_heads": 30, "n_kv_heads": 30}
WAN_1_3B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "num_heads": 12}
WAN_14B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "num_heads": 40}
WAN22_5B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 3072, "num_heads": 24, "out_dim": 48}


def _groups(plan: ParallelPlan) -> SimpleNamespace:
    return SimpleNamespace(plan=plan, world_size=plan.world_size)


def test_lookup_by_class_name() -> None:
    assert lookup("Lumina2") is LUMINA2 and lookup("ZImage") is LUMINA2
    assert lookup("WAN21_T2V") is WAN_T2V and lookup("WAN22_T2V") is WAN_T2V
    for refused in ("WAN21_I2V", "WAN21_FunControl2V", "WAN21_Vace", "WAN21_Camera", "WAN22_Camera", "WAN22_S2V",
                    "WAN21_HuMo", "WAN22_Animate"):
        assert lookup(refused) is None, refused
    for spec in (LUMINA2, WAN_T2V):
        assert spec.axes == frozenset({Axis.CFG, Axis.ULYSSES, Axis.RING}) and not spec.control_residuals


def test_heads_from_detected_configs() -> None:
    assert [LUMINA2.heads(c) for c in (LUMINA2_DETECTED, ZIMAGE_DETECTED)] == [24, 30]
    assert [WAN_T2V.heads(c) for c in (WAN_1_3B, WAN_14B, WAN22_5B)] == [12, 40, 24]


def test_zimage_ulysses_4_is_refused_with_the_divisors() -> None:
    plan = ParallelPlan(ulysses=4)
    with pytest.raises(ConfigError) as err:
        validate(LUMINA2, plan, ZIMAGE_DETECTED, _groups(plan))
    assert err.value.field == "ulysses_degree" and "[2, 3, 5, 6, 10, 15, 30]" in str(err.value)
    validate(LUMINA2, plan, LUMINA2_DETECTED, _groups(plan))
    ok = ParallelPlan(ulysses=2, ring=2)
    validate(LUMINA2, ok, ZIMAGE_DETECTED, _groups(ok))
    validate(WAN_T2V, plan, WAN_1_3B, _groups(plan))


@pytest.mark.parametrize(("heads", "devices", "want"), [
    (30, 4, (1, 2, 2)), (30, 8, (1, 2, 4)), (24, 8, (1, 8, 1)), (12, 8, (1, 4, 2)), (40, 4, (1, 4, 1))])
def test_usp_plans_respect_heads(heads: int, devices: int, want: tuple[int, int, int]) -> None:
    p = planner.plan(ParallelStrategy.USP, devices, True, heads, LUMINA2.axes)
    assert (p.cfg, p.ulysses, p.ring) == want


def test_installers_refuse_before_touching_the_patcher() -> None:
    """Wan: a non-T2V layout; NextDiT: no noise refiner (nothing to shard at)."""
    from xdit_multigpu.models import lumina, wan

    class _Patcher:
        def __init__(self, dm: object) -> None:
            self.model = SimpleNamespace(diffusion_model=dm)

        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"installer touched patcher.{name} before refusing")

    class WanModel:  # noqa: D401  (name matters: the check reads type(dm).__name__)
        model_type, blocks = "i2v", [object()]

    with pytest.raises(UnsupportedModelError, match="not a text-to-video"):
        wan.install_sequence_parallel(_Patcher(WanModel()), None)  # type: ignore[arg-type]
    nextdit = SimpleNamespace(noise_refiner=[], layers=[object()])
    with pytest.raises(UnsupportedModelError, match="noise-refiner"):
        lumina.install_sequence_parallel(_Patcher(nextdit), None)  # type: ignore[arg-type]
