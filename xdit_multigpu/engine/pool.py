"""``WorkerPool``: the started workers of one ``DispatcherSpec`` (devices + model file + cluster).

Start = actors + process group + ``load_model`` on every rank, all inside one time budget; where the
time went is kept as ``StartPhases`` (logged, and in the benchmark's JSON). A pool is used until its
key changes or a call fails; then it is shut down (actors killed) and built anew.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..config import DispatcherSpec, PrefetchWeights, ResidentWeights, env_number
from ..errors import WorkerError, WorkerTimeout
from ..executor.base import Executor, ProgressHook
from .request import SampleRequest

log = logging.getLogger("xdit_multigpu.pool")


@dataclass(frozen=True)
class Timeouts:
    """Upper bounds (seconds) on everything that waits on a worker; env vars override the defaults."""

    start_s: float = 600.0  # XDIT_START_TIMEOUT_S: actors + imports + process group + model load
    sample_s: float = 3600.0  # XDIT_SAMPLE_TIMEOUT_S: one sampling call (all steps)
    collective_s: float = 600.0  # XDIT_COLLECTIVE_TIMEOUT_S: torch.distributed group timeout (second line)
    health_s: float = 30.0  # XDIT_HEALTH_TIMEOUT_S: ping before reusing a pool
    # No ping when the pool answered a call this recently (back-to-back requests: a ping is a round trip
    # to every rank, a few ms of each request's dispatch); a rank that died since fails the call itself.
    health_fresh_s: float = 5.0

    @classmethod
    def from_env(cls) -> Timeouts:
        d = cls()
        return cls(
            start_s=env_number("XDIT_START_TIMEOUT_S", d.start_s, 0.0, exclusive=True),
            sample_s=env_number("XDIT_SAMPLE_TIMEOUT_S", d.sample_s, 0.0, exclusive=True),
            collective_s=env_number("XDIT_COLLECTIVE_TIMEOUT_S", d.collective_s, 0.0, exclusive=True),
            health_s=env_number("XDIT_HEALTH_TIMEOUT_S", d.health_s, 0.0, exclusive=True),
        )


def _file_bytes(path: str) -> int | None:
    """The model file's size when it is on this node (None: the workers' node has its own copy)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return None


@dataclass(frozen=True)
class StartPhases:
    """Where one pool start went (driver clock, seconds) and what the ranks said about it.

    ``cluster_s`` (start or join Ray), ``actors_s`` (spawn until every actor answers ``ready``),
    ``init_s`` (the ``init_distributed`` RPC), ``load_s`` (the ``load_model`` RPC) follow each other.
    Per rank, in rank order: ``import_s`` (ComfyUI + torch imports, CUDA init; parts: ``torch_s``,
    ``cuda_init_s``, ``comfy_mm_s`` for ComfyUI's flags and ``comfy.model_management``, ``comfy_sd_s``)
    and ``pg_s`` (joining the process group) happen inside ``init_s``; ``rank_load_s`` (the worker's own
    load time) inside ``load_s``. ``resident``: every rank loaded the weights straight into GPU memory.
    Prefetch (``worker/prefetch.py``): ``prefetch_used`` per rank; for those ranks ``prefetch_read_s``
    (the background read, from its start during the imports), ``prefetch_gbps``, ``prefetch_wait_s`` (how
    long ``load_model`` waited for it) and ``sd_load_s`` (ComfyUI's state-dict load); ``prefetch_note``:
    why ranks did not use it.
    """

    cluster_s: float
    actors_s: float
    init_s: float
    load_s: float
    import_s: tuple[float, ...] = ()
    pg_s: tuple[float, ...] = ()
    rank_load_s: tuple[float, ...] = ()
    resident: bool = False
    resident_reason: str = ""
    torch_s: tuple[float, ...] = ()
    cuda_init_s: tuple[float, ...] = ()
    comfy_mm_s: tuple[float, ...] = ()
    comfy_sd_s: tuple[float, ...] = ()
    prefetch_used: tuple[bool, ...] = ()
    prefetch_read_s: tuple[float, ...] = ()
    prefetch_gbps: tuple[float, ...] = ()
    prefetch_wait_s: tuple[float, ...] = ()
    sd_load_s: tuple[float, ...] = ()
    prefetch_note: str = ""

    @classmethod
    def from_facts(cls, wall: dict[str, float], init: list[dict[str, Any]] | None,
                   load: list[dict[str, Any]] | None) -> StartPhases:
        """``wall``: the four driver-side durations; ``init`` / ``load``: the RPCs' per-rank results."""
        init, load = [f for f in init or [] if isinstance(f, dict)], [f for f in load or [] if isinstance(f, dict)]

        def per_rank(facts: list[dict[str, Any]], key: str) -> tuple[float, ...]:
            return tuple(float(f[key]) for f in facts if isinstance(f.get(key), (int, float)))

        def distinct(values: Any) -> str:
            return " | ".join(v for v in dict.fromkeys(str(x or "") for x in values) if v)

        return cls(
            **{k: round(float(v), 3) for k, v in wall.items()},
            import_s=per_rank(init, "import_s"), pg_s=per_rank(init, "pg_s"), rank_load_s=per_rank(load, "load_s"),
            resident=bool(init) and all(f.get("resident") is True for f in init),
            resident_reason=distinct(f.get("resident_reason") for f in init),
            **{k: per_rank(init, k) for k in ("torch_s", "cuda_init_s", "comfy_mm_s", "comfy_sd_s")},
            prefetch_used=tuple(f.get("prefetch_used") is True for f in load),
            **{k: per_rank(load, k) for k in ("prefetch_read_s", "prefetch_gbps", "prefetch_wait_s", "sd_load_s")},
            prefetch_note=distinct([f.get("prefetch") for f in init if f.get("prefetch") != "started"]
                                   + [f.get("prefetch_note") for f in load]),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """One log line: ``cluster 0.1 s, actors 2.0 s, init 7.9 s (import <= 6.1 s, ...)``."""
        where = "GPU" if self.resident else "system RAM"
        return (f"cluster {self.cluster_s:.1f} s, actors {self.actors_s:.1f} s, init {self.init_s:.1f} s "
                f"(import <= {_most(self.import_s)} s{self._import_parts()}, process group <= {_most(self.pg_s)} s), "
                f"load {self.load_s:.1f} s (rank <= {_most(self.rank_load_s)} s{self._prefetch_text()}), "
                f"weights in {where}: {self.resident_reason or '?'}")

    def _import_parts(self) -> str:
        if not self.torch_s:
            return ""
        return (f" [torch <= {_most(self.torch_s)}, CUDA init <= {_most(self.cuda_init_s)}, model_management <= "
                f"{_most(self.comfy_mm_s)}, comfy.sd <= {_most(self.comfy_sd_s)} s]")

    def _prefetch_text(self) -> str:
        used = sum(self.prefetch_used)
        if not used:
            return f"; prefetch {self.prefetch_note}" if self.prefetch_note else ""
        text = (f"; prefetch on {used}/{len(self.prefetch_used)} ranks: read <= {_most(self.prefetch_read_s)} s "
                f"at >= {_least(self.prefetch_gbps)} GB/s, waited <= {_most(self.prefetch_wait_s)} s, ComfyUI "
                f"state-dict load <= {_most(self.sd_load_s)} s")
        return text + (f" ({self.prefetch_note})" if self.prefetch_note else "")


def _most(xs: tuple[float, ...]) -> str:
    return f"{max(xs):.1f}" if xs else "?"


def _least(xs: tuple[float, ...]) -> str:
    return f"{min(xs):.1f}" if xs else "?"


def _host_cli_args() -> dict[str, Any] | None:
    """The host ComfyUI's flags, when ComfyUI is loaded in this process (workers compute alike)."""
    import sys

    if "comfy.cli_args" not in sys.modules:
        return None
    from ..worker.bootstrap import host_cli_args

    return {k: v for k, v in host_cli_args().items() if isinstance(v, (str, int, float, bool, type(None), list))}


class WorkerPool:
    """Started workers for one pool key. Not thread-safe: the engine serialises use."""

    def __init__(self, key: tuple[object, ...], executor: Executor, facts: list[dict[str, Any]], start_s: float,
                 start_phases: StartPhases | None = None) -> None:
        self.key = key
        self.executor = executor
        self.facts = facts
        self.start_s = start_s
        self.start_phases = start_phases  # where start_s went (None: a pool not built by ``start``)
        self.fast_link_group: int | None = getattr(executor, "fast_link_group", None)
        self.weights_key = ""  # the last model-delta weights sent; every worker holds them (sent once per change)
        self.last_ok = time.monotonic()  # when every rank last answered a call (start, sample, ping)

    @classmethod
    def start(cls, spec: DispatcherSpec, timeouts: Timeouts, worker_cls: str | type | None = None) -> WorkerPool:
        """Start workers for ``spec``; raises ``WorkerError``/``WorkerTimeout`` (nothing left running), or
        ``ConfigError`` for a bad ``XDIT_RESIDENT_WEIGHTS`` / ``XDIT_PREFETCH`` before anything starts.
        Records ``start_phases``.
        """
        from ..executor.cluster import ensure_cluster
        from ..executor.ray_executor import DEFAULT_WORKER, RayExecutor

        mode = ResidentWeights.from_env()  # a bad value: ConfigError naming the variable, before any actor
        prefetch = PrefetchWeights.from_env()
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeouts.start_s

        def left(stage: str) -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout(f"pool start ran out of XDIT_START_TIMEOUT_S={timeouts.start_s:.0f} s before {stage}")
            return remaining

        cluster = ensure_cluster(spec.ray_address)
        t_cluster = time.perf_counter()
        executor = RayExecutor(spec.devices, cluster, worker_cls=worker_cls or DEFAULT_WORKER, start_timeout=left("actors"))
        t_actors = time.perf_counter()
        try:
            init = executor.init_process_group(
                spec.devices.backend, min(timeouts.collective_s, left("init_distributed")), cluster.comfy_root,
                _host_cli_args(), file_bytes=_file_bytes(spec.load.path), resident=mode.value,
                model_path=spec.load.path, prefetch=prefetch.value,
            )
            t_init = time.perf_counter()
            facts = executor.collective_rpc("load_model", (spec.load,), timeout=left("load_model"))
        except BaseException:
            executor.shutdown()
            raise
        t_load = time.perf_counter()
        wall = {"cluster_s": t_cluster - t0, "actors_s": t_actors - t_cluster, "init_s": t_init - t_actors,
                "load_s": t_load - t_init}
        phases = StartPhases.from_facts(wall, init, facts)
        log.info("xDiT: pool for %s ready in %.1f s (%s): %s", spec.devices.describe(), t_load - t0, phases.describe(),
                 facts[0] if facts else {})
        return cls(spec.pool_key(), executor, facts, t_load - t0, phases)

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
        self.last_ok = time.monotonic()
        latent = results[0]
        if latent is None:
            raise WorkerError("sample: rank 0 returned no latent")
        return latent

    def check_health(self, timeout: float) -> None:
        self.executor.check_health(timeout)
        self.last_ok = time.monotonic()

    def shutdown(self) -> None:
        self.executor.shutdown()
