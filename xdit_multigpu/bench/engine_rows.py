"""Engine rows of the benchmark: the engine users run (``Engine.sample``: planner, Ray pool, ComfyUI's
loader and sampler on every rank), on a pool of ``n`` devices, for each requested strategy and size.

The pool's workers are ``BenchWorker`` (the engine's ``Worker`` plus measurement RPCs); the engine is
a private ``Engine`` instance given that pool factory, so nothing else differs from a user's run. One
pool per device count serves every size and strategy (pool start is paid once).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from ..config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy
from ..errors import ConfigError
from .protocol import compare, make_request
from .realsize import Arch

log = logging.getLogger("xdit_multigpu.bench")
BENCH_WORKER = "xdit_multigpu.bench.worker.BenchWorker"
LEGACY_ENV = {"XDIT_SHARD_TEXT": "0", "XDIT_FUSED_ULYSSES": "0"}  # the first GPU run's attention path
LEGACY = "levers off"
GRAPHS_OFF = "graphs off"  # the same row with XDIT_CUDA_GRAPHS=off (read by the engine in this process)
CHUNKS = "chunks "  # + N: the same row with XDIT_ULYSSES_CHUNKS=N in the workers (fused Ulysses overlap A/B)
ULYSSES = "ulysses "  # + N: a USP row with ulysses_degree=N (the rest of the split on ring)
WARM_OFF = "warm start off"  # the same row, 28-step image included, with XDIT_CUDA_GRAPHS_WARM_START=0 in the workers


def make_engine() -> Any:
    """An ``Engine`` whose pools run ``BenchWorker`` ranks (same engine code, same worker code)."""
    from ..engine.engine import Engine
    from ..engine.pool import Timeouts, WorkerPool

    def factory(spec: DispatcherSpec, timeouts: Timeouts) -> WorkerPool:
        return WorkerPool.start(spec, timeouts, worker_cls=BENCH_WORKER)

    return Engine(timeouts=Timeouts(start_s=900, sample_s=900, collective_s=600, health_s=60), pool_factory=factory)


class EngineBench:
    """Rows for one model file on ``n`` devices; ``release`` stops its pool."""

    def __init__(self, engine: Any, arch: Arch, model: dict[str, Any], n: int, kind: DeviceKind, opts: Any) -> None:
        from ..models import lookup

        self.engine, self.arch, self.n, self.opts = engine, arch, n, opts
        self.load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, model["path"], unet_config_json=model.get("unet_config_json"))
        text = f"cpu:{n}" if kind is DeviceKind.CPU else ",".join(map(str, range(n)))
        self.devices = DeviceSet(kind, tuple(range(n)), text)
        self.model_spec = lookup(arch.config_class)
        self.pool_start_s: float | None = None
        self.pool_start_phases: dict[str, Any] | None = None  # WorkerPool.start_phases: where the start went

    def spec(self, strategy: str, ulysses_degree: int = 0) -> DispatcherSpec:
        """What the loader node would build; ``ulysses_degree``: its advanced input (0 = the planner's)."""
        return DispatcherSpec(self.load, self.devices, ParallelStrategy(strategy), family=self.model_spec.name,
                              ulysses_degree=ulysses_degree)

    def start(self) -> float:
        t0 = time.perf_counter()
        pool = self.engine.pool(self.spec("Hybrid"))
        self.pool_start_s = round(time.perf_counter() - t0, 2)
        phases = getattr(pool, "start_phases", None)
        self.pool_start_phases = phases.as_dict() if phases is not None else None
        return self.pool_start_s

    def _executor(self) -> Any:
        return self.engine.pool(self.spec("Hybrid")).executor

    def request(self, strategy: str, size: int, steps: int, ulysses_degree: int = 0) -> dict[str, Any]:
        """One engine request; returns driver wall time, the plan, rank stats and the latent."""
        req = make_request(self.arch, size, steps)
        t0 = time.time()
        spec = self.spec(strategy, ulysses_degree)
        res = self.engine.sample(spec, req, self.model_spec, self.arch.heads, self.arch.cfg > 1.0, None)
        t1 = time.time()
        if res.fallback_reason:
            raise RuntimeError(f"the engine fell back to one device: {res.fallback_reason}")
        stats = self._executor().collective_rpc("bench_stats", timeout=60)
        r0 = stats[0]
        return {"wall_s": t1 - t0, "plan": res.plan.describe(), "reason": res.plan.reason, "stats": stats,
                "latent": res.latent, "dispatch_ms": round((r0["t_in"] - t0 + t1 - r0["t_out"]) * 1000, 2)}

    def row(self, strategy: str, size: int, stock_latent: Any, e2e: bool = True,
            ulysses_degree: int = 0) -> dict[str, Any]:
        """Warm-up, timed run (per-step median), optional 28-step and profiled runs, at one size."""
        ex = self._executor()
        ex.collective_rpc("bench_reset", timeout=60)
        ask = functools.partial(self.request, strategy, size, ulysses_degree=ulysses_degree)
        warm = ask(2)
        timed = ask(self.opts.repeats + 1)
        stats = timed["stats"]
        out: dict[str, Any] = {
            "plan": timed["plan"], "plan_reason": timed["reason"],
            "per_step_ms": stats[0]["median_ms"], "step_ms": stats[0]["step_ms"],
            "per_step_ms_ranks": [s["median_ms"] for s in stats],
            "timed_wall_s": round(timed["wall_s"], 4), "worker_wall_s": stats[0]["wall_s"],
            "setup_ms": stats[0].get("setup_ms"),  # rank 0: request start -> first step, minus one step
            "attention_paths": stats[0].get("paths"),  # rank 0, whole timed request: calls per path
            "graphs": stats[0].get("graphs"),  # rank 0: denoiser calls eager / captured / replayed
            "dispatch_ms": [warm["dispatch_ms"], timed["dispatch_ms"]],
            "peak_allocated_gb": [s["peak_allocated_gb"] for s in stats],
            "peak_reserved_gb": [s["peak_reserved_gb"] for s in stats],
        }
        if stock_latent is not None:
            out["vs_stock"] = compare(timed["latent"], stock_latent)
        if e2e and size in self.opts.e2e_sizes:  # median of --e2e-repeats 28-step requests
            runs = [ask(self.opts.e2e_steps) for _ in range(max(1, getattr(self.opts, "e2e_repeats", 1)))]
            walls = sorted(r["wall_s"] for r in runs)
            out["e2e_sampling_s"] = round(walls[len(walls) // 2], 3)
            out["e2e_sampling_runs_s"] = [round(r["wall_s"], 3) for r in runs]
            out["dispatch_ms"].append(runs[0]["dispatch_ms"])
        if e2e:  # steady-state dispatch: repeated 1-step requests (the ones above include the pool's first)
            repeats = getattr(self.opts, "dispatch_repeats", 0)
            out["dispatch_repeat_ms"] = [ask(1)["dispatch_ms"] for _ in range(repeats)]
        if self.opts.profile:
            ex.collective_rpc("bench_reset", (True,), timeout=60)
            prof = ask(self.opts.repeats + 1)
            out["profile_rank0"] = prof["stats"][0].get("profile")
            out["profiled_per_step_ms"] = prof["stats"][0]["median_ms"]
        return out

    def legacy_row(self, strategy: str, size: int, stock_latent: Any) -> dict[str, Any]:
        """The same row with the parallel-path levers off (text replicated, yunchang's all-to-alls)."""
        return self.env_row(strategy, size, stock_latent, LEGACY_ENV)

    def env_row(self, strategy: str, size: int, stock_latent: Any, env: dict[str, str],
                e2e: bool = False) -> dict[str, Any]:
        """The same row with ``env`` set in every worker (switches read per request: ``parallel/tuning.py``,
        ``XDIT_CUDA_GRAPHS_WARM_START``); ``e2e``: with its 28-step image and dispatch repeats."""
        ex = self._executor()
        old = ex.collective_rpc("bench_env", (env,), timeout=60)[0]
        try:
            return self.row(strategy, size, stock_latent, e2e=e2e)
        finally:
            self._executor().collective_rpc("bench_env", (old,), timeout=60)

    def ulysses_row(self, strategy: str, size: int, stock_latent: Any, degree: int) -> dict[str, Any]:
        """The same row with ``ulysses_degree=degree`` (Ulysses x Ring as the user would set it on the loader)."""
        return self.row(strategy, size, stock_latent, e2e=False, ulysses_degree=degree)

    def graphs_off_row(self, strategy: str, size: int, stock_latent: Any) -> dict[str, Any]:
        """The same row with CUDA graphs off (``XDIT_CUDA_GRAPHS=off`` in this, the engine's, process)."""
        old = os.environ.get("XDIT_CUDA_GRAPHS")
        os.environ["XDIT_CUDA_GRAPHS"] = "off"
        try:
            return self.row(strategy, size, stock_latent, e2e=False)
        finally:
            if old is None:
                os.environ.pop("XDIT_CUDA_GRAPHS", None)
            else:
                os.environ["XDIT_CUDA_GRAPHS"] = old

    def release(self) -> None:
        self.engine.release_all(stop_ray=False)


def strategies_for(arch: Arch, n: int, wanted: list[str]) -> list[str]:
    """The requested strategies that make sense on ``n`` devices (one device: Hybrid only)."""
    if n == 1:
        return ["Hybrid"]
    out = []
    for s in wanted:
        if s == "CFG" and (n != 2 or arch.cfg <= 1.0):
            continue
        out.append(s)
    return out


def run_model(engine: Any, arch: Arch, model: dict[str, Any], n: int, kind: DeviceKind, opts: Any,
              stock_latents: dict[int, Any], sizes: list[int]) -> dict[str, Any]:
    """Every row of ``arch`` on ``n`` devices; errors are recorded per row, never raised."""
    bench = EngineBench(engine, arch, model, n, kind, opts)
    result: dict[str, Any] = {"n": n, "rows": {}}
    try:
        result["pool_start_s"] = bench.start()
        if bench.pool_start_phases is not None:
            result["pool_start_phases"] = bench.pool_start_phases
    except Exception as e:  # noqa: BLE001  (a failed pool is a row of the report, not the end of the run)
        result["error"] = f"pool start: {type(e).__name__}: {e}"
        bench.release()
        return result
    jobs: list[tuple[str, int, str | None]] = [(s, size, None) for s in strategies_for(arch, n, opts.strategies) for size in sizes]
    if getattr(opts, "ab", False) and n > 1 and n == max(opts.gpus):
        jobs += [("Hybrid", size, LEGACY) for size in sizes]
    if getattr(opts, "graphs_ab", False) and kind is DeviceKind.CUDA:
        jobs += [("Hybrid", size, GRAPHS_OFF) for size in sizes]
    runs = {None: bench.row, LEGACY: bench.legacy_row, GRAPHS_OFF: bench.graphs_off_row,
            WARM_OFF: functools.partial(bench.env_row, env={"XDIT_CUDA_GRAPHS_WARM_START": "0"}, e2e=True)}
    if getattr(opts, "warm_start_ab", False) and kind is DeviceKind.CUDA:
        jobs += [("Hybrid", size, WARM_OFF) for size in sizes]
    if n > 1:
        for c in getattr(opts, "chunks_ab", None) or ():
            runs[f"{CHUNKS}{c}"] = functools.partial(bench.env_row, env={"XDIT_ULYSSES_CHUNKS": str(c)})
            jobs += [("Hybrid", size, f"{CHUNKS}{c}") for size in sizes]
        for d in getattr(opts, "ulysses_degrees", None) or ():  # e.g. Ulysses 4 x Ring 2 on 8 GPUs
            runs[f"{ULYSSES}{d}"] = functools.partial(bench.ulysses_row, degree=d)
            jobs += [("USP", size, f"{ULYSSES}{d}") for size in sizes]
    for strategy, size, variant in jobs:
        key = f"{strategy} ({variant})/{size}" if variant else f"{strategy}/{size}"
        try:
            result["rows"][key] = runs[variant](strategy, size, stock_latents.get(size))
        except ConfigError as e:
            result["rows"][key] = {"skipped": str(e)}
        except Exception as e:  # noqa: BLE001
            log.exception("bench row %s %s failed", arch.name, key)
            result["rows"][key] = {"error": f"{type(e).__name__}: {e}"}
    bench.release()
    return result


def load_stock_latent(latents_dir: str, arch: Arch, size: int) -> Any:
    import torch

    path = os.path.join(latents_dir, f"{arch.name}_{size}_stock.pt")
    return torch.load(path) if os.path.isfile(path) else None
