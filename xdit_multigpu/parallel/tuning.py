"""Performance switches of the sequence-parallel path (all on by default; env vars turn them off for
A/B measurements, read once per parallelised patcher in the worker).

* ``XDIT_SHARD_TEXT=0``: keep joint-attention text tokens replicated on every rank (xDiT's scheme)
  instead of sharding them with the image tokens (diffusers' scheme). Sharded text means every
  per-token layer (projections, MLPs, modulation) runs on T/sp text rows instead of T.
* ``XDIT_FUSED_ULYSSES=0``: with ring == 1, use yunchang's ``LongContextAttention`` (four all-to-alls,
  LSE kernel) instead of ``ulysses.FusedUlysses`` (one all-to-all for q/k/v, the host's kernel, one back).
* ``XDIT_ULYSSES_CHUNKS=auto|N``: head chunks per fused Ulysses call, pipelined so that the all-to-alls
  of one chunk overlap the attention of another (``ulysses.chunks_for``; 1 = no overlap).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import env_flag
from ..errors import ConfigError


def _chunks(name: str) -> int:
    """``auto`` (or unset) -> 0, else a positive integer."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return 0
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ConfigError(name, f'is "{raw}"', "Set it to auto or to a whole number of chunks >= 1 (1: no overlap), or unset it")


@dataclass(frozen=True)
class Tuning:
    shard_text: bool = True
    fused_ulysses: bool = True
    ulysses_chunks: int = 0  # 0: auto

    @classmethod
    def from_env(cls) -> Tuning:
        return cls(shard_text=env_flag("XDIT_SHARD_TEXT", True), fused_ulysses=env_flag("XDIT_FUSED_ULYSSES", True),
                   ulysses_chunks=_chunks("XDIT_ULYSSES_CHUNKS"))
