"""Throughput of GPU groups: one batch on the same GPUs as 1 group (all GPUs on every image) vs several
groups (the batch split over them), through the engine users run (Ray pools, ComfyUI's sampler).

    python3 -m xdit_multigpu.bench.groups --out $OUT/groups                 # GPU: flux-dev 1024², batch 8
    python3 -m xdit_multigpu.bench.groups --out DIR --cpu                    # CPU self-check (tiny SD3)

Layouts on 4 GPUs: ``0,1,2,3`` (1 x 4), ``0,1|2,3`` (2 x 2), ``0|1|2|3`` (4 x 1); on 8: 1 x 8, 2 x 4, 4 x 2. Each layout: one
untimed batch (pool start, warm-up), then ``--repeats`` timed batches; images / s from the median. The
batch result of every layout is compared with the 1 x 4 result (bf16: relative L2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

GPU_LAYOUTS = {8: ("0,1,2,3,4,5,6,7", "0,1,2,3|4,5,6,7", "0,1|2,3|4,5|6,7"),
               4: ("0,1,2,3", "0,1|2,3", "0|1|2|3"), 2: ("0,1", "0|1")}
CPU_LAYOUTS = ("cpu:2", "cpu:1|cpu:1")


def _largest_layout(gpus: int) -> int:
    """The largest device count with layouts that this machine can run (8, 4, 2; 0: none)."""
    return max((n for n in GPU_LAYOUTS if n <= gpus), default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, SchedulingStrategy
    from ..engine.engine import get_engine
    from ..models import lookup
    from .protocol import compare, make_request
    from .realsize import ARCHS, write_model

    arch = ARCHS["tiny-sd3" if args.cpu else args.model]
    gpus = 0 if args.cpu else torch.cuda.device_count()
    layouts = CPU_LAYOUTS if args.cpu else tuple(args.layouts or GPU_LAYOUTS.get(_largest_layout(gpus), ()))
    if not layouts:
        raise SystemExit(f"needs 2 or 4 GPUs, found {gpus}")
    written = write_model(arch, args.models, device="cpu" if args.cpu else "cuda")
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, written["path"], unet_config_json=written["unet_config_json"])
    req = make_request(arch, args.size, args.steps, batch=args.batch)
    model_spec = lookup(arch.config_class)
    engine = get_engine()
    rows, reference = [], None
    for text in layouts:
        spec = DispatcherSpec(load, DeviceSet.parse(text, gpus), scheduling=SchedulingStrategy.ROUND_ROBIN,
                              family=model_spec.name)
        t0 = time.perf_counter()
        first = engine.sample(spec, req, model_spec, arch.heads, arch.cfg != 1.0, None)
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = engine.sample(spec, req, model_spec, arch.heads, arch.cfg != 1.0, None)
            times.append(time.perf_counter() - t0)
            if out.fallback_reason is not None:
                raise RuntimeError(f"{text}: fell back to one device: {out.fallback_reason}")
        reference = out.latent if reference is None else reference
        rel = compare(out.latent, reference)["rel_l2"]
        med = statistics.median(times)
        rows.append({"layout": text, "groups": len(spec.device_groups()), "plan": first.plan.describe(),
                     "split": out.groups, "first_batch_s": round(warm_s, 2), "batch_s": [round(t, 3) for t in times],
                     "median_s": round(med, 3), "images_per_s": round(args.batch / med, 3), "rel_l2_vs_first_layout": rel})
        print(json.dumps(rows[-1]), flush=True)
        engine.release_all(stop_ray=False)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["throughput_vs_first_layout"] = round(r["images_per_s"] / base, 3)
    return {"model": arch.name, "size": args.size, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
            "device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "gpus": gpus, "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for groups.json")
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "xdit_bench_models"))
    ap.add_argument("--layouts", nargs="+", default=None, help='gpu_devices values to compare, e.g. "0,1,2,3" "0,1|2,3"')
    ap.add_argument("--cpu", action="store_true", help="CPU self-check: tiny SD3, cpu:2 vs cpu:1|cpu:1")
    args = ap.parse_args(argv)
    if args.cpu:
        args.size, args.batch, args.steps, args.repeats = min(args.size, 128), min(args.batch, 4), 2, 1
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.models, exist_ok=True)
    from ..worker.bootstrap import import_comfy

    import_comfy(os.environ["COMFYUI_PATH"], cpu=True)  # the driver, like ComfyUI's process, uses no GPU
    result = run(args)
    with open(os.path.join(args.out, "groups.json"), "w") as f:
        json.dump(result, f, indent=1)
    from ..engine.engine import release_all

    release_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
