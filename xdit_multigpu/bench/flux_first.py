"""First GPU run of the parallel engine on Flux.1-dev at real size (random weights, bf16).

For each image size: ComfyUI's own sampler on 1 GPU (a subprocess, exactly what a user gets on one
GPU) and the engine (Ray pool, ComfyUI's sampler on every rank) on 2 and 4 GPUs. Per-step latency is
the slope between a short and a long run (pool start, dispatch and noise are paid by both, so they
cancel); the long run's latent is compared with the 1-GPU latent (bf16: max abs and relative L2).

    python -m xdit_multigpu.bench --out DIR [--sizes 1024 2048] [--gpus 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

STEPS = (2, 6)  # short and long run; per-step = (t_long - t_short) / (long - short)


def _sample_once(sample_fn, steps: int, size: int, seed: int = 1) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = sample_fn(steps, size, seed)
    return time.perf_counter() - t0, out


def baseline(args: argparse.Namespace) -> int:
    """Child process: ComfyUI's own sampler on one GPU (cuda:0 of CUDA_VISIBLE_DEVICES)."""
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(os.environ["COMFYUI_PATH"], cpu=False)
    import comfy.sample

    from xdit_multigpu.config import LoaderKind, LoadSpec
    from xdit_multigpu.worker import comfy_runtime

    from .realsize import flux_conditioning

    t0 = time.perf_counter()
    patcher = comfy_runtime.load_diffusion_model(LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, args.model_file))
    load_s = time.perf_counter() - t0
    pos, neg = flux_conditioning()
    result: dict[str, Any] = {"load_s": round(load_s, 1), "sizes": {}}

    def run(steps: int, size: int, seed: int) -> Any:
        latent = torch.zeros(1, 16, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", pos, neg, latent, seed=seed,
                                  disable_pbar=True)
        torch.cuda.synchronize()
        return out

    for size in args.sizes:
        run(1, size, 0)  # warm-up (model to GPU, kernels)
        times = {s: _sample_once(run, s, size) for s in STEPS}
        per_step = (times[STEPS[1]][0] - times[STEPS[0]][0]) / (STEPS[1] - STEPS[0])
        torch.save(times[STEPS[1]][1], os.path.join(args.out, f"latent_1gpu_{size}.pt"))
        result["sizes"][size] = {"per_step_ms": round(per_step * 1000, 1),
                                 "run_s": {s: round(t, 3) for s, (t, _) in times.items()},
                                 "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print("BASELINE_JSON " + json.dumps(result), flush=True)
    return 0


def engine_runs(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """The engine on GPUs 0..n-1 (driver process never touches a GPU)."""
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
    from xdit_multigpu.engine.engine import get_engine
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.models import lookup

    from .realsize import FLUX_DEV, flux_conditioning

    spec = DispatcherSpec(LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, args.model_file),
                          DeviceSet.parse(",".join(map(str, range(n))), n), ParallelStrategy(args.strategy),
                          family="flux")
    pos, neg = flux_conditioning()
    engine = get_engine()
    model_spec = lookup("Flux")
    out: dict[str, Any] = {"sizes": {}}
    fallback = _host_model(args, out) if n == max(args.gpus) else None

    def run(steps: int, size: int, seed: int) -> Any:
        latent = torch.zeros(1, 16, size // 8, size // 8)
        req = SampleRequest(noise=comfy.sample.prepare_noise(latent, seed), latent_image=latent, positive=pos,
                            negative=neg, seed=seed, steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple")
        res = engine.sample(spec, req, model_spec, FLUX_DEV["num_heads"], False, fallback)
        if res.fallback_reason:
            raise RuntimeError(f"engine fell back: {res.fallback_reason}")
        out["plan"] = res.plan.describe()
        return res.latent

    t0 = time.perf_counter()
    engine.pool(spec)
    out["pool_start_s"] = round(time.perf_counter() - t0, 1)
    for size in args.sizes:
        run(1, size, 0)
        times = {s: _sample_once(run, s, size) for s in STEPS}
        per_step = (times[STEPS[1]][0] - times[STEPS[0]][0]) / (STEPS[1] - STEPS[0])
        ref = torch.load(os.path.join(args.out, f"latent_1gpu_{size}.pt")).float()
        got = times[STEPS[1]][1].float()
        out["sizes"][size] = {
            "per_step_ms": round(per_step * 1000, 1), "run_s": {s: round(t, 3) for s, (t, _) in times.items()},
            "max_abs_diff": float((got - ref).abs().max()), "rel_l2": float((got - ref).norm() / ref.norm()),
            "ref_max_abs": float(ref.abs().max()), "finite": bool(torch.isfinite(got).all()),
        }
    engine.release_all()
    return out


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _host_model(args: argparse.Namespace, out: dict[str, Any]) -> Any:
    """The MODEL as ComfyUI's process holds it (stock loader, CPU): what it costs in RAM."""
    import comfy.sd

    before = _rss_gb()
    patcher = comfy.sd.load_diffusion_model(args.model_file)
    out["host_rss_model_gb"] = round(_rss_gb() - before, 1)
    out["host_model_device"] = str(next(patcher.model.parameters()).device)
    return patcher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-file", default="/tmp/flux1-dev-random.safetensors")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--strategy", default="Hybrid")
    ap.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.baseline_child:
        return baseline(args)

    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(os.environ["COMFYUI_PATH"], cpu=True)  # the driver, like ComfyUI's process, uses no GPU
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "steps": STEPS,
                              "gpus": smi.stdout.strip().splitlines(), "python": sys.version.split()[0]}
    from .realsize import write_random_flux_dev

    child_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    gen = subprocess.run([sys.executable, "-c", "import os,json,sys;"
                          "from xdit_multigpu.worker.bootstrap import import_comfy;"
                          "import_comfy(os.environ['COMFYUI_PATH'], cpu=True);"
                          "from xdit_multigpu.bench.realsize import write_random_flux_dev as w;"
                          f"print(json.dumps(w({args.model_file!r})))"], env=child_env, capture_output=True, text=True)
    report["model_file"] = gen.stdout.strip().splitlines()[-1] if gen.returncode == 0 else gen.stderr[-2000:]
    _save(args, report)
    r = subprocess.run([sys.executable, "-m", "xdit_multigpu.bench", "--baseline-child", "--out", args.out,
                        "--model-file", args.model_file, "--sizes", *map(str, args.sizes)],
                       env=child_env, capture_output=True, text=True, timeout=900)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("BASELINE_JSON ")]
    report["1gpu"] = json.loads(line[-1].split(" ", 1)[1]) if line else {"error": r.stderr[-3000:]}
    _save(args, report)
    for n in args.gpus:
        try:
            report[f"{n}gpu"] = engine_runs(args, n)
        except Exception as e:  # noqa: BLE001  (report what failed, keep the other rows)
            report[f"{n}gpu"] = {"error": f"{type(e).__name__}: {e}"}
        _save(args, report)
    print(json.dumps(report, indent=1))
    return 0


def _save(args: argparse.Namespace, report: dict[str, Any]) -> None:
    with open(os.path.join(args.out, "flux_first.json"), "w") as f:
        json.dump(report, f, indent=1)
