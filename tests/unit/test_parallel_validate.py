"""``parallelize`` validates the plan against the model before touching anything."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xdit_multigpu.config import ParallelPlan
from xdit_multigpu.errors import ConfigError, UnsupportedModelError
from xdit_multigpu.models.families import FLUX, HUNYUAN_DIT, PIXART, SD3, SDXL
from xdit_multigpu.parallel.apply import parallelize, validate
from xdit_multigpu.parallel.control import make_control_wrapper

pytestmark = pytest.mark.unit


def _groups(plan: ParallelPlan) -> SimpleNamespace:
    return SimpleNamespace(plan=plan, world_size=plan.world_size)


def test_heads_must_divide_over_ulysses() -> None:
    plan = ParallelPlan(ulysses=4)
    with pytest.raises(ConfigError) as err:
        validate(SD3, plan, {"depth": 38}, _groups(plan))  # SD3.5-Large: 38 heads
    assert err.value.field == "ulysses_degree" and "38" in str(err.value) and "[2, 19, 38]" in str(err.value)
    validate(SD3, ParallelPlan(ulysses=2, ring=2), {"depth": 38}, _groups(ParallelPlan(ulysses=2, ring=2)))
    validate(FLUX, plan, {"num_heads": 24}, _groups(plan))


def test_unsupported_axis_names_the_fix() -> None:
    plan = ParallelPlan(ring=2)
    with pytest.raises(UnsupportedModelError) as err:
        validate(SDXL, plan, {}, _groups(plan))
    assert "CFG" in err.value.fix


def test_plan_must_match_groups() -> None:
    with pytest.raises(ConfigError):
        validate(FLUX, ParallelPlan(cfg=2), {"num_heads": 24}, _groups(ParallelPlan(ulysses=2)))


def test_world_size_one_returns_patcher_unchanged() -> None:
    patcher = object()
    assert parallelize(patcher, FLUX, ParallelPlan(), _groups(ParallelPlan())) is patcher  # type: ignore[arg-type]


def test_controlnet_is_refused_for_families_without_control_residuals() -> None:
    def executor(*args: object, **kwargs: object) -> str:
        return "ran"

    refuse = make_control_wrapper(False, "Chroma")
    assert refuse(executor, None, None, None, None, None, {}) == "ran"
    with pytest.raises(UnsupportedModelError, match="ControlNet .* Chroma") as err:
        refuse(executor, None, None, None, None, {"input": []}, {})
    assert err.value.field == "parallel_strategy" and "CFG" in err.value.fix
    assert FLUX.control_residuals and SD3.control_residuals and HUNYUAN_DIT.control_residuals
    assert not (SDXL.control_residuals or PIXART.control_residuals)  # PixArt: ComfyUI has no ControlNet for it
