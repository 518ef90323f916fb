"""The process-wide ``Engine``: plans a generation, keeps worker pools, falls back to one device.

The engine never touches torch.distributed or Ray itself: it plans (pure), asks ``WorkerPool`` for
started workers and calls them through an ``Executor``. Any worker-side failure (Ray missing, too few
devices, an actor that will not start, dies or times out) shuts the pool down and runs the same request
on the host's own MODEL with ComfyUI's sampler, returning the reason so the node can show it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import AttentionBackend, CudaGraphs, DispatcherSpec, ParallelPlan, ResidentWeights
from ..errors import WorkerError
from ..executor.base import ProgressHook
from ..executor.local import LocalExecutor
from ..executor.ray_executor import WorkerInterrupted
from . import planner
from .model_delta import ModelDelta
from .pool import Timeouts, WorkerPool
from .request import SampleRequest

log = logging.getLogger("xdit_multigpu.engine")

# In-process sampling (the fallback, the stock path) runs one at a time: ComfyUI's model management is
# not thread-safe, and the async KSampler node may run two xDiT KSamplers at once.
HOST_LOCK = threading.RLock()

# What a failed pool start or call may raise besides WorkerError: Ray's own start/connect errors.
_POOL_ERRORS = (WorkerError, ImportError, RuntimeError, ConnectionError, TimeoutError, OSError)


@dataclass(frozen=True)
class SampleOutcome:
    """``latent``: rank 0's (or the fallback's) samples, CPU. ``fallback_reason`` is None on the parallel path.
    ``groups``: how the work went over GPU groups (several groups only), for the node's status line."""

    latent: Any
    plan: ParallelPlan
    fallback_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    groups: str = ""


class Unavailable(Exception):
    """The workers of a group cannot run this request now; the message says why (shown to the user)."""


def _overlaps(a: DispatcherSpec, b_key: tuple[object, ...]) -> bool:
    """Would a pool for ``a`` compete with the pool ``b_key`` for the same devices?"""
    b_devices = b_key[1]
    if getattr(b_devices, "kind", None) is not a.devices.kind:
        return False
    # CPU ranks are numbered slots: two groups of one "cpu:2|cpu:2" do not compete, two "cpu:2" sets do.
    return bool(set(a.devices.ids) & set(b_devices.ids))


class Engine:
    """Pools keyed by ``DispatcherSpec.pool_key()``; safe to call ``release_all`` from another thread."""

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        pool_factory: Callable[[DispatcherSpec, Timeouts], WorkerPool] | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts.from_env()
        self._pool_factory = pool_factory or WorkerPool.start
        self._pools: dict[tuple[object, ...], WorkerPool] = {}
        self._lock = threading.Lock()  # guards _pools only (held briefly)
        self._pool_locks: dict[tuple[object, ...], threading.Lock] = {}
        self.dispatchers: dict[tuple[object, ...], Any] = {}  # dispatch.GroupDispatcher per group setting
        self._jobs = threading.Condition()  # counts running ``sample`` calls, so release_all can wait for them
        self._active = 0

    # -- pools ---------------------------------------------------------------------------------------
    def pool(self, spec: DispatcherSpec) -> WorkerPool:
        """The started pool for ``spec``: reused while its key is unchanged and it answers a ping."""
        key = spec.pool_key()
        with self._lock:
            pool = self._pools.get(key)
            stale = [k for k in self._pools if k != key and _overlaps(spec, k)]
            evicted = [self._pools.pop(k) for k in stale]
        for old in evicted:
            log.info("xDiT: the pool on these devices changed (model file or devices); stopping the old one")
            old.shutdown()
        if pool is not None:
            if time.monotonic() - getattr(pool, "last_ok", float("-inf")) < self.timeouts.health_fresh_s:
                return pool  # it answered a moment ago: skip the ping's round trip
            try:
                pool.check_health(self.timeouts.health_s)
                return pool
            except WorkerError as e:
                log.warning("xDiT: pool failed its health check (%s); rebuilding", e)
                self._drop(key)
        pool = self._pool_factory(spec, self.timeouts)
        with self._lock:
            self._pools[key] = pool
        return pool

    def _drop(self, key: tuple[object, ...]) -> None:
        with self._lock:
            pool = self._pools.pop(key, None)
        if pool is not None:
            pool.shutdown()

    def release_all(self, wait_s: float = 10.0, stop_ray: bool = True) -> None:
        """Stop every pool and the embedded Ray cluster (ComfyUI's /free, atexit). Never raises.

        Waits up to ``wait_s`` for a running ``sample`` to finish first, so /free during a job does not
        turn it into a one-device fallback; after that the workers are killed regardless.
        """
        with self._jobs:
            self._jobs.wait_for(lambda: self._active == 0, timeout=max(0.0, wait_s))
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                pool.shutdown()
            except Exception as e:  # noqa: BLE001  (shutdown must go on for the other pools)
                log.warning("xDiT: pool shutdown raised %s: %s", type(e).__name__, e)
        if stop_ray:
            from ..executor.cluster import shutdown_cluster

            shutdown_cluster()

    # -- sampling ------------------------------------------------------------------------------------
    def sample(
        self,
        spec: DispatcherSpec,
        req: SampleRequest,
        model_spec: Any,
        heads: int,
        cfg_active: bool,
        fallback_patcher: Any,
        progress: ProgressHook | None = None,
    ) -> SampleOutcome:
        """Sample ``req`` over ``spec.devices``; on any worker failure, on ``fallback_patcher`` with a reason.

        ``ConfigError`` (e.g. CFG strategy on 4 devices) is raised, not hidden by the fallback: the user
        must change a widget. ``req.plan`` is ignored and replaced by the planner's. Several GPU groups
        (``spec.device_groups()``) go through the group dispatcher (``dispatch.py``): a batch is split
        over them, a single image goes to the group the scheduling policy picks.
        ``progress``: where rank 0's steps go; None: ComfyUI's progress bar and previews, when ComfyUI
        is loaded in this process (``comfy_progress``).
        """
        if progress is None:
            progress = comfy_progress(fallback_patcher, req.steps)
        spec.check_groups()
        with self._job():
            if len(spec.device_groups()) > 1:
                from .dispatch import dispatcher_for  # noqa: PLC0415

                return dispatcher_for(self, spec).sample(req, model_spec, heads, cfg_active, fallback_patcher, progress)
            timings: dict[str, float] = {}
            try:
                return self.sample_group(spec, req, model_spec, heads, cfg_active, progress, timings)
            except Unavailable as e:
                return self.fallback(req, fallback_patcher, str(e), timings, progress)

    def sample_group(
        self, spec: DispatcherSpec, req: SampleRequest, model_spec: Any, heads: int, cfg_active: bool,
        progress: ProgressHook | None, timings: dict[str, float],
    ) -> SampleOutcome:
        """``req`` on the pool of ``spec.devices`` (one group). Raises ``Unavailable`` with the reason
        when the workers cannot do it (the caller falls back or re-dispatches); ``ConfigError`` as is."""
        world = spec.devices.world_size
        axes = model_spec.axes if model_spec is not None else frozenset()
        attention = AttentionBackend.from_env()  # a bad value is the user's to fix, not a fallback
        ResidentWeights.from_env()  # checked here too, so a bad value fails every request alike
        graphs = CudaGraphs.from_env()
        plan = planner.plan(spec.strategy, max(world, 1), cfg_active, heads, axes, ulysses=spec.ulysses_degree)
        if world == 0:
            raise Unavailable("no GPU is visible (gpu_devices is \"all\")")
        if model_spec is None:
            raise Unavailable("this model has no parallel support")
        try:
            import ray  # noqa: F401, PLC0415
        except ImportError:
            raise Unavailable("Ray is not installed (pip install ray)") from None
        if plan.world_size < world:
            # e.g. a CFG-only model on 4 GPUs: start only the ranks the plan uses, leave the rest free.
            spec = dataclasses.replace(spec, devices=spec.devices.subset(spec.devices.ids[: plan.world_size]))
            world = plan.world_size
        with self._pool_lock(spec.pool_key()):
            t0 = time.perf_counter()
            try:
                pool = self.pool(spec)
            except _POOL_ERRORS as e:
                raise Unavailable(f"workers did not start: {e}") from e
            timings["pool_s"] = round(time.perf_counter() - t0, 3)
            if pool.fast_link_group:
                plan = planner.plan(spec.strategy, world, cfg_active, heads, axes, pool.fast_link_group,
                                    spec.ulysses_degree)
            plan = dataclasses.replace(plan, attention=attention, graphs=graphs)
            latent = self._run_pool(spec, pool, dataclasses.replace(req, plan=plan), progress)
        timings["sample_s"] = round(time.perf_counter() - t0 - timings["pool_s"], 3)
        log.info("xDiT: %s (%s) in %.1f s", plan.describe(), plan.reason, timings["sample_s"])
        return SampleOutcome(latent, plan, None, timings)

    def _run_pool(self, spec: DispatcherSpec, pool: WorkerPool, req: SampleRequest, progress: ProgressHook | None) -> Any:
        executor = getattr(pool, "executor", None)
        if hasattr(executor, "abort_check"):
            executor.abort_check = _comfy_interrupted  # ComfyUI's cancel stops the workers
        try:
            return pool.sample(req, self.timeouts.sample_s, on_progress=progress)
        except WorkerInterrupted:
            self._drop(spec.pool_key())
            _raise_comfy_interrupt()
            raise
        except _POOL_ERRORS as e:
            self._drop(spec.pool_key())
            raise Unavailable(f"parallel sampling failed: {e}") from e
        except BaseException:
            self._drop(spec.pool_key())  # e.g. ComfyUI's interrupt raised by the progress bar: workers are gone
            raise

    # -- concurrency ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _job(self) -> Iterator[None]:
        """Count a running ``sample`` so that ``release_all`` waits (bounded) for it."""
        with self._jobs:
            self._active += 1
        try:
            yield
        finally:
            with self._jobs:
                self._active -= 1
                self._jobs.notify_all()

    def _pool_lock(self, key: tuple[object, ...]) -> threading.Lock:
        """One lock per pool: a pool serves one request at a time; different groups run concurrently."""
        with self._lock:
            return self._pool_locks.setdefault(key, threading.Lock())

    def start_pool(self, spec: DispatcherSpec) -> WorkerPool:
        """``pool(spec)`` under the pool's lock, for starting or rebuilding a pool beside running jobs."""
        with self._pool_lock(spec.pool_key()):
            return self.pool(spec)

    def sample_ksampler(
        self,
        spec: DispatcherSpec,
        model: Any,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Any,
        negative: Any,
        latent: dict[str, Any],
        denoise: float = 1.0,
        *,
        cfg_active: bool,
        delta: ModelDelta | None = None,
    ) -> SampleOutcome:
        """``KSampler`` arguments -> ``sample``: noise made here once (as ``common_ksampler`` does), so
        every rank and the fallback start from the same tensor; ``model`` is also the fallback MODEL.
        ``delta``: ``model``'s modifications (``model_delta.describe_model``), replayed by the workers."""
        from ..models import lookup_config
        from ..worker import comfy_runtime

        latent_image, noise = comfy_runtime.prepare_noise(model, latent, seed)
        req = SampleRequest(
            noise=noise, latent_image=latent_image, positive=positive, negative=negative, seed=seed, steps=steps,
            cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            noise_mask=latent.get("noise_mask"), delta=delta,
        )
        model_config = model.model.model_config
        model_spec = lookup_config(model_config)
        heads = model_spec.heads(model_config.unet_config) if model_spec is not None else 0
        return self.sample(spec, req, model_spec, heads, cfg_active, model)

    def fallback(self, req: SampleRequest, patcher: Any, reason: str, timings: dict[str, float],
                 progress: ProgressHook | None = None) -> SampleOutcome:
        """The same request on the host's MODEL, in-process, with ComfyUI's sampler."""
        log.warning("xDiT: sampling on one device: %s", reason)
        if patcher is None:
            raise WorkerError(f"{reason}; and no MODEL was given to sample on one device")
        plan = ParallelPlan(reason=f"one device: {reason}")
        t0 = time.perf_counter()
        with HOST_LOCK:
            executor = LocalExecutor.for_patcher(patcher)
            try:
                # The host's MODEL already carries the modifications the delta describes.
                one = dataclasses.replace(req, plan=plan, delta=None)
                latent = executor.collective_rpc("sample", (one,), timeout=self.timeouts.sample_s, on_progress=progress)[0]
            finally:
                executor.shutdown()
        timings["fallback_s"] = round(time.perf_counter() - t0, 3)
        return SampleOutcome(latent, plan, reason, timings)


PREVIEW_INTERVAL_S = 0.5  # at most 2 previews a second from the workers


def comfy_progress(patcher: Any, steps: int) -> ProgressHook | None:
    """ComfyUI's progress bar (and, when a preview method is on, its previewer) for rank 0's steps.

    What ``latent_preview.prepare_callback`` does for the stock KSampler, in this process: the bar's
    hook (the server) sends ``progress`` for the executing node, and the previewer turns rank 0's small
    x0 latent into the binary preview frame. None when ComfyUI is not loaded here.
    """
    if "comfy.utils" not in sys.modules:
        return None
    import comfy.utils  # noqa: PLC0415

    pbar = comfy.utils.ProgressBar(steps)
    previewer = _previewer(patcher)

    def update(step: int, total: int, preview: Any) -> None:
        image = None
        if previewer is not None and preview is not None:
            import torch  # noqa: PLC0415

            x0 = preview if isinstance(preview, torch.Tensor) else torch.from_numpy(preview.copy())
            x0 = x0.to(device=patcher.load_device, dtype=torch.float32)
            image = previewer.decode_latent_to_preview_image("JPEG", x0)
        pbar.update_absolute(step, total, image)

    return ProgressHook(update, PREVIEW_INTERVAL_S if previewer is not None else None)


def _previewer(patcher: Any) -> Any:
    """ComfyUI's previewer for this MODEL's latent format (None when previews are off or unavailable)."""
    latent_format = getattr(getattr(patcher, "model", None), "latent_format", None)
    if latent_format is None:
        return None
    try:
        import latent_preview  # noqa: PLC0415  (ComfyUI's top-level module)
    except ImportError:
        return None
    return latent_preview.get_previewer(patcher.load_device, latent_format)


def _comfy_interrupted() -> bool:
    """ComfyUI's cancel flag, when ComfyUI is loaded in this process."""
    mm = sys.modules.get("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


def _raise_comfy_interrupt() -> None:
    """Raise ComfyUI's own InterruptProcessingException (and clear the flag), as its sampler would."""
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine (created on first use; its pools stop at interpreter exit)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            import atexit

            _engine = Engine()
            atexit.register(_engine.release_all)
        return _engine


def release_all() -> None:
    """Stop every worker pool and the embedded Ray cluster (same as ``get_engine().release_all()``)."""
    if _engine is not None:
        _engine.release_all()
    else:
        from ..executor.cluster import shutdown_cluster

        shutdown_cluster()
