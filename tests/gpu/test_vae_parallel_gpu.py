"""GPU tier: Load VAE (xDiT)'s parallel tiles on 2-4 GPUs vs ComfyUI's tiled VAE on GPU 0.

Expected: bit-identical (each tile is the same kernels on the same kind of GPU, blended by ComfyUI's own
tiler; blending on the GPU is float32 multiply / add / divide, which round the same as on the CPU).
Tolerance if a cuDNN heuristic picks another algorithm on another card: fp32 max abs 1e-5; bf16 (the
Flux VAE as ComfyUI runs it on these GPUs) relative L2 1e-2 (a few bf16 roundoffs; a misplaced tile is
O(1)). Each case prints whether it was exactly equal.
"""

from __future__ import annotations

import pytest

from tests.conftest import COMFYUI_PATH

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpus() -> int:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 GPUs")
    from xdit_multigpu.worker.bootstrap import import_comfy

    import_comfy(COMFYUI_PATH, cpu=False)
    return min(4, torch.cuda.device_count())


@pytest.fixture(scope="module")
def vaes(gpus):
    import torch

    from xdit_multigpu.testing.tiny_vae import flux_vae, tiny_kl_vae

    dev = torch.device("cuda", 0)
    return {"tiny_kl_fp32": tiny_kl_vae(device=dev, dtype=torch.float32), "flux": flux_vae(device=dev)}


def _check(name: str, ref, out, fp32: bool) -> None:
    diff = (out.float() - ref.float()).abs().max().item()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{name}: equal={bool((out == ref).all())} max_abs={diff:.3g} rel_l2={rel:.3g}")
    assert out.shape == ref.shape and ref.isfinite().all()
    assert diff <= 1e-5 if fp32 else rel <= 1e-2, (diff, rel)


@pytest.mark.parametrize("blend", ["host", "device"])
@pytest.mark.parametrize("arch", ["tiny_kl_fp32", "flux"])
def test_parallel_tiles_equal_comfy_tiled_on_one_gpu(gpus, vaes, arch, blend):
    import torch

    from xdit_multigpu.config import VAEBlend, VAEParallelConfig
    from xdit_multigpu.engine.vae import parallelize

    vae = vaes[arch]
    cfg = VAEParallelConfig(devices=tuple(f"cuda:{i}" for i in range(gpus)), blend=VAEBlend(blend))
    par = parallelize(vae, cfg)
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(1, vae.latent_channels, 100, 76, generator=gen)  # 800x608, many tiles per pass
    img = torch.rand(1, 600, 808, 3, generator=gen)
    with torch.inference_mode():
        ref = vae.decode_tiled(lat, tile_x=32, tile_y=32, overlap=8)
        out = par.decode_tiled(lat, tile_x=32, tile_y=32, overlap=8)
        _check(f"{arch} decode, {gpus} GPUs, blend {blend}", ref, out, arch.endswith("fp32"))
        ref = vae.encode_tiled(img, tile_x=256, tile_y=256, overlap=64)
        out = par.encode_tiled(img, tile_x=256, tile_y=256, overlap=64)
        _check(f"{arch} encode, {gpus} GPUs, blend {blend}", ref, out, arch.endswith("fp32"))
    assert out.device == ref.device  # blended on the GPU or not, the result is where ComfyUI wants it
