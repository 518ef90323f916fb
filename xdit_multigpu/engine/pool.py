"""``WorkerPool``: the started workers of one ``DispatcherSpec`` (devices + model file + cluster).

Start = actors + process group + ``load_model`` on every rank, all inside one time budget. A pool is
used until its key changes or a call fails; then it is shut down (actors killed) and built anew.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..config import DispatcherSpec
from ..errors import ConfigError, WorkerError, WorkerTimeout
from ..executor.base import Executor, ProgressHook
from .request import SampleRequest

log = logging.getLogger("xdit_multigpu.pool")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(name, f'is "{raw}"', "Set it to a positive number of seconds, or unset it")
    return value


@dataclass(frozen=True)
class Timeouts:
    """Upper bounds (seconds) on everything that waits on a worker; env vars override the defaults."""

    start_s: float = 600.0  # XDIT_START_TIMEOUT_S: actors + imports + process group + model load
    sample_s: float = 3600.0  # XDIT_SAMPLE_TIMEOUT_S: one sampling call (all steps)
    collective_s: float = 600.0  # XDIT_COLLECTIVE_TIMEOUT_S: torch.distributed group timeout (second line)
    health_s: float = 30.0  # XDIT_HEALTH_TIMEOUT_S: ping before reusing a pool

    @classmethod
    def from_env(cls) -> Timeouts:
        d = cls()
        return cls(
            start_s=_env_seconds("XDIT_START_TIMEOUT_S", d.start_s),
            sample_s=_env_seconds("XDIT_SAMPLE_TIMEOUT_S", d.sample_s),
            collective_s=_env_seconds("XDIT_COLLECTIVE_TIMEOUT_S", d.collective_s),
            health_s=_env_seconds("XDIT_HEALTH_TIMEOUT_S", d.health_s),
        )


def _host_cli_args() -> dict[str, Any] | None:
    """The host ComfyUI's flags, when ComfyUI is loaded in this process (workers compute alike)."""
    import sys

    if "comfy.cli_args" not in sys.modules:
        return None
    from ..worker.bootstrap import host_cli_args

    return {k: v for k, v in host_cli_args().items() if isinstance(v, (str, int, float, bool, type(None), list))}


class WorkerPool:
    """Started workers for one pool key. Not thread-safe: the engine serialises use."""

    def __init__(self, key: tuple[object, ...], executor: Executor, facts: list[dict[str, Any]], start_s: float) -> None:
        self.key = key
        self.executor = executor
        self.facts = facts
        self.start_s = start_s
        self.fast_link_group: int | None = getattr(executor, "fast_link_group", None)
        self.weights_key = ""  # the last model-delta weights sent; every worker holds them (sent once per change)

    @classmethod
    def start(cls, spec: DispatcherSpec, timeouts: Timeouts, worker_cls: str | type | None = None) -> WorkerPool:
        """Start workers for ``spec``; raises ``WorkerError``/``WorkerTimeout`` (nothing left running)."""
        from ..executor.cluster import ensure_cluster
        from ..executor.ray_executor import DEFAULT_WORKER, RayExecutor

        t0 = time.perf_counter()
        deadline = time.monotonic() + timeouts.start_s

        def left(stage: str) -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout(f"pool start ran out of XDIT_START_TIMEOUT_S={timeouts.start_s:.0f} s before {stage}")
            return remaining

        cluster = ensure_cluster(spec.ray_address)
        executor = RayExecutor(spec.devices, cluster, worker_cls=worker_cls or DEFAULT_WORKER, start_timeout=left("actors"))
        try:
            executor.init_process_group(
                spec.devices.backend, min(timeouts.collective_s, left("init_distributed")), cluster.comfy_root,
                _host_cli_args(),
            )
            facts = executor.collective_rpc("load_model", (spec.load,), timeout=left("load_model"))
        except BaseException:
            executor.shutdown()
            raise
        took = time.perf_counter() - t0
        log.info("xDiT: pool for %s ready in %.1f s: %s", spec.devices.describe(), took, facts[0] if facts else {})
        return cls(spec.pool_key(), executor, facts, took)

    def sample(self, req: SampleRequest, timeout: float, on_progress: ProgressHook | None = None) -> Any:
        """Rank 0's latent (CPU tensor). Raises ``WorkerError`` on any rank's failure.

        A delta's weight patches (LoRA tensors) are sent only when the workers do not hold them yet.
        ``on_progress`` receives rank 0's steps while the workers sample.
        """
        delta = req.delta
        if delta is not None and delta.weights is not None and delta.weights_key == self.weights_key:
            req = dataclasses.replace(req, delta=delta.without_weights())
        results = self.executor.collective_rpc("sample", (req,), timeout=timeout, on_progress=on_progress)
        if delta is not None and delta.weights_key:
            self.weights_key = delta.weights_key
        latent = results[0]
        if latent is None:
            raise WorkerError("sample: rank 0 returned no latent")
        return latent

    def check_health(self, timeout: float) -> None:
        self.executor.check_health(timeout)

    def shutdown(self) -> None:
        self.executor.shutdown()
