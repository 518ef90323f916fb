"""``LocalExecutor``: world size 1, the worker runs in this process on an existing ``ModelPatcher``.

This is the one-device fallback (vLLM's ``UniProcExecutor``): the same ``collective_rpc`` interface as
``RayExecutor``, so the engine drives both alike. There are no collectives in-process, so nothing can
wait on another rank; the call runs ComfyUI's own sampler on the caller's thread, where ComfyUI's
interrupt and out-of-memory handling apply unchanged. That is also why the sampler's own exceptions
(e.g. ``InterruptProcessingException``) are passed through as they are instead of being wrapped.
"""

from __future__ import annotations

from typing import Any

from ..errors import WorkerError
from .base import DEFAULT_RPC_TIMEOUT_S, Executor, ProgressHook


class LocalExecutor(Executor):
    """One in-process worker; ``collective_rpc`` returns ``[result]``."""

    world_size = 1

    def __init__(self, worker: Any) -> None:
        self._worker: Any = worker

    @classmethod
    def for_patcher(cls, patcher: Any) -> LocalExecutor:
        """Wrap the main process's MODEL (no copy, no reload)."""
        from ..worker.worker import Worker  # noqa: PLC0415

        return cls(Worker.from_patcher(patcher))

    def collective_rpc(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,  # noqa: ARG002  (no collective in-process; see module doc)
        per_rank_args: list[tuple[Any, ...]] | None = None,
        on_progress: ProgressHook | None = None,
    ) -> list[Any]:
        if self._worker is None:
            raise WorkerError(f"{method}: the local worker is shut down")
        if per_rank_args is not None:
            if len(per_rank_args) != 1:
                raise ValueError(f"per_rank_args has {len(per_rank_args)} entries for 1 rank")
            args = per_rank_args[0]
        fn = getattr(self._worker, method, None)
        if fn is None:
            raise WorkerError(f"{method}: the worker has no such method")
        kw = dict(kwargs or {})
        if on_progress is not None:
            # In-process: every step goes straight to the hook (x0 stays a tensor on its device).
            kw["progress"] = lambda step, total, x0: on_progress.update(
                step, total, x0 if on_progress.preview_interval_s is not None else None)
        return [fn(*args, **kw)]

    def check_health(self, timeout: float = 10.0) -> None:  # noqa: ARG002
        if self._worker is None:
            raise WorkerError("check_health: the local worker is shut down")

    def shutdown(self) -> None:
        # The patcher belongs to the ComfyUI graph: drop our reference, never free it.
        self._worker = None
