"""The executor interface: run one named worker method on every rank, bounded by a timeout.

Two implementations share it (vLLM's shape): ``RayExecutor`` (one Ray actor per device) and
``LocalExecutor`` (the one-device fallback, in-process). The engine never touches torch.distributed
or Ray directly; it only calls ``collective_rpc``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_RPC_TIMEOUT_S = 600.0  # one sampling call; overridden per call


@dataclass(frozen=True)
class ProgressHook:
    """Where rank 0's sampling progress goes while ``collective_rpc`` waits (the caller's thread).

    ``update(step, total, preview)``: ``step`` is 1-based (as ComfyUI's progress bar counts),
    ``preview`` is None or a small CPU latent (rank 0's x0, first batch item, float16 numpy array).
    ``preview_interval_s``: None sends no preview latents; else at most one per interval.
    An exception from ``update`` (e.g. ComfyUI's interrupt) stops the workers and is re-raised.
    """

    update: Callable[[int, int, Any], None]
    preview_interval_s: float | None = None


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
        on_progress: ProgressHook | None = None,
    ) -> list[Any]:
        """Call ``Worker.<method>(*args, **kwargs)`` on every rank concurrently.

        ``per_rank_args`` (one tuple per rank) replaces ``args`` when ranks need different arguments.
        ``on_progress``: rank 0's method gets a ``progress=(step, total, x0)`` reporter and every report
        reaches ``on_progress.update`` on the caller's thread while the call runs.
        """

    @abc.abstractmethod
    def check_health(self, timeout: float = 10.0) -> None:
        """Raise ``WorkerError`` if any rank is dead or unresponsive."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release every worker (idempotent, never raises, never blocks for long)."""
