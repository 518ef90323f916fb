"""The ring-attention kernels return a true log-sum-exp, and a zero-LSE backend is refused.

yunchang's TORCH_MATH / TORCH_CUDNN return lse = 0, which makes ring > 1 silently wrong; ``verify_lse``
is what keeps such a backend out.
"""

from __future__ import annotations

import math

import pytest
import torch

from xdit_multigpu.errors import ConfigError
from xdit_multigpu.parallel.kernels import reference_attention, select_kernel, verify_lse

pytestmark = pytest.mark.unit


def test_cpu_kernel_matches_logsumexp_of_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 32, generator=gen) for n in (9, 13, 13))
    scale = 1 / math.sqrt(32)
    kernel = select_kernel(torch.device("cpu"), torch.float32, 32)
    out, lse = kernel(q, k, v, scale)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    assert lse.shape == (2, 4, 9)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    verify_lse(kernel, torch.device("cpu"), torch.float32, 32)


def test_split_keys_merge_exactly_with_lse() -> None:
    """What ring attention does: two key blocks merged through their LSEs equal one full pass."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen) for n in (5, 12, 12))
    kernel = select_kernel(torch.device("cpu"), torch.float32, 16)
    s = 0.25
    o1, l1 = kernel(q, k[:, :7], v[:, :7], s)
    o2, l2 = kernel(q, k[:, 7:], v[:, 7:], s)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (torch.exp(x - lse).transpose(1, 2).unsqueeze(-1) for x in (l1, l2))
    full, _ = kernel(q, k, v, s)
    torch.testing.assert_close(w1 * o1 + w2 * o2, full, atol=1e-5, rtol=1e-5)


def test_zero_lse_backend_is_refused() -> None:
    def zero_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = reference_attention(q, k, v, scale)
        return out, torch.zeros_like(lse)

    with pytest.raises(ConfigError, match="log-sum-exp"):
        verify_lse(zero_lse, torch.device("cpu"), torch.float32, 32)


def test_yunchang_math_backend_would_be_refused() -> None:
    yk = pytest.importorskip("yunchang.kernels.attention")

    def yunchang_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return yk.pytorch_attn_forward(q, k, v, softmax_scale=scale, causal=False, op_type="math")

    with pytest.raises(ConfigError):
        verify_lse(yunchang_math, torch.device("cpu"), torch.float32, 32)
