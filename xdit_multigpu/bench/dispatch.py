"""Where one engine request's dispatch overhead goes: a phase table, driver and ranks.

    python -m xdit_multigpu.bench.dispatch                        # 2 CPU ranks, tiny Flux, Flux-sized request
    python -m xdit_multigpu.bench.dispatch --devices 0,1,2,3 --model flux-dev   # GPUs, real-size Flux

Dispatch overhead = the driver's wall time for one ``Engine.sample`` request minus rank 0's time inside
``Worker.sample`` (what the benchmark's engine rows report as ``dispatch_ms``). The request is Flux-shaped
at ``--size`` (default 1024²): T5 context 1x512x4096 and pooled 1x768 in fp32 for positive and negative,
noise and latent 1x16x128x128 fp32 (~18 MB). On CPU the model is a tiny Flux that takes that context.
Two kinds of request: ``fresh`` (new conditioning every time, as the benchmark sends it) and ``reuse``
(the conditioning and latent of the request before with new noise: ComfyUI re-queued with a new seed,
its conditioning from ComfyUI's cache, which the ranks still hold: ``executor.kept``).

Driver stamps come from wrappers around the executor's steps, installed in this process only; rank
stamps from ``BenchWorker`` (``t_in`` / ``t_out`` around ``Worker.sample``). Same machine: one clock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

Stamp = tuple[str, float, float, Any]  # (what, start, end, rank or None), time.time()

# The phases, in request order: (name, what it covers). "rank 0 sample" is not dispatch.
PHASES = (
    ("before call", "Engine.sample until the executor packs: plan, pool lookup, request"),
    ("pack", "request tensors wrapped (out-of-band; held ones compared and sent as keys)"),
    ("ray.put", "the request into the object store, once for every rank"),
    ("submit", "one actor call per rank"),
    ("to rank 0", "Ray delivers the call, rank 0 unpickles the request (held tensors: looked up)"),
    ("rank 0 sample", "inside Worker.sample (not dispatch)"),
    ("rank 0 back", "rank 0 returns -> its latent taken on the driver"),
    ("other ranks", "-> every result in (includes the progress hand-over)"),
    ("after call", "-> Engine.sample returns"),
    ("snapshot", "copy of the tensors sent, for the next call's compare (while rank 0 samples)"),
    ("rank start skew", "first to last rank entering Worker.sample"),
    ("drains (count)", "progress drains while rank 0 sampled (every 0.1 s, none after the results)"),
)


def _tiny_flux_t5() -> Any:
    """A tiny Flux whose text input is T5-wide (4096) and pooled 768: it takes a Flux-sized request."""
    from ..testing import tiny_models as tm
    from .realsize import Arch

    family = "flux_t5_wide"
    if family not in tm._RECIPES:
        tm.register_recipe(tm._Recipe(
            family, tm.DIFFUSION_MODELS, "unet", dict(tm._FLUX_TINY, context_in_dim=4096, vec_in_dim=768), "Flux",
            False, "bfloat16", dict(context_dim=4096, context_tokens=512, pooled_dim=768, latent_channels=16, heads=4),
            default=False))
    return Arch("tiny-flux-t5", {}, "Flux", 4, 16, 1.0, _flux_conditioning, explicit_config=True, tiny_family=family)


def _flux_conditioning(width: int, height: int) -> tuple[list, list]:  # noqa: ARG001  (no size conditioning)
    """New random Flux conditioning (as CLIPTextEncode + FluxGuidance make it), positive and negative."""
    import torch

    def one() -> list:
        return [[torch.randn(1, 512, 4096), {"pooled_output": torch.randn(1, 768), "guidance": 3.5}]]

    return one(), one()


@contextlib.contextmanager
def stamps() -> Iterator[list[Stamp]]:
    """Stamp the executor's steps in this process: pack, ray.put, the gather, each drain, each result."""
    import ray

    from ..executor import kept
    from ..executor.ray_executor import RayExecutor

    out: list[Stamp] = []
    targets = [(kept.SentTensors, "mark", "pack"), (ray, "put", "put"), (kept.SentTensors, "snapshot", "snapshot"),
               (RayExecutor, "_gather", "gather"), (RayExecutor, "_drain", "drain"), (RayExecutor, "_result", "result")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:  # _result(self, ref, rank, method): which rank
                out.append((name, t0, time.time(), args[2] if name == "result" else None))

        return wrapper

    for (owner, attr, name), (_, _, fn) in zip(targets, saved):
        setattr(owner, attr, timed(name, fn))
    try:
        yield out
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def phases(t0: float, t1: float, marks: list[Stamp], ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Milliseconds per phase of one request from the driver's stamps and every rank's t_in / t_out."""
    def first(name: str) -> Stamp:
        return next(s for s in marks if s[0] == name)

    def ms(a: float, b: float) -> float:
        return round((b - a) * 1000, 3)

    pack, snap, gather = first("pack"), first("snapshot"), first("gather")
    put = next((s for s in marks if s[0] == "put"), (None, pack[2], pack[2], None))  # one rank: no ray.put
    r0_back = next(s[2] for s in marks if s[0] == "result" and s[3] == 0)
    r0 = ranks[0]
    drains = [s for s in marks if s[0] == "drain"]
    row = {
        "before call": ms(t0, pack[1]), "pack": ms(pack[1], pack[2]), "ray.put": ms(put[1], put[2]),
        "submit": ms(put[2], gather[1]), "to rank 0": ms(gather[1], r0["t_in"]),
        "rank 0 sample": ms(r0["t_in"], r0["t_out"]), "rank 0 back": ms(r0["t_out"], r0_back),
        "other ranks": ms(r0_back, gather[2]), "after call": ms(gather[2], t1), "snapshot": ms(snap[1], snap[2]),
        "rank start skew": ms(min(r["t_in"] for r in ranks), max(r["t_in"] for r in ranks)),
        "drains (count)": len(drains), "drains (ms)": round(sum(e - s for _, s, e, _ in drains) * 1000, 3),
        "wall": ms(t0, t1),
    }
    row["dispatch"] = round(row["wall"] - row["rank 0 sample"], 3)
    return row


def _requests(arch: Any, size: int, steps: int, kind: str) -> Iterator[Any]:
    """Endless requests of ``kind``; every one has new noise (a new seed), as every ComfyUI run does."""
    import comfy.sample

    from .protocol import make_request

    base = make_request(arch, size, steps)
    seed = 1000
    while True:
        seed += 1
        if kind == "fresh":
            base = make_request(arch, size, steps)
        noise = comfy.sample.prepare_noise(base.latent_image, seed)
        yield dataclasses.replace(base, noise=noise, seed=seed)


def measure(bench: Any, arch: Any, args: argparse.Namespace, kind: str) -> list[dict[str, float]]:
    """``args.requests`` timed requests (after ``args.warmup``) of one kind; one phase row each."""
    rows = []
    source = _requests(arch, args.size, args.steps, kind)
    spec = bench.spec("Hybrid")
    for i in range(args.warmup + args.requests):
        req = next(source)
        with stamps() as marks:
            t0 = time.time()
            out = bench.engine.sample(spec, req, bench.model_spec, arch.heads, arch.cfg > 1.0, None)
            t1 = time.time()
        if out.fallback_reason:
            raise RuntimeError(f"the engine fell back to one device: {out.fallback_reason}")
        ranks = bench.engine.pool(spec).executor.collective_rpc("bench_stats", timeout=60)
        if i >= args.warmup:
            rows.append(phases(t0, t1, marks, ranks))
    return rows


def ray_floor(bench: Any, calls: int) -> dict[str, float]:
    """Ray's own round trip on this pool: a no-op call on every rank (``Worker.ping``), median and p25-p75
    ms over ``calls``; the part of dispatch that no request packing can remove."""
    executor = bench.engine.pool(bench.spec("Hybrid")).executor
    times = []
    for _ in range(calls + 2):
        t0 = time.perf_counter()
        executor.collective_rpc("ping", timeout=60)
        times.append((time.perf_counter() - t0) * 1000)
    return {"ping all ranks": summary([{"ms": t} for t in times[2:]])["ms"]}


def summary(rows: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """(median, 25th, 75th percentile) per phase; "inclusive": quartiles stay within the measured values."""
    out = {}
    for key in rows[0]:
        values = sorted(r[key] for r in rows)
        q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
        out[key] = (round(statistics.median(values), 2), round(q[0], 2), round(q[2], 2))
    return out


def table(results: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    """The phase table (ms, median and p25-p75) with one column per request kind."""
    kinds = list(results)
    notes = dict(PHASES)
    lines = [f"{'phase (ms)':<18}" + "".join(f"{k:>24}" for k in kinds) + "   what"]
    for key in next(iter(results.values())):
        cells = "".join(f"{v[0]:>10.2f} ({v[1]:6.2f}-{v[2]:6.2f})" for v in (results[k][key] for k in kinds))
        lines.append(f"{key:<18}{cells}   {notes.get(key, '')}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m xdit_multigpu.bench.dispatch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu:2", help="gpu_devices text: cpu:N or GPU indices such as 0,1,2,3")
    ap.add_argument("--model", default=None, help="a bench.realsize model (GPU), e.g. flux-dev; default: tiny Flux")
    ap.add_argument("--model-dir", default=os.environ.get("XDIT_BENCH_MODEL_DIR", tempfile.gettempdir()))
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--requests", type=int, default=15, help="timed requests per kind")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["fresh", "reuse"], choices=["fresh", "reuse"])
    ap.add_argument("--json", default=None, help="also write every request's phases here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("COMFYUI_PATH", os.path.join(os.path.dirname(__file__), "..", "..", ".host", "comfyui"))
    from ..config import DeviceKind, DeviceSet
    from ..worker.bootstrap import import_comfy

    import_comfy(os.environ["COMFYUI_PATH"], cpu=True)  # the driver, like ComfyUI's process here, uses no GPU
    from .engine_rows import EngineBench, make_engine
    from .realsize import ARCHS, write_model

    import torch

    if "|" in args.devices:
        raise SystemExit("--devices: one group only (the phases are those of one pool's call)")
    devices = DeviceSet.parse(args.devices, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    arch = ARCHS[args.model] if args.model else _tiny_flux_t5()
    written = write_model(arch, args.model_dir, device="cpu" if devices.kind is DeviceKind.CPU else "cuda")
    model = {"path": written["path"], "unet_config_json": written["unet_config_json"]}
    bench = EngineBench(make_engine(), arch, model, devices.world_size, devices.kind, args)
    bench.devices = devices  # the listed devices, not the first N
    results, raw = {}, {}
    try:
        print(f"pool start {bench.start():.1f} s on {devices.describe()}; {arch.name} at {args.size}², "
              f"{args.steps} step(s)", flush=True)
        for kind in args.kinds:
            raw[kind] = measure(bench, arch, args, kind)
            results[kind] = summary(raw[kind])
        floor = ray_floor(bench, args.requests)
    finally:
        bench.release()
    print(table(results))
    print("Ray floor: " + ", ".join(f"{k} {v[0]:.2f} ms ({v[1]:.2f}-{v[2]:.2f})" for k, v in floor.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": raw, "summary": results, "ray_floor": floor,
                       "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_max_direct")}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
