"""Parallel VAE bench: ComfyUI's tiled decode of a 4096x4096 image (latent 512x512) with the real-size Flux.1
VAE (random weights, in the dtype ComfyUI picks for the GPU) on one GPU, against the same decode with its
tiles spread over 2 and 4 GPUs (Load VAE (xDiT) ``parallel_devices``).

    source .device/setup.sh && python3 -m xdit_multigpu.bench.vae --out $OUT/vae       # 4 GPUs, < 3 min
    python3 -m xdit_multigpu.bench.vae --out DIR --tiny --slots 1 2                     # CPU smoke run

Tiles are those of the stock ``VAE Decode (Tiled)`` node's defaults (512 px, overlap 64 px). Each
configuration: one warm-up decode of a 1024x1024 image (CUDA contexts, kernels, device copies of the
VAE), then ``--repeats`` timed decodes (median reported). The parallel runs are timed with ComfyUI's
tiler blending on its output device (``host``, as the stock VAE) and on the VAE's GPU (``device``).
Every result is compared with the one-device result (max abs, relative L2, bit-equality). Writes
``vae.json`` under ``--out``; configurations that would overrun ``--budget-s`` are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for vae.json")
    ap.add_argument("--tiny", action="store_true", help="small SD-layout VAE on CPU slots, small image (tests)")
    ap.add_argument("--size", type=int, default=0, help="image side in pixels (default 4096, --tiny 256)")
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4], help="device counts to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=0, help="tile size in pixels (default 512, --tiny 64)")
    ap.add_argument("--overlap", type=int, default=0, help="tile overlap in pixels (default 64, --tiny 16)")
    ap.add_argument("--max-batch", type=int, default=1, help="tiles of equal shape decoded together per device")
    ap.add_argument("--blends", nargs="+", default=["host", "device"], choices=["host", "device"],
                    help="where ComfyUI's tiler blends on the parallel runs (XDIT_VAE_BLEND)")
    ap.add_argument("--budget-s", type=float, default=160.0, help="skip configurations that would end later")
    args = ap.parse_args(argv)
    args.size = args.size or (256 if args.tiny else 4096)
    args.tile = args.tile or (64 if args.tiny else 512)
    args.overlap = args.overlap or (16 if args.tiny else 64)
    return args


def _comfy(cpu: bool) -> None:
    from xdit_multigpu.worker.bootstrap import import_comfy

    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "..", ".host", "comfyui")
    import_comfy(os.environ.get("COMFYUI_PATH") or default, cpu=cpu)


def _sync(devices: list[str]) -> None:
    import torch

    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def _devices(n: int, tiny: bool) -> list[str]:
    return ["cpu"] * n if tiny else [f"cuda:{i}" for i in range(n)]


def _decoder(stock: Any, n: int, blend: str, args: argparse.Namespace) -> Any:
    """One device: ComfyUI's VAE as is. Several: the parallel VAE over the same model."""
    if n == 1:
        return stock
    from xdit_multigpu.config import VAEBlend, VAEParallelConfig
    from xdit_multigpu.engine.vae import parallelize

    cfg = VAEParallelConfig(devices=tuple(_devices(n, args.tiny)), max_batch=args.max_batch, blend=VAEBlend(blend))
    return parallelize(stock, cfg)


def _configs(args: argparse.Namespace) -> list[tuple[int, str]]:
    """One device first (the reference), then every device count with the first blend, then the others
    from the most devices down (if time runs short, what is skipped is the least informative)."""
    many = sorted((n for n in args.slots if n > 1))
    first = [(n, args.blends[0]) for n in many]
    rest = [(n, b) for b in args.blends[1:] for n in reversed(many)]
    return [(n, "host") for n in args.slots if n == 1] + first + rest


def _save(out_dir: str, report: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "vae.json"), "w") as f:
        json.dump(report, f, indent=1)


def _compare(ref: Any, out: Any) -> dict[str, Any]:
    diff = (out - ref).abs()
    return {
        "max_abs": float(diff.max()),
        "rel_l2": float((out - ref).norm() / ref.norm().clamp_min(1e-12)),
        "equal": bool(out.shape == ref.shape and (out == ref).all()),
        "finite": bool(out.isfinite().all()),
    }


def _time_config(vae: Any, lat: Any, warm: Any, devs: list[str], tiles: tuple[int, int], repeats: int) -> dict:
    import torch

    tile, overlap = tiles
    vae.decode_tiled(warm, tile_x=tile, tile_y=tile, overlap=overlap)
    cuda = [d for d in devs if d.startswith("cuda")]
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
    times, out = [], None
    for _ in range(repeats):
        _sync(devs)
        t0 = time.perf_counter()
        out = vae.decode_tiled(lat, tile_x=tile, tile_y=tile, overlap=overlap)
        _sync(devs)
        times.append(round(time.perf_counter() - t0, 3))
    peak = {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in cuda}
    return {"devices": devs, "times_s": times, "median_s": statistics.median(times), "peak_gib": peak, "out": out}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    _comfy(cpu=args.tiny)
    import comfy.utils
    import torch

    from xdit_multigpu.testing.tiny_vae import flux_vae, tiny_kl_vae

    if args.tiny:
        torch.set_num_threads(1)  # one intra-op thread per slot: CPU slots stand in for devices
    dev = torch.device("cpu" if args.tiny else "cuda:0")
    stock = tiny_kl_vae(device=dev) if args.tiny else flux_vae(device=dev)
    lat_side, tile, overlap = args.size // 8, args.tile // 8, args.overlap // 8
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(1, stock.latent_channels, lat_side, lat_side, generator=gen)
    warm = lat[:, :, : min(lat_side, 128), : min(lat_side, 128)].clone()
    steps = sum(comfy.utils.get_tiled_scale_steps(lat_side, lat_side, tx, ty, overlap)
                for tx, ty in ((tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2)))
    report: dict[str, Any] = {
        "device": "cpu" if args.tiny else torch.cuda.get_device_name(0),
        "gpus_visible": 0 if args.tiny else torch.cuda.device_count(), "torch": torch.__version__,
        "vae": "tiny SD-layout AutoencoderKL" if args.tiny else "Flux.1 VAE (ch 128, ch_mult 1,2,4,4, z 16), random",
        "dtype": str(stock.vae_dtype), "image": [args.size, args.size], "latent": list(lat.shape),
        "tile_px": args.tile, "overlap_px": args.overlap, "tiles": steps, "max_batch": args.max_batch,
        "repeats": args.repeats, "runs": [],
    }
    ref, last_s = None, 0.0
    with torch.inference_mode():
        for n, blend in _configs(args):
            if time.perf_counter() - t_start + last_s > args.budget_s:
                report.setdefault("skipped", []).append({"devices": n, "blend": blend, "why": "time budget"})
                continue
            t0 = time.perf_counter()
            res = _time_config(_decoder(stock, n, blend, args), lat, warm, _devices(n, args.tiny), (tile, overlap),
                               args.repeats)
            last_s = time.perf_counter() - t0
            out = res.pop("out")
            ref = out if ref is None else ref
            res.update(_compare(ref, out), blend=blend if n > 1 else "host (stock)")
            res["speedup"] = round(report["runs"][0]["median_s"] / res["median_s"], 2) if report["runs"] else 1.0
            report["runs"].append(res)
            _save(args.out, report)  # what ran survives a later failure
            print(f"[vae bench] {n} device(s), blend {blend}: median {res['median_s']:.2f} s, x{res['speedup']}, "
                  f"max abs {res['max_abs']:.3g}, rel {res['rel_l2']:.3g}, equal {res['equal']}, "
                  f"peak {res['peak_gib']}", flush=True)
    report["host_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.makedirs(args.out, exist_ok=True)
    report = run(args)
    _save(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    return 0 if all(r["finite"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
