"""The prefetch's CUDA path (pinned staging buffers, per-thread streams, events) on a real GPU.

The unit tests run the same chunk logic on the CPU (``staged=True``); here the copies really are
asynchronous: the state dict must equal ``safetensors``' reading bit for bit, live on the GPU, and give
its memory back (device buffer and pinned staging memory) once dropped.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_cuda_prefetch_equals_safetensors_and_frees_its_memory(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from xdit_multigpu.worker.prefetch import Prefetch

    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(1 << 18 if i % 2 else 333, generator=g).to(dt)
          for i, dt in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn] * 4)}
    sd["flag"] = torch.tensor([True, False])
    path = str(tmp_path / "m.safetensors")
    save_file(sd, path, metadata={"k": "v"})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    # pinned blocks owned by torch's host allocator, cached ones included (older torch: no such stats)
    pinned_before = torch.cuda.host_memory_stats()["allocated_bytes.current"] if hasattr(
        torch.cuda, "host_memory_stats") else None
    p = Prefetch.start(path, "cuda:0", threads=3, chunk_bytes=100_000)  # chunks smaller than most tensors
    got, meta = p.result(timeout=120)
    assert meta == {"k": "v"} and p.facts()["prefetch_gbps"] > 0
    ref = load_file(path)
    for k, t in ref.items():
        assert got[k].device.type == "cuda" and got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].cpu().view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), k
    del got
    assert not p.buffer_alive()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    if pinned_before is not None:  # the staging buffers went back (not only to torch's pinned cache)
        assert torch.cuda.host_memory_stats()["allocated_bytes.current"] <= pinned_before
