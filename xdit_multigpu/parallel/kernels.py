"""Attention kernels that return a real log-sum-exp, for ring attention.

Ring attention merges partial results with their LSE: a backend that returns zeros instead (yunchang's
TORCH_MATH / TORCH_CUDNN) is *silently wrong* whenever ring > 1. Every kernel here therefore returns the
true ``logsumexp(q k^T * scale)`` and ``verify_lse`` probes a kernel once per (device, dtype) before use.

Shapes (yunchang's convention): q ``(B, Sq, H, D)``, k/v ``(B, Sk, H, D)`` -> out ``(B, Sq, H, D)``,
lse ``(B, H, Sq)`` float32.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch

from ..errors import ConfigError

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_HALF = (torch.float16, torch.bfloat16)


def _cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, is_causal=False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def _cuda_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, scale=scale
    )[:2]
    # The efficient kernel pads the LSE's sequence dim to a multiple of 32.
    return out.transpose(1, 2), lse[..., : q.shape[1]]


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn import flash_attn_func  # noqa: PLC0415  (optional dependency)

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=True)
    return out, lse


def select_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    """The fastest LSE-returning kernel for this device / dtype."""
    if device.type == "cpu":
        return _cpu
    if device.type != "cuda":
        raise ConfigError(
            "gpu_devices", f"sequence parallel attention has no kernel for {device.type}", "Use CUDA GPUs or CPU ranks"
        )
    if dtype in _HALF and head_dim <= 256:
        return _flash_attn if _HAS_FLASH_ATTN else _cuda_flash
    return _cuda_efficient


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain fp32 math (out, lse) in the kernel convention; the ground truth for ``verify_lse``."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float())
    return out.to(q.dtype), lse


def verify_lse(kernel: Kernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Raise ConfigError unless ``kernel``'s LSE matches ``logsumexp`` of the scores.

    Runs on a tiny fixed input (same on every rank, so every rank passes or fails together, before
    any collective of the attention call starts).
    """
    gen = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(1, n, 2, head_dim, generator=gen).to(device, dtype) for n in (5, 7, 7))
    scale = 1.0 / math.sqrt(head_dim)
    _, lse = kernel(q, k, v, scale)
    _, ref = reference_attention(q, k, v, scale)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if lse.shape != ref.shape or not torch.allclose(lse.float(), ref, atol=tol, rtol=tol):
        raise ConfigError(
            "attention backend",
            f"{getattr(kernel, '__name__', kernel)} returns a wrong log-sum-exp on {device} {dtype} "
            f"(max error {(lse.float() - ref).abs().max().item() if lse.shape == ref.shape else 'shape'}); "
            "ring attention would silently give wrong images",
            "Use Ulysses only (ring 1) or install flash-attn",
        )
