"""``python -m xdit_multigpu.bench.comm`` (the all-to-all probe of the Ulysses messages) on 2 CPU ranks:
it launches one ``torch.distributed.run`` per variant, times both messages per sequence length and writes
JSON with the right shapes; a variant that is not an NCCL setting is refused before any launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_comm_probe_on_cpu_ranks(tmp_path):
    out = tmp_path / "comm.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "xdit_multigpu.bench.comm", "--cpu", "--gpus", "2", "--tokens", "64", "130",
                        "--hidden", "96", "--repeats", "2", "--variant", "default", "--variant", "NCCL_PROTO=Simple",
                        "--out", str(out)], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [run["variant"] for run in data["runs"]] == ["default", "NCCL_PROTO=Simple"]
    for run in data["runs"]:
        assert "error" not in run, run
        assert run["world"] == 2 and [x["tokens"] for x in run["results"]] == [64, 130]
        for x in run["results"]:
            assert x["qkv"]["rows"] == x["tokens"] // 2 and x["qkv"]["width"] == 3 * 96 and x["out"]["width"] == 96
            assert x["qkv"]["ms"] > 0 and x["out"]["ms"] > 0
    bad = subprocess.run([sys.executable, "-m", "xdit_multigpu.bench.comm", "--cpu", "--variant", "PROTO=Simple"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "NCCL_NAME=VALUE" in (bad.stderr + bad.stdout)
