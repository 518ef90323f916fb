"""Side by side: diffusers' own context parallelism on ``FluxTransformer2DModel`` of Flux.1-dev's size.

One process per GPU, started torchrun-style (``python -m torch.distributed.run --standalone
--nproc-per-node N -m xdit_multigpu.bench.diffusers_cp ...``) by ``sidebyside.py``. Random bf16 weights
(diffusers' default init), the same token counts as our Flux rows (512 text + (size/16)^2 image
tokens, batch 1). Modes: ``none`` (1 GPU), ``ulysses`` / ``ring`` (``ContextParallelConfig`` with the
whole world on that axis; diffusers' Flux ``_cp_plan`` splits image *and* text tokens). A "step" here
is one transformer forward (Flux-dev at cfg 1 runs one per sampler step), timed with CUDA events:
median of ``repeats`` forwards after 2 warm-up forwards. Rank 0 prints ``DIFFUSERS_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

FLUX_DEV_DIFFUSERS = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                      "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                      "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}


def _inputs(size: int, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    side = size // 16
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]

    def r(*shape: int) -> Any:
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    return {"hidden_states": r(1, side * side, 64), "encoder_hidden_states": r(1, 512, 4096),
            "pooled_projections": r(1, 768), "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
            "img_ids": img_ids.reshape(-1, 3).to(device), "txt_ids": torch.zeros(512, 3, device=device),
            "guidance": torch.tensor([3.5], device=device, dtype=torch.bfloat16), "return_dict": False}


def _time_mode(mode: str, sizes: list[int], repeats: int, world: int, device: Any) -> list[dict[str, Any]]:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device(device):
        model = FluxTransformer2DModel(**FLUX_DEV_DIFFUSERS).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    if mode != "none":
        from diffusers import ContextParallelConfig

        cfg = ContextParallelConfig(ulysses_degree=world) if mode == "ulysses" else ContextParallelConfig(ring_degree=world)
        model.enable_parallelism(config=cfg)
    rows = []
    for size in sizes:
        x = _inputs(size, device)
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.inference_mode():
            for i in range(2 + repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(**x)
                b.record()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(a.elapsed_time(b))
        rows.append({"mode": mode, "gpus": world, "size": size, "per_step_ms": round(statistics.median(times), 3),
                     "step_ms": [round(t, 3) for t in times], "build_s": round(build_s, 1),
                     "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
    del model
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["none"])
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        try:
            rows.extend(_time_mode(mode, args.sizes, args.repeats, world, device))
        except Exception as e:  # noqa: BLE001  (one mode failing is a result too)
            rows.append({"mode": mode, "gpus": world, "error": f"{type(e).__name__}: {e}"[:2000]})
        if world > 1:
            dist.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        import diffusers

        print("DIFFUSERS_JSON " + json.dumps({"diffusers": diffusers.__version__, "rows": rows}), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
