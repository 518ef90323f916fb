"""The 1-device baseline: ComfyUI's own loader and sampler in a fresh process, without this pack's engine.

``python -m xdit_multigpu.bench.stock '<json job>'`` (started by the benchmark with
``CUDA_VISIBLE_DEVICES`` set to one GPU) prints one ``STOCK_JSON {...}`` line. It runs the same
protocol as the engine rows (``protocol.py``), with the same sampler call the workers make
(``comfy_runtime.run_sampler``: ``comfy.sample.sample`` under ``inference_mode``, as ComfyUI's executor
runs ``KSampler``), and also times ComfyUI's text encode (``text.py``) and VAE decode of the image for the
end-to-end figure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .timing import StepTimer, memory_stats, reset_peak


def run(job: dict[str, Any]) -> dict[str, Any]:
    from ..worker.bootstrap import import_comfy

    cuda = job["device"] == "cuda"
    import_comfy(os.environ["COMFYUI_PATH"], cpu=not cuda)
    import torch

    from ..config import LoaderKind, LoadSpec
    from ..worker import comfy_runtime
    from .protocol import make_request
    from .realsize import ARCHS, random_vae
    from .text import encode_s

    arch = ARCHS[job["model"]]
    t0 = time.perf_counter()
    load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, job["path"], unet_config_json=job.get("unet_config_json"))
    patcher = comfy_runtime.load_diffusion_model(load)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2), "sizes": {}}

    def sample(size: int, steps: int) -> tuple[Any, dict[str, Any]]:
        req = make_request(arch, size, steps)
        timer = StepTimer(cuda)
        timer.start()
        latent = comfy_runtime.run_sampler(patcher, req, callback=comfy_runtime.progress_callback(timer.callback(None)))
        timer.finish()
        return latent, timer.summary()

    text: dict[str, Any] | None = None  # text encode: once per model (it does not depend on the image size)
    for size in job["sizes"]:
        reset_peak(cuda)
        sample(size, 2)  # warm-up: weights to the device, kernels, allocator
        latent, timed = sample(size, job["repeats"] + 1)
        row: dict[str, Any] = {"per_step_ms": timed["median_ms"], "step_ms": timed["step_ms"],
                               "timed_wall_s": timed["wall_s"], "steps": job["repeats"] + 1,
                               "setup_ms": timed["setup_ms"]}
        torch.save(latent.float().cpu(), os.path.join(job["latents"], f"{arch.name}_{size}_stock.pt"))
        if size in job["e2e_sizes"]:
            latent28, run28 = sample(size, job["e2e_steps"])
            row["e2e_sampling_s"] = run28["wall_s"]
            row["vae_decode_s"] = _decode_s(lambda c: random_vae(c, job.get("tiny_vae_dir")), arch.vae_channels,
                                            latent28, cuda)
            if text is None:
                text = encode_s(arch.name, cuda)
            row.update(text)
        row.update(memory_stats(cuda))
        out["sizes"][str(size)] = row
    return out


def _decode_s(random_vae: Any, channels: int, latent: Any, cuda: bool) -> float:
    """ComfyUI's ``VAE.decode`` of the sampled latent (timed after a warm-up decode)."""
    import comfy.model_management as mm
    import torch

    vae = random_vae(channels)
    x = latent.float()  # comfy.sample.sample's output is what VAEDecode receives (latent_format applied)
    with torch.inference_mode():  # as ComfyUI's executor runs VAEDecode
        vae.decode(x[:, :, :16, :16])  # warm-up: weights to the device, kernels
        t0 = time.perf_counter()
        vae.decode(x)
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
    del vae
    mm.soft_empty_cache()
    return round(took, 3)


def main() -> int:
    job = json.loads(sys.argv[1])
    result = run(job)
    print("STOCK_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
