"""Process groups of one parallel plan, built on an already-initialised default group.

Layout (see ``ParallelPlan``): CFG outermost, Ulysses innermost::

    rank = cfg_rank * sp + sp_rank,   sp_rank = ring_rank * ulysses + ulysses_rank

so the sequence group of a CFG branch is a block of adjacent ranks, a Ulysses group is adjacent ranks
inside it, a ring group strides by ``ulysses`` and a CFG group strides by ``sp``.

Nothing here touches yunchang's (or xfuser's) module-level singletons: the groups are plain objects
handed to the attention module explicitly, so ``build`` can run again with another plan on the same
default group (cfg 2 x sp 2 one run, sp 4 the next) without re-initialising ``torch.distributed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from ..config import ParallelPlan
from ..errors import ConfigError
from .comm import ProcessGroup, new_group

log = logging.getLogger(__name__)


def _blocks(plan: ParallelPlan) -> dict[str, list[list[int]]]:
    """Rank lists of every group of every kind, in a fixed order (all ranks create them identically)."""
    sp, u, r = plan.sp, plan.ulysses, plan.ring
    out: dict[str, list[list[int]]] = {"sp": [], "ulysses": [], "ring": [], "cfg": []}
    for c in range(plan.cfg):
        base = c * sp
        out["sp"].append([base + i for i in range(sp)])
        for ring_rank in range(r):
            out["ulysses"].append([base + ring_rank * u + i for i in range(u)])
        for uly_rank in range(u):
            out["ring"].append([base + j * u + uly_rank for j in range(r)])
    for sp_rank in range(sp):
        out["cfg"].append([c * sp + sp_rank for c in range(plan.cfg)])
    return out


@dataclass
class ParallelGroups:
    """The process groups and coordinates of one rank under ``plan``.

    Group fields are None when their degree is 1 (no communication needed). ``*_ranks`` are the global
    ranks of this rank's group of that kind, in group-rank order (length 1 when the degree is 1).
    ``solo`` is a one-rank group used where a library needs a real group object for a degree of 1
    (yunchang treats ``None`` as the whole world).
    """

    plan: ParallelPlan
    rank: int
    world_size: int
    sp: ProcessGroup | None = None
    ulysses: ProcessGroup | None = None
    ring: ProcessGroup | None = None
    cfg: ProcessGroup | None = None
    solo: ProcessGroup | None = None
    sp_cpu: ProcessGroup | None = None  # gloo twin of ``sp`` under NCCL: small host-side checks, no device sync
    sp_ranks: tuple[int, ...] = ()
    ulysses_ranks: tuple[int, ...] = ()
    ring_ranks: tuple[int, ...] = ()
    cfg_ranks: tuple[int, ...] = ()
    _owned: list[ProcessGroup] = field(default_factory=list, repr=False)

    @property
    def cfg_rank(self) -> int:
        return self.plan.coords(self.rank)[0]

    @property
    def ring_rank(self) -> int:
        return self.plan.coords(self.rank)[1]

    @property
    def ulysses_rank(self) -> int:
        return self.plan.coords(self.rank)[2]

    @property
    def sp_rank(self) -> int:
        return self.rank % self.plan.sp

    @classmethod
    def build(cls, plan: ParallelPlan, rank: int, world_size: int, timeout_s: float) -> ParallelGroups:
        """Collective over the default process group: every rank calls it with the same plan.

        Creates only the groups whose degree is > 1 (plus a one-rank group when sequence parallelism
        mixes a degree of 1 with a degree > 1). Raises ConfigError if the plan does not fit the world.
        """
        if not dist.is_initialized():
            raise ConfigError("parallel_plan", "torch.distributed is not initialised", "Start the workers first")
        if plan.world_size != world_size or dist.get_world_size() != world_size:
            raise ConfigError(
                "parallel_plan",
                f"{plan.describe()} needs {plan.world_size} ranks but the group has "
                f"{world_size} (torch.distributed reports {dist.get_world_size()})",
                "Choose degrees whose product equals the number of devices",
            )
        if not 0 <= rank < world_size:
            raise ConfigError("rank", f"rank {rank} is outside 0..{world_size - 1}", "Pass the worker's rank")
        g = cls(plan=plan, rank=rank, world_size=world_size)
        degrees = {"sp": plan.sp, "ulysses": plan.ulysses, "ring": plan.ring, "cfg": plan.cfg}
        for kind, blocks in _blocks(plan).items():
            mine = next(b for b in blocks if rank in b)
            setattr(g, f"{kind}_ranks", tuple(mine))
            if degrees[kind] == 1:
                continue
            for ranks in blocks:  # every rank creates every group, in the same order
                pg = new_group(ranks, timeout_s)
                g._owned.append(pg)
                if rank in ranks:
                    setattr(g, kind, pg)
        if plan.sp > 1 and dist.get_backend() == "nccl":
            g._build_sp_cpu(plan, timeout_s)
        if plan.sp > 1 and (plan.ulysses == 1 or plan.ring == 1):
            for r in range(world_size):
                pg = new_group([r], timeout_s)
                g._owned.append(pg)
                if r == rank:
                    g.solo = pg
        return g

    def _build_sp_cpu(self, plan: ParallelPlan, timeout_s: float) -> None:
        """Gloo twins of the sequence groups (host-side shape checks without a device sync). Optional:
        if gloo cannot form here, the checks run on the NCCL group as before."""
        try:
            for ranks in _blocks(plan)["sp"]:
                pg = new_group(ranks, timeout_s, backend="gloo")
                self._owned.append(pg)
                if self.rank in ranks:
                    self.sp_cpu = pg
        except (RuntimeError, ValueError) as e:
            log.warning("xDiT: no gloo twin of the sequence group (%s); shape checks use NCCL", e)
            self.sp_cpu = None

    def destroy(self) -> None:
        """Release this plan's groups (every rank calls it, e.g. before building another plan)."""
        for pg in self._owned:
            dist.destroy_process_group(pg)
        self._owned.clear()
        self.sp = self.ulysses = self.ring = self.cfg = self.solo = self.sp_cpu = None

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: {self.plan.describe()}; cfg_rank {self.cfg_rank}, "
            f"sp ranks {list(self.sp_ranks)}, ulysses ranks {list(self.ulysses_ranks)}, "
            f"ring ranks {list(self.ring_ranks)}, cfg ranks {list(self.cfg_ranks)}"
        )
