"""Parsing of node inputs into frozen config (pure: no ComfyUI, no processes)."""

import pytest

from xdit_multigpu.config import (
    DeviceKind,
    DeviceSet,
    ParallelPlan,
    ParallelStrategy,
    parse_encoder_device,
)
from xdit_multigpu.errors import ConfigError, NotYetAvailableError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "visible", "kind", "ids"),
    [
        ("0,1,2,3", 4, DeviceKind.CUDA, (0, 1, 2, 3)),
        (" 2, 3 ", 4, DeviceKind.CUDA, (2, 3)),
        ("cuda:1,cuda:0", 2, DeviceKind.CUDA, (1, 0)),
        ("all", 3, DeviceKind.CUDA, (0, 1, 2)),
        ("all", 0, DeviceKind.CUDA, ()),
        ("cpu", 0, DeviceKind.CPU, (0,)),
        ("CPU:4", 0, DeviceKind.CPU, (0, 1, 2, 3)),
        ("5,6", None, DeviceKind.CUDA, (5, 6)),  # joining a remote cluster: range checked by workers
    ],
)
def test_device_set_parses(text, visible, kind, ids):
    ds = DeviceSet.parse(text, visible)
    assert (ds.kind, ds.ids, ds.world_size) == (kind, ids, len(ids))
    assert ds.backend == ("nccl" if kind is DeviceKind.CUDA else "gloo")


@pytest.mark.parametrize(
    ("text", "visible", "needle"),
    [
        ("", 4, "is empty"),
        ("   ", 4, "is empty"),
        ("0,,1", 4, "malformed"),
        ("0;1", 4, "malformed"),
        ("gpu0", 4, "malformed"),
        ("-1", 4, "malformed"),
        ("0,1,0", 4, "more than once"),
        ("0,4", 4, "GPU 4 is out of range: this machine has GPUs 0..3"),
        ("0", 0, "out of range: this machine has no CUDA GPU"),
        ("cpu:0", 0, "CPU ranks"),
        ("cpu:65", 0, "CPU ranks"),
    ],
)
def test_device_set_errors_name_field_and_fix(text, visible, needle):
    with pytest.raises(ConfigError) as err:
        DeviceSet.parse(text, visible)
    msg = str(err.value)
    assert msg.startswith("gpu_devices: ")
    assert needle in msg
    assert err.value.fix  # every error says how to fix it


def test_strategies_not_built_yet_say_so():
    for s in (ParallelStrategy.PIPEFUSION, ParallelStrategy.TENSOR):
        with pytest.raises(NotYetAvailableError, match="parallel_strategy: .* not yet available"):
            s.require_available()
    for s in (ParallelStrategy.HYBRID, ParallelStrategy.USP, ParallelStrategy.CFG):
        s.require_available()


def test_plan_rank_layout_cfg_outer_ulysses_inner():
    plan = ParallelPlan(cfg=2, ulysses=2, ring=2)
    assert plan.world_size == 8 and plan.sp == 4
    coords = [plan.coords(r) for r in range(8)]
    assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert plan.describe() == "cfg 2 x ulysses 2 x ring 2 on 8 device(s)"
    with pytest.raises(ValueError):
        ParallelPlan(cfg=0)


def test_encoder_device():
    assert parse_encoder_device("default", 0) is None
    assert parse_encoder_device("cpu", 0) == "cpu"
    assert parse_encoder_device("1", 2) == "cuda:1"
    assert parse_encoder_device("cuda:0", 1) == "cuda:0"
    with pytest.raises(ConfigError, match="^device: GPU 2 is out of range"):
        parse_encoder_device("2", 2)
    with pytest.raises(ConfigError, match="^device: "):
        parse_encoder_device("tpu", 2)


def test_package_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import sys, xdit_multigpu, xdit_multigpu.config, xdit_multigpu.models, xdit_multigpu.errors;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','ray','torch','yunchang','xfuser')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
