"""Typed collectives used by the parallel layer.

Every function takes an explicit process group (never the default group implicitly) so that CFG and
sequence groups of one world can run side by side. ``group=None`` means "degree 1": the functions then
return their input without communicating. Groups are created by ``groups.py`` with a timeout, which
gloo honours, so a peer that died makes these raise instead of hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def split_sizes(total: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``parts`` contiguous shards of ``total`` items, ``torch.tensor_split`` style.

    The first ``total % parts`` shards hold one item more (81 over 2 -> (41, 40)); a shard may be empty
    when ``total < parts``.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def new_group(ranks: Sequence[int], timeout_s: float, backend: str | None = None) -> ProcessGroup:
    """``dist.new_group`` with a timeout; every rank of the default group must call it (same order).
    ``backend``: e.g. "gloo" for a host-side twin of an NCCL group (None: the default group's)."""
    return dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s), backend=backend)


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_uneven(x: torch.Tensor, dim: int, sizes: Sequence[int], group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order.

    ``sizes[i]`` is rank i's extent along ``dim`` (all ranks pass the same ``sizes``; the local tensor
    must match its own entry). Unequal sizes are padded to the largest and trimmed after the gather,
    because ``all_gather`` needs equal shapes. Other dimensions must agree across ranks.
    """
    if group is None:
        return x
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if len(sizes) != world:
        raise ValueError(f"all_gather_uneven: {len(sizes)} sizes for a group of {world} ranks")
    if x.shape[dim] != sizes[me]:
        raise ValueError(f"all_gather_uneven: rank {me} holds {x.shape[dim]} along dim {dim}, expected {sizes[me]}")
    width = max(sizes)
    if x.shape[dim] < width:
        pad_shape = list(x.shape)
        pad_shape[dim] = width - x.shape[dim]
        x = torch.cat((x, x.new_zeros(pad_shape)), dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def all_gather_sizes(values: Sequence[int], group: ProcessGroup | None) -> list[tuple[int, ...]]:
    """Every rank's small integer vector ``values`` (same length on all ranks), in group-rank order.

    Used to check that the ranks of a group agree on shapes before a collective that would hang or
    silently mix data if they did not.
    """
    if group is None:
        return [tuple(int(v) for v in values)]
    t = torch.tensor(list(values), dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return [tuple(int(v) for v in p.tolist()) for p in parts]


def broadcast_(x: torch.Tensor, src_rank: int, group: ProcessGroup | None) -> torch.Tensor:
    """In-place broadcast of ``x`` from global rank ``src_rank`` to the group; returns ``x``."""
    if group is None:
        return x
    if not x.is_contiguous():
        tmp = x.contiguous()
        dist.broadcast(tmp, src=src_rank, group=group)
        x.copy_(tmp)
        return x
    dist.broadcast(x, src=src_rank, group=group)
    return x
