"""The executor interface: run one named worker method on every rank, bounded by a timeout.

Two implementations share it (vLLM's shape): ``RayExecutor`` (one Ray actor per device) and
``LocalExecutor`` (the one-device fallback, in-process). The engine never touches torch.distributed
or Ray directly; it only calls ``collective_rpc``.
"""

from __future__ import annotations

import abc
from typing import Any

DEFAULT_RPC_TIMEOUT_S = 600.0  # one sampling call; overridden per call


class Executor(abc.ABC):
    """Runs ``Worker`` methods on all ranks.

    ``collective_rpc`` returns one result per rank, in rank order, or raises ``WorkerError`` /
    ``WorkerTimeout`` (after which the executor is unusable: the engine shuts it down and rebuilds).
    """

    world_size: int

    @abc.abstractmethod
    def collective_rpc(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,
        per_rank_args: list[tuple[Any, ...]] | None = None,
    ) -> list[Any]:
        """Call ``Worker.<method>(*args, **kwargs)`` on every rank concurrently.

        ``per_rank_args`` (one tuple per rank) replaces ``args`` when ranks need different arguments.
        """

    @abc.abstractmethod
    def check_health(self, timeout: float = 10.0) -> None:
        """Raise ``WorkerError`` if any rank is dead or unresponsive."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release every worker (idempotent, never raises, never blocks for long)."""
