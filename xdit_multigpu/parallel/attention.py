"""Sequence-parallel self-attention as a ComfyUI ``optimized_attention_override``.

ComfyUI's ``wrap_attn`` calls ``override(func, q, k, v, heads, mask=..., skip_reshape=...,
skip_output_reshape=..., transformer_options=..., **kw)`` with ``func`` the active backend; we return
what ``func`` would. Layouts: ``skip_reshape=True`` -> q/k/v ``(B, H, S, D)`` (Flux); otherwise
``(B, S, H*D)`` (MMDiT). Output ``(B, S, H*D)``, or ``(B, H, S, D)`` with ``skip_output_reshape``.

Contract on entry (see ``sequence.py``): the sequence is ``[text (T, replicated) | local image shard]``,
``[local text shard | local image shard]`` (``state.text_sharded``) or the local image shard alone. On
exit: the same rows, exactly as one device computing attention over ``[text | full image]`` would give
them. Paths:

* **Fused Ulysses** (uniform local sequence, i.e. sharded or no text; ring == 1; even shards; no mask):
  ``ulysses.FusedUlysses``: one all-to-all for q/k/v, the host's own ``func``, one all-to-all back.
* **USP** (even shards, no mask, heads % ulysses == 0): yunchang ``LongContextAttention`` (Ulysses
  all-to-all x ring) on the image tokens (and sharded text). Replicated text queries ride along with the
  local image queries; replicated text keys/values (head-sliced per Ulysses rank) join the first ring
  step only, so each is counted once in the softmax. The kernel returns a real LSE (``kernels.py``).
* **All-gather** (uneven shards, a mask, or heads not divisible): gather the image K/V over the
  sequence group and run the host's own ``func`` on local queries vs full keys; exact, more memory.

Calls whose key length differs from their query length (cross-attention) or that are not sharded
self-attention run ``func`` unchanged: their queries are local and their keys complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..config import AttentionBackend
from ..errors import ConfigError
from .comm import all_gather_uneven
from .groups import ParallelGroups
from .kernels import Kernel, select_kernel, verify_lse
from .sequence import SequenceState, state_of
from .tuning import Tuning
from .ulysses import FusedUlysses

log = logging.getLogger(__name__)
# (kernel, device, dtype, head dim) whose LSE ``verify_lse`` accepted, for the whole process: the check
# syncs with the host, which must not happen inside a CUDA graph capture (a request's first call may be
# captured when an earlier request ran its shape, see ``worker/graphs.py``), and its answer cannot change.
_LSE_VERIFIED: set[tuple[str, str, torch.dtype, int]] = set()


class FirstStepJoint:
    """yunchang / xfuser ``attn_processor`` around one of our LSE kernels; with text K/V, prepends them
    on the first ring step only (every ring step sees a different image K/V block; text must enter the
    softmax once)."""

    def __init__(self, kernel: Kernel, text_k: torch.Tensor | None, text_v: torch.Tensor | None) -> None:
        self.kernel, self.text_k, self.text_v = kernel, text_k, text_v
        self.pending = text_k is not None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 softmax_scale: float | None = None, causal: bool = False, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if causal or dropout_p:
            raise ValueError("sequence parallel attention supports neither causal masks nor dropout")
        if self.pending:
            k, v = torch.cat((self.text_k, k), dim=1), torch.cat((self.text_v, v), dim=1)
            self.pending = False
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        return self.kernel(q, k, v, scale)


def bind_long_context_attention(cls: type, ulysses_pg: Any, ring_pg: Any, **kwargs: Any) -> torch.nn.Module:
    """``cls(**kwargs)`` -- yunchang's ``LongContextAttention`` or xfuser's subclass -- bound to *our* groups.

    Its constructor reads yunchang's ``PROCESS_GROUP`` singleton; we swap our groups in only for the
    constructor and restore the previous values, then set the attributes explicitly, so a later plan
    (or another pack using yunchang) is unaffected.
    """
    from yunchang.globals import PROCESS_GROUP  # noqa: PLC0415  (heavy import, only with SP)

    saved = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = ulysses_pg, ring_pg
    try:
        attn = cls(**kwargs)
    finally:
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = saved
    attn.ulysses_pg, attn.ring_pg = ulysses_pg, ring_pg
    return attn


class SequenceAttention:
    """The distributed attention of one parallelised patcher (state-free between calls)."""

    def __init__(self, groups: ParallelGroups, tuning: Tuning | None = None,
                 backend: AttentionBackend = AttentionBackend.YUNCHANG) -> None:
        tuning = tuning or Tuning()
        self.groups = groups
        plan = groups.plan
        self.ulysses = plan.ulysses
        uly_pg, ring_pg = groups.ulysses or groups.solo, groups.ring or groups.solo
        self._xfuser = None
        self._usp = None
        if backend is AttentionBackend.XFUSER:
            from .xfuser_attention import XFuserUSP  # noqa: PLC0415  (optional dependency)

            try:
                self._xfuser = XFuserUSP(uly_pg, ring_pg, plan.ring, self.kernel_for)
            except ImportError as e:
                raise ConfigError(
                    "XDIT_ATTENTION_BACKEND", f"is xfuser, but xfuser's attention cannot be loaded here ({e})",
                    "pip install xfuser (with its GPU dependencies), or unset XDIT_ATTENTION_BACKEND",
                ) from e
        else:
            from yunchang.hybrid.attn_layer import LongContextAttention  # noqa: PLC0415  (heavy, only with SP)

            self._usp = bind_long_context_attention(LongContextAttention, uly_pg, ring_pg, attn_type=None,
                                                    attn_processor=None)
        # ring == 1 on the default backend: one fused all-to-all for q/k/v and the host's own kernel.
        self.fused = None
        if tuning.fused_ulysses and plan.ring == 1 and plan.ulysses > 1 and self._xfuser is None:
            self.fused = FusedUlysses(groups.ulysses, plan.ulysses, tuning.ulysses_chunks)
        self._warned_fallback = False

    def kernel_for(self, q: torch.Tensor) -> Kernel:
        kernel = select_kernel(q.device, q.dtype, q.shape[-1])
        key = (f"{kernel.__module__}.{kernel.__qualname__}", str(q.device), q.dtype, q.shape[-1])
        if self.groups.plan.ring > 1 and key not in _LSE_VERIFIED:
            verify_lse(kernel, q.device, q.dtype, q.shape[-1])
            _LSE_VERIFIED.add(key)
        return kernel

    def usp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int) -> torch.Tensor:
        """q/k/v ``(B, T + L_local, H, D)`` ([text | image]) -> same layout, exact over the full image."""
        if self._xfuser is not None:
            return self._xfuser(q, k, v, text)
        heads = q.shape[2]
        per = heads // self.ulysses
        h0 = self.groups.ulysses_rank * per
        text_k = k[:, :text, h0 : h0 + per].contiguous() if text else None
        text_v = v[:, :text, h0 : h0 + per].contiguous() if text else None
        # Text queries go *after* the image queries: Ulysses splits the sequence dim evenly per rank
        # and the order of query rows does not matter; the output is reordered back below.
        query = torch.cat((q[:, text:], q[:, :text]), dim=1).contiguous()
        proc = FirstStepJoint(self.kernel_for(q), text_k, text_v)
        self._usp.attn_processor = proc
        try:
            out = self._usp(query, k[:, text:].contiguous(), v[:, text:].contiguous())
        finally:
            self._usp.attn_processor = None
        if proc.pending:
            raise RuntimeError("sequence parallel attention: text keys were never used (no ring step ran)")
        local = q.shape[1] - text
        return torch.cat((out[:, local:], out[:, :local]), dim=1)

    def gather_kv(self, state: SequenceState, k: torch.Tensor, v: torch.Tensor, text: int, seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full ``[text | image]`` K and V from the local shards (exact fallback path); sharded text
        rows are gathered too."""
        assert state.shard is not None
        sizes, group = state.shard.sizes, self.groups.sp
        text_sizes = (text,) * len(sizes) if state.text_sharded and text else None

        def full(x: torch.Tensor) -> torch.Tensor:
            img = all_gather_uneven(x.narrow(seq_dim, text, x.shape[seq_dim] - text), seq_dim, sizes, group)
            txt = x.narrow(seq_dim, 0, text)
            if text_sizes is not None:
                txt = all_gather_uneven(txt.contiguous(), seq_dim, text_sizes, group)
            return torch.cat((txt, img), dim=seq_dim)

        return full(k), full(v)

    def note_fallback(self, why: str) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            log.info("xDiT: sequence-parallel attention uses the exact all-gather path (%s)", why)


def _to_bshd(x: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:  # (B, H, S, D)
        return x.transpose(1, 2)
    # (B, S, H*D); MMDiT passes v as (B, S, H, D), which ComfyUI's backends also accept via reshape
    return x.reshape(x.shape[0], x.shape[1], heads, -1)


def _from_bshd(x: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return x.transpose(1, 2)
    b, s, h, d = x.shape
    return x.reshape(b, s, h * d)


def slice_mask_rows(mask: torch.Tensor | None, state: SequenceState, text: int) -> torch.Tensor | None:
    """Rows of a full ``[text | image] x [text | image]`` mask for this rank's ``[text | local]`` queries.

    Columns stay whole because the fallback path gives every rank the full key sequence.
    """
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    shard = state.shard
    assert shard is not None
    text_full, text_start = (text * len(shard.sizes), text * shard.index) if state.text_sharded else (text, 0)
    if mask.shape[-2] != text_full + shard.full:
        raise ValueError(f"attention mask has {mask.shape[-2]} query rows, expected {text_full} text + {shard.full} image")
    start = text_full + shard.offset
    rows = torch.cat((torch.arange(text_start, text_start + text), torch.arange(start, start + shard.local))).to(mask.device)
    return mask.index_select(mask.ndim - 2, rows)


def make_attention_override(attn: SequenceAttention) -> Callable[..., torch.Tensor]:
    """The function to store as ``transformer_options["optimized_attention_override"]``.

    A closure (not a bound method): ComfyUI deep-copies ``model_options`` on every patcher clone and
    ``deepcopy`` keeps functions as they are, while it would copy a bound method's instance (and with
    it the process groups).
    """

    def override(func: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 mask: torch.Tensor | None = None, skip_reshape: bool = False, skip_output_reshape: bool = False,
                 transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        def host(k_: torch.Tensor, v_: torch.Tensor, mask_: torch.Tensor | None) -> torch.Tensor:
            return func(q, k_, v_, heads, mask=mask_, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, transformer_options=transformer_options, **kwargs)

        state = state_of(transformer_options)
        seq = 2 if skip_reshape else 1
        if state is None or not state.active or k.shape[seq] != q.shape[seq]:
            return host(k, v, mask)  # not sharded, or cross-attention: local queries, complete keys
        text = state.text_tokens_in(q.shape[seq])
        if text is None:
            raise RuntimeError(
                f"sequence parallel: a self-attention over {q.shape[seq]} tokens is neither text {state.text_len} "
                f"+ local image {state.shard.local if state.shard else '?'} nor the local image alone"
            )
        assert state.shard is not None
        if not state.shard.even:
            reason = f"image tokens {list(state.shard.sizes)} are uneven"
        elif mask is not None:
            reason = "an attention mask is set"
        elif heads % attn.ulysses:
            reason = f"{heads} heads do not divide over ulysses {attn.ulysses}"
        else:
            # Sharded text (or no text) makes the local sequence uniform: plain Ulysses / USP over it.
            uniform = text == 0 or state.text_sharded
            if uniform and attn.fused is not None:
                return attn.fused(func, q, k, v, heads, skip_reshape, skip_output_reshape,
                                  {"transformer_options": transformer_options, **kwargs})
            out = attn.usp(_to_bshd(q, heads, skip_reshape), _to_bshd(k, heads, skip_reshape),
                           _to_bshd(v, heads, skip_reshape), 0 if uniform else text)
            return _from_bshd(out.to(q.dtype), skip_output_reshape)
        attn.note_fallback(reason)
        k_full, v_full = attn.gather_kv(state, k, v, text, seq)
        return host(k_full, v_full, slice_mask_rows(mask, state, text))

    return override
