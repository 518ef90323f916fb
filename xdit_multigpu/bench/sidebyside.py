"""Side-by-side runs of other engines on the same GPUs, after our rows (optional dependencies: a missing
one is recorded as skipped with the reason, never an error of the benchmark)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any


def run(args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if importlib.util.find_spec("diffusers") is None:
        out["diffusers_cp"] = {"skipped": "diffusers is not installed"}
        return out
    if "flux-dev" not in args.models:
        out["diffusers_cp"] = {"skipped": "flux-dev is not among --models"}
        return out
    from .cli import sizes_for

    sizes = sizes_for("flux-dev", args)
    counts = sorted({1, max(args.gpus)})  # 1 GPU and the largest count: the comparison that matters, in budget
    runs = []
    for n in counts:
        modes = ["none"] if n == 1 else ["ulysses", "ring"]
        runs.append(_launch(n, modes, sizes, args.repeats))
    out["diffusers_cp"] = {"runs": runs, "rows": [r for run in runs for r in run.get("rows", [])]}
    return out


def _launch(n: int, modes: list[str], sizes: list[int], repeats: int) -> dict[str, Any]:
    env = dict(os.environ)
    visible = [p for p in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:n] if len(visible) >= n else map(str, range(n)))
    tail = ["-m", "xdit_multigpu.bench.diffusers_cp", "--sizes", *map(str, sizes), "--repeats", str(repeats),
            "--modes", *modes]
    argv = [sys.executable, *tail] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *tail]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"gpus": n, "modes": modes, "error": "timed out after 900 s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("DIFFUSERS_JSON ")]
    if r.returncode != 0 or not lines:
        return {"gpus": n, "modes": modes, "error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-3000:]}"}
    res = json.loads(lines[-1].split(" ", 1)[1])
    res.update(gpus=n, modes=modes, launch_s=round(time.perf_counter() - t0, 1))
    return res
