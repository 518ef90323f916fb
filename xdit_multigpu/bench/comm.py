"""``python -m xdit_multigpu.bench.comm``: how fast this machine's GPUs run the all-to-alls of Ulysses.

The sequence-parallel step of a DiT is its compute divided by the ranks plus, per attention layer,
one all-to-all of q/k/v and one of the output (``parallel/ulysses.py``). This measures exactly those
two messages for a model and image size, per NCCL setting, so a slow interconnect (or an NCCL setting
worth changing) shows up before a whole benchmark: ``torch.distributed.all_to_all_single`` of bf16
buffers, every rank released by a barrier and a device sync before each timed call (no skew between
ranks in the number), CUDA events, median over ``--repeats`` calls after warm-up.

    python -m xdit_multigpu.bench.comm --gpus 4 --tokens 4608 16896 [--hidden 3072] \
        [--variant default] [--variant NCCL_P2P_NVL_CHUNKSIZE=2097152 ...] [--out comm.json]

Each ``--variant`` (``default``, or comma-separated ``NAME=VALUE`` environment settings) runs in its own
``torch.distributed.run`` launch, since NCCL reads its environment when the communicator is created.
Per call it prints the median time and the bus bandwidth (bytes each rank sends to the others / time).
Defaults: Flux.1-dev (hidden 3072, 512 text tokens) at 1024² and 2048² (4,608 and 16,896 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

TAG = "COMM_JSON "


def _time_call(dist: Any, torch: Any, rows: int, width: int, world: int, repeats: int, cuda: bool) -> dict[str, Any]:
    """Median ms of one all-to-all of a ``(rows, width)`` bf16 buffer (this rank's share of the tokens)."""
    # Flat, as Ulysses splits by heads (the width), not by rows: any row count works.
    send = torch.randn(rows * width, device="cuda" if cuda else "cpu", dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    for _ in range(3):
        dist.all_to_all_single(recv, send)
    times = []
    for _ in range(repeats):
        dist.barrier()
        if not cuda:  # CPU ranks (gloo): the self-check of this tool
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append((time.perf_counter() - t0) * 1000)
            continue
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dist.all_to_all_single(recv, send)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    sent = send.numel() * send.element_size() * (world - 1) / world  # bytes leaving this rank
    return {"rows": rows, "width": width, "mb": round(send.numel() * 2 / 1e6, 2), "ms": round(ms, 4),
            "busbw_gbps": round(sent / (ms / 1000) / 1e9, 1)}


def child(tokens: list[int], hidden: int, repeats: int, cuda: bool) -> None:
    """One rank of a ``torch.distributed.run`` launch; rank 0 prints the results after ``TAG``."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if hidden % world:
        raise SystemExit(f"--hidden {hidden} does not divide by {world} ranks (Ulysses splits the heads)")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    out = []
    for t in tokens:
        rows = t // world
        out.append({"tokens": t, "qkv": _time_call(dist, torch, rows, 3 * hidden, world, repeats, cuda),
                    "out": _time_call(dist, torch, rows, hidden, world, repeats, cuda)})
    if rank == 0:
        print(TAG + json.dumps({"world": world, "results": out}), flush=True)
    dist.destroy_process_group()


def _env_of(variant: str) -> dict[str, str]:
    if variant == "default":
        return {}
    pairs = [p.split("=", 1) for p in variant.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].startswith("NCCL_") for p in pairs):
        raise SystemExit(f"--variant {variant!r}: use 'default' or NCCL_NAME=VALUE[,NCCL_NAME=VALUE]")
    return {k.strip(): v.strip() for k, v in pairs}


def launch(variant: str, gpus: int, tokens: list[int], hidden: int, repeats: int, timeout_s: float,
           cpu: bool = False) -> dict[str, Any]:
    env = {**os.environ, **_env_of(variant)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m",
            "xdit_multigpu.bench.comm", "--child", "--tokens", *map(str, tokens), "--hidden", str(hidden),
            "--repeats", str(repeats)] + (["--cpu"] if cpu else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(TAG)]
    if r.returncode != 0 or not lines:
        return {"variant": variant, "error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-2000:]}"}
    return {"variant": variant, "launch_s": round(time.perf_counter() - t0, 1), **json.loads(lines[-1][len(TAG):])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xdit_multigpu.bench.comm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4608, 16896], help="full sequence lengths")
    ap.add_argument("--hidden", type=int, default=3072, help="heads x head dim")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--variant", action="append", default=None, help="'default' or NCCL_X=V[,NCCL_Y=W]")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--cpu", action="store_true", help="CPU ranks over gloo (checks the tool, not a machine)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.tokens, a.hidden, a.repeats, not a.cpu)
        return 0
    results = [launch(v, a.gpus, a.tokens, a.hidden, a.repeats, a.timeout_s, a.cpu) for v in a.variant or ["default"]]
    for res in results:
        if "error" in res:
            print(f"{res['variant']}: {res['error']}")
            continue
        for r in res["results"]:
            print(f"{res['variant']:<48} {r['tokens']:>6} tokens  qkv {r['qkv']['mb']:>7} MB {r['qkv']['ms']:>8.3f} ms "
                  f"{r['qkv']['busbw_gbps']:>6} GB/s   out {r['out']['ms']:>7.3f} ms {r['out']['busbw_gbps']:>6} GB/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpus": a.gpus, "tokens": a.tokens, "hidden": a.hidden, "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
