"""The benchmark's schedule: per model, write the file once, stock baseline, then one pool per device
count serving every size and strategy; side by side last. Later models and the side-by-side part are
skipped (with the reason recorded) once ``--budget-s`` has passed, so the slowest parts are optional.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import DeviceKind
from .engine_rows import load_stock_latent, run_model
from .realsize import ARCHS

XFUSER_SKIP = ("xfuser's runnable entry points are diffusers pipelines (xFuserFluxPipeline ...) that load a whole "
               "model directory (text encoders, tokenizers, VAE) and its default attention needs flash-attn; the "
               "transformer-only comparison at the same size is diffusers' context parallelism above")


def run_all(engine: Any, args: Any, report: dict[str, Any], save: Callable[[], None], t_start: float) -> None:
    from .cli import gpus_for, sizes_for, stock, write_model

    kind = DeviceKind.CPU if args.device == "cpu" else DeviceKind.CUDA

    def over() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for i, name in enumerate([] if args.side_by_side_only else args.models):
        if i > 0 and over():
            report["models"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) used up"}
            continue
        arch, sizes = ARCHS[name], sizes_for(name, args)
        m = report["models"][name] = {"arch": {"config_class": arch.config_class, "heads": arch.heads, "cfg": arch.cfg,
                                               "notes": arch.notes}, "sizes": sizes, "engine": {}}
        t0 = time.perf_counter()
        m["file"] = write_model(name, args)
        save()
        if "error" in m["file"]:
            continue
        m["stock"] = stock(name, m["file"], sizes, args)
        save()
        latents = {s: load_stock_latent(args.latents, arch, s) for s in sizes}
        for n in gpus_for(name, args):
            m["engine"][str(n)] = run_model(engine, arch, m["file"], n, kind, args, latents, sizes)
            save()
        m["model_s"] = round(time.perf_counter() - t0, 1)
    if args.no_side_by_side and not args.side_by_side_only:
        report["side_by_side"] = {"skipped": "--no-side-by-side (or --quick / --cpu-selfcheck)"}
    elif over():
        report["side_by_side"] = {"skipped": f"time budget ({args.budget_s:.0f} s) used up"}
    else:
        from .sidebyside import run as run_side

        report["side_by_side"] = run_side(args)
    report.setdefault("side_by_side", {})["xfuser"] = {"skipped": XFUSER_SKIP}
    save()
