"""The groups benchmark's CPU self-check (tiny SD3, ``cpu:2`` vs ``cpu:1|cpu:1``), so the GPU command
cannot rot: it must run end to end through the engine, split the batch over both groups and produce the
same latents as the one-group layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import COMFYUI_PATH, REPO

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
pytest.importorskip("ray")


def test_groups_benchmark_cpu_selfcheck(tmp_path):
    env = {**os.environ, "COMFYUI_PATH": COMFYUI_PATH}
    cmd = [sys.executable, "-m", "xdit_multigpu.bench.groups", "--cpu", "--out", str(tmp_path / "out"),
           "--models", str(tmp_path / "models")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "groups.json").read_text())
    rows = {r["layout"]: r for r in result["rows"]}
    assert set(rows) == {"cpu:2", "cpu:1|cpu:1"}
    assert rows["cpu:1|cpu:1"]["groups"] == 2 and "2 item(s), group 1 (1 CPU rank(s)): 2 item(s)" in rows["cpu:1|cpu:1"]["split"]
    assert rows["cpu:1|cpu:1"]["rel_l2_vs_first_layout"] <= 1e-5
    assert all(r["images_per_s"] > 0 for r in rows.values())
