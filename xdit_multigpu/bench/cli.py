"""``python -m xdit_multigpu.bench``: the GPU benchmark (see ``docs/benchmarks.md`` for the method).

For each model x size: ComfyUI's stock sampler on 1 GPU (a fresh process, ``stock.py``), then the
engine users run on 1 GPU (a one-device pool) and on 2 / 4 GPUs for each strategy, with per-step
latency, speedups vs our 1-GPU path and vs stock, a 28-step end-to-end time, peak memory per rank,
pool start and dispatch overhead; then (optional) diffusers' own context parallelism on the same
architecture. Writes ``<out>/bench.json``; ``python -m xdit_multigpu.bench.report`` renders it.

    python -m xdit_multigpu.bench --out DIR [--models flux-dev sd35-large] [--sizes 1024 2048]
        [--gpus 1 2 4] [--repeats 5] [--quick] [--profile] [--no-side-by-side]
    python -m xdit_multigpu.bench --out DIR --cpu-selfcheck      # CI: tiny models on 2 CPU ranks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from .realsize import ARCHS, REAL

SCHEMA = "xdit-bench/1"
log = logging.getLogger("xdit_multigpu.bench")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m xdit_multigpu.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (bench.json, latents/)")
    ap.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--gpus", type=int, nargs="+", default=None, help="device counts (1 = our one-device pool)")
    ap.add_argument("--strategies", nargs="+", default=["Hybrid"], choices=["Hybrid", "USP", "CFG"])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per row (median of their intervals)")
    ap.add_argument("--e2e-sizes", type=int, nargs="*", default=None, help="sizes that also get a 28-step run")
    ap.add_argument("--e2e-steps", type=int, default=28)
    ap.add_argument("--e2e-repeats", type=int, default=1,
                    help="28-step requests per engine row (median; odd counts give a measured value)")
    ap.add_argument("--model-dir", default=os.environ.get("XDIT_BENCH_MODEL_DIR", "/tmp/xdit_bench_models"))
    ap.add_argument("--quick", action="store_true", help="flux-dev only, 1 and 4 GPUs, 3 repeats, no side-by-side")
    ap.add_argument("--profile", action="store_true", help="one extra profiled request per row (rank 0 summary)")
    ap.add_argument("--no-side-by-side", action="store_true", help="skip diffusers context parallelism")
    ap.add_argument("--side-by-side-only", action="store_true",
                    help="run only diffusers' context parallelism (to split a GPU session into shorter calls)")
    ap.add_argument("--no-ab", dest="ab", action="store_false",
                    help="skip the A/B rows (largest device count again with XDIT_SHARD_TEXT=0 XDIT_FUSED_ULYSSES=0)")
    ap.add_argument("--graphs-ab", action="store_true",
                    help="also run every device count's Hybrid rows with XDIT_CUDA_GRAPHS=off (CUDA graphs A/B)")
    ap.add_argument("--warm-start-ab", action="store_true",
                    help="also run every device count's Hybrid rows, 28-step image included, with "
                         "XDIT_CUDA_GRAPHS_WARM_START=0 (CUDA graph warm start A/B)")
    ap.add_argument("--chunks-ab", type=int, nargs="*", default=[], metavar="N",
                    help="also run every multi-device Hybrid row with XDIT_ULYSSES_CHUNKS=N for each N "
                         "(fused Ulysses head chunks: communication/compute overlap A/B)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("XDIT_BENCH_BUDGET_S", "450")),
                    help="optional parts (later models, side-by-side) are skipped once this much time has passed")
    ap.add_argument("--ulysses-degrees", type=int, nargs="*", default=[], metavar="N",
                    help="also run USP rows with ulysses_degree=N on every multi-device count (Ulysses N x Ring rest)")
    ap.add_argument("--dispatch-repeats", type=int, default=5,
                    help="1-step requests per row for the steady-state dispatch figure (0: none)")
    ap.add_argument("--cpu-selfcheck", action="store_true", help="tiny Flux/SD3 on cpu:1 / cpu:2, 1 repeat (CI)")
    args = ap.parse_args(argv)
    _defaults(args)
    return args


def _defaults(a: argparse.Namespace) -> None:
    if a.cpu_selfcheck:
        a.models = a.models or ["tiny-flux", "tiny-sd3"]
        a.sizes, a.gpus = a.sizes or [128], a.gpus or [1, 2]
        a.repeats = a.repeats or 1
        a.dispatch_repeats = min(a.dispatch_repeats, 2)
        a.e2e_sizes = a.sizes if a.e2e_sizes is None else a.e2e_sizes
        a.e2e_steps, a.no_side_by_side, a.device = min(a.e2e_steps, 2), True, "cpu"
        return
    a.device = "cuda"
    if a.quick:
        a.models = a.models or ["flux-dev"]
        a.gpus, a.repeats, a.no_side_by_side = a.gpus or [1, 4], a.repeats or 3, True
    a.models = a.models or ["flux-dev", "sd35-large"]
    a.gpus = a.gpus or [1, 2, 4]
    a.repeats = a.repeats or 5
    a.e2e_sizes = [min(a.sizes or [1024])] if a.e2e_sizes is None else a.e2e_sizes


DEFAULT_SIZES = {"flux-dev": [1024, 2048]}  # the others: 1024 only unless --sizes is given (time budget)
SELF_CHECK_GPUS = {"tiny-sd3": [2]}  # CPU self-check: SD3 runs CFG parallel only (one pool less, < 60 s)


def gpus_for(model: str, args: argparse.Namespace) -> list[int]:
    if args.cpu_selfcheck and model in SELF_CHECK_GPUS and args.gpus == [1, 2]:
        return SELF_CHECK_GPUS[model]
    return list(args.gpus)


def sizes_for(model: str, args: argparse.Namespace) -> list[int]:
    """``--sizes`` when given, else the model's default sizes."""
    return list(args.sizes) if args.sizes else DEFAULT_SIZES.get(model, [1024])


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": platform.python_version(),
                           "torch": torch.__version__, "cuda": torch.version.cuda, "host_cpus": os.cpu_count()}
    from importlib import metadata

    for mod, dist_name in (("ray", "ray"), ("yunchang", "yunchang"), ("diffusers", "diffusers"), ("xfuser", "xfuser"),
                           ("flash_attn", "flash-attn"), ("huggingface_hub", "huggingface-hub")):
        try:  # metadata only: importing xfuser (or flash-attn) could touch CUDA in this GPU-free driver
            env[mod] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            env[mod] = None
    env["git_commit"] = _cmd(["git", "rev-parse", "--short", "HEAD"])
    env["comfyui_path"] = os.environ.get("COMFYUI_PATH")
    if args.device == "cuda":
        env["gpus"] = (_cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
                       or "").splitlines()
        env["topology"] = _cmd(["nvidia-smi", "topo", "-m"])
    return env


def _cmd(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def _run_child(argv: list[str], args: argparse.Namespace, tag: str, timeout: float) -> dict[str, Any]:
    """A child process that prints ``<tag> {json}``; its error tail when it fails."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, *argv], env=_child_env(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(tag + " ")]
    if r.returncode != 0 or not lines:
        return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-3000:]}"}
    out = json.loads(lines[-1].split(" ", 1)[1])
    out["child_s"] = round(time.perf_counter() - t0, 1)
    return out


def write_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model file (written once into --model-dir; on GPU 0 in a child, the driver stays off the GPU)."""
    os.makedirs(args.model_dir, exist_ok=True)
    if args.device == "cpu":
        from .realsize import write_model as write

        return write(ARCHS[name], args.model_dir, device="cpu")
    code = ("import json,os,sys;from xdit_multigpu.worker.bootstrap import import_comfy;"
            "import_comfy(os.environ['COMFYUI_PATH'], cpu=True);"
            "from xdit_multigpu.bench.realsize import ARCHS, write_model;"
            f"print('MODEL_JSON '+json.dumps(write_model(ARCHS[{name!r}], {args.model_dir!r}, 'cuda')))")
    return _run_child(["-c", code], args, "MODEL_JSON", 1800)


def stock(name: str, model: dict[str, Any], sizes: list[int], args: argparse.Namespace) -> dict[str, Any]:
    job = {"model": name, "path": model["path"], "unet_config_json": model.get("unet_config_json"),
           "sizes": sizes, "repeats": args.repeats, "e2e_sizes": [s for s in sizes if s in args.e2e_sizes],
           "e2e_steps": args.e2e_steps, "device": args.device, "latents": args.latents,
           "tiny_vae_dir": args.model_dir if args.cpu_selfcheck else None}
    return _run_child(["-m", "xdit_multigpu.bench.stock", json.dumps(job)], args, "STOCK_JSON", 1800)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    args.latents = os.path.join(args.out, "latents")
    os.makedirs(args.latents, exist_ok=True)
    from ..worker.bootstrap import import_comfy

    import_comfy(os.environ["COMFYUI_PATH"], cpu=True)  # the driver, like ComfyUI's process here, uses no GPU
    report: dict[str, Any] = {"schema": SCHEMA, "environment": environment(args), "models": {},
                              "options": {k: v for k, v in vars(args).items() if k != "latents"}}
    path = os.path.join(args.out, "bench.json")
    from .engine_rows import make_engine
    from .runner import run_all

    engine = make_engine()
    try:
        run_all(engine, args, report, lambda: _save(path, report, t_start), t_start)
    finally:
        engine.release_all()
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    from .summary import summarize

    report["summary"] = summarize(report)
    _save(path, report, t_start)
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {path} in {report['total_s']} s")
    return 0


def _save(path: str, report: dict[str, Any], t_start: float) -> None:
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


__all__ = ["REAL", "gpus_for", "main", "parse", "sizes_for", "stock", "write_model"]
