"""``Worker``: one rank. Owns its device, the process group, the loaded model and the parallel groups.

Runs inside a Ray actor (one per device) or, for the fallback, in the ComfyUI process on an existing
``ModelPatcher``. Every public method logs failures with rank and method name before re-raising: the
engine sees the error, but the worker's log is where its full traceback lives.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ..config import LoadSpec, ParallelPlan, PrefetchWeights
from ..engine.model_delta import DeltaCache
from ..engine.request import SampleRequest
from . import comfy_runtime, resident
from .bootstrap import import_comfy
from .prefetch import Prefetch, is_safetensors

log = logging.getLogger("xdit_multigpu.worker")

# A prefetch that delivered no byte for this long is hung (a dead network mount...): load from the file.
PREFETCH_STALL_S = 60.0

F = TypeVar("F", bound=Callable[..., Any])


def _logged(fn: F) -> F:
    """Log ``rank r: method failed`` with the traceback, then re-raise (the caller decides what to do)."""

    @functools.wraps(fn)
    def wrapper(self: Worker, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            log.exception("xDiT worker rank %d: %s failed", self.rank, fn.__name__)
            raise

    return wrapper  # type: ignore[return-value]


class Worker:
    """A rank: ``init_distributed`` -> ``load_model`` -> ``sample``... -> ``free``."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.backend = "gloo"
        self.timeout_s = 600.0
        self.patcher: Any = None
        self.spec: Any = None  # models.registry.ModelSpec of the loaded model, None if unsupported
        self._groups: dict[tuple[int, int, int], Any] = {}
        # worker.graphs.WarmShapes per groups key: call shapes that already ran with this model (CUDA graph warm start)
        self._graph_warm: dict[tuple[int, int, int], Any] = {}
        self._deltas = DeltaCache()  # the loaded model with the request's modifications (LoRA, ...)
        self._loaded_plain = False  # True when load_model loaded the plain file (deltas apply on top)
        self.graph_stats: Any = None  # worker.graphs.GraphStats of the last request (GPU ranks), or None
        self._prefetch: Prefetch | None = None  # the model file being read into GPU memory (resident ranks)

    @classmethod
    def from_patcher(cls, patcher: Any) -> Worker:
        """An in-process rank 0 of 1 wrapping a MODEL the host already loaded (the fallback)."""
        w = cls()
        w.patcher = patcher
        w.spec = _spec_of(patcher)
        return w

    @_logged
    def init_distributed(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        backend: str,
        timeout_s: float,
        comfy_root: str | None,
        cli_args: dict[str, Any] | None = None,
        file_bytes: int | None = None,
        resident_mode: str = "auto",
        model_path: str | None = None,
        prefetch_mode: str = "auto",
    ) -> dict[str, Any]:
        """Import ComfyUI for this device, then join the default process group (collective).

        ``file_bytes`` (the model file's size; None: unknown, ComfyUI's default placement) and
        ``resident_mode`` (``XDIT_RESIDENT_WEIGHTS`` as the driver read it) decide whether a CUDA rank
        loads the weights straight into GPU memory (see ``worker.resident``). A resident rank then starts
        reading ``model_path`` into GPU memory (``prefetch_mode``: ``XDIT_PREFETCH``) before importing
        ComfyUI, so the read overlaps the import; ``load_model`` uses it. Returns facts: ``import_s``
        (ComfyUI + torch imports, CUDA init; split into ``torch_s``, ``cuda_init_s``, ``comfy_mm_s``,
        ``comfy_sd_s``), ``pg_s`` (joining the group), ``resident`` and its reason, ``prefetch`` (what was done).
        """
        t0 = time.perf_counter()
        cpu = backend == "gloo"

        def prefetch(decision: resident.ResidentDecision) -> str:
            return self._start_prefetch(decision, cpu, model_path, prefetch_mode)

        placement = _import_comfy(comfy_root, cpu, cli_args, file_bytes, resident_mode, prefetch)
        import torch
        import torch.distributed as dist

        self.rank, self.world_size, self.backend, self.timeout_s = rank, world_size, backend, float(timeout_s)
        if cpu:
            # Every rank shares the host's cores; oversubscribing them makes each collective wait on the slowest.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        else:
            torch.cuda.set_device(0)  # the actor sees exactly one GPU (CUDA_VISIBLE_DEVICES)
        t1 = time.perf_counter()
        if not dist.is_initialized():
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        return {"rank": rank, "pid": os.getpid(), "import_s": round(t1 - t0, 3), "pg_s": round(time.perf_counter() - t1, 3),
                "threads": torch.get_num_threads(), **placement}

    def _start_prefetch(self, decision: resident.ResidentDecision, cpu: bool, path: str | None, mode: str) -> str:
        """Start reading ``path`` into this GPU when the weights are to live there; returns what was done.

        Only where ComfyUI would put the weights on the GPU anyway (resident CUDA ranks): elsewhere they
        belong in system RAM, where ComfyUI's file loader puts them. Only ``.safetensors`` / ``.sft``.
        """
        if self._prefetch is not None:  # a second init_distributed: the earlier read is not ours to keep
            self._prefetch.cancel()
            self._prefetch = None
        if PrefetchWeights(mode) is PrefetchWeights.OFF:
            return "off: XDIT_PREFETCH=off"
        if cpu or not decision.resident:
            return "off: CPU rank" if cpu else "off: weights in system RAM"
        if not path or not is_safetensors(path):
            return "off: not a .safetensors file" if path else "off: no model path given"
        self._prefetch = Prefetch.start(path, "cuda:0")  # the actor sees one GPU (CUDA_VISIBLE_DEVICES)
        return "started"

    @_logged
    def load_model(self, load: LoadSpec) -> dict[str, Any]:
        """Load the diffusion model with ComfyUI's own loader; returns facts for logs and checks.

        When ``init_distributed`` prefetched this file, ComfyUI's state-dict loader gets the prefetched
        tensors (``prefetch_*`` and ``sd_load_s`` facts); if the prefetch failed, ComfyUI's file loader.
        """
        t0 = time.perf_counter()
        prefetch, self._prefetch = self._prefetch, None
        self.free()
        self.patcher, facts = self._load_prefetched(load, prefetch) if prefetch is not None else (None, {})
        if self.patcher is None:
            self.patcher = comfy_runtime.load_diffusion_model(load)
        self.spec = _spec_of(self.patcher)
        self._loaded_plain = True
        cfg = self.patcher.model.model_config
        heads = self.spec.heads(cfg.unet_config) if self.spec is not None else 0
        return {
            "config_class": type(cfg).__name__,
            "family": self.spec.name if self.spec is not None else None,
            "heads": heads,
            "dtype": str(self.patcher.model.get_dtype()),
            "params": sum(p.numel() for p in self.patcher.model.diffusion_model.parameters()),
            "load_s": round(time.perf_counter() - t0, 3),
            "prefetch_used": False,
            **facts,
        }

    def _load_prefetched(self, load: LoadSpec, prefetch: Prefetch) -> tuple[Any, dict[str, Any]]:
        """``(patcher, facts)`` from the prefetched state dict, or ``(None, facts)``: load from the file.

        The state dict is never bound in a frame that outlives the ComfyUI call (nor in a traceback that
        does), so the GPU buffer is freed as soon as ComfyUI has copied the tensors into the model.
        """
        if os.path.abspath(load.path) != prefetch.path or load.unet_config_json:
            prefetch.cancel()  # another file, or a test's explicit architecture (today's file path)
            return None, {"prefetch_note": "not used: prefetched another file" if not load.unet_config_json
                          else "not used: explicit unet_config loads from the file"}
        t0 = time.perf_counter()
        err = ""
        try:
            got: Any = prefetch.result(self.timeout_s, stall_s=PREFETCH_STALL_S)
        except Exception as e:  # noqa: BLE001 (any failure: ComfyUI's file loader, as without prefetch)
            err = f"{type(e).__name__}: {e}"
        t1 = time.perf_counter()
        facts: dict[str, Any] = {**prefetch.facts(), "prefetch_wait_s": round(t1 - t0, 3)}
        patcher = None
        if not err:
            try:
                patcher = comfy_runtime.load_diffusion_model_from_state_dict(load, *got)
            except Exception as e:  # noqa: BLE001 (e.g. out of memory beside the buffer: retry from the file)
                err = f"ComfyUI's state-dict load: {type(e).__name__}: {e}"
            got = None  # outside the except block: the traceback (ComfyUI frames holding the dict) is gone
        if err:
            prefetch.cancel()
            self.free()  # whatever a failed load left on the GPU
            log.warning("xDiT worker rank %d: prefetched load of %s failed (%s); loading with ComfyUI's file "
                        "loader", self.rank, load.path, err)
            return None, {**facts, "prefetch_note": f"failed: {err}"[:300]}
        facts.update(prefetch_used=True, sd_load_s=round(time.perf_counter() - t1, 3), **_release(prefetch, patcher))
        return patcher, facts

    @_logged
    def sample(self, req: SampleRequest, progress: Callable[[int, int, Any], None] | None = None) -> Any:
        """Run ComfyUI's sampler with this rank's share of the work; rank 0 returns the latent (CPU), others None.

        Every rank runs the same ``comfy.sample.sample`` call; ``parallelize`` (on a clone) makes the ranks
        split the model's work and exchange activations so they all end on the same latent.
        ``progress(step, total, x0)`` (rank 0 only) is called after every step, 1-based like ComfyUI's bar.
        """
        if self.patcher is None:
            raise RuntimeError("sample called before load_model")
        plan = req.plan
        if plan.world_size != self.world_size:
            raise ValueError(f"{plan.describe()} needs {plan.world_size} ranks but this pool has {self.world_size}")
        if req.delta is not None and not self._loaded_plain:
            raise ValueError("sample: a model delta was sent to a worker that wraps the host's MODEL, which already "
                             "carries it; send delta=None")
        patcher = self._deltas.patcher_for(self.patcher, req.delta)
        if plan.world_size > 1:
            from ..parallel.apply import parallelize

            if self.spec is None:
                raise RuntimeError(f"{type(self.patcher.model.model_config).__name__} has no ModelSpec to parallelize")
            patcher = parallelize(patcher, self.spec, plan, self._groups_for(plan))
        if self.backend == "nccl":  # CUDA graphs: GPU ranks only (innermost wrapper, after parallelize's)
            from .graphs import WarmShapes, install, warm_start_enabled

            warm = (self._graph_warm.setdefault((plan.cfg, plan.ulysses, plan.ring), WarmShapes())
                    if warm_start_enabled() else None)
            patcher, self.graph_stats = install(patcher, plan.graphs, family=self.spec, warm=warm)
        out = comfy_runtime.run_sampler(patcher, req, callback=comfy_runtime.progress_callback(progress))
        return out.cpu() if self.rank == 0 else None

    def _groups_for(self, plan: ParallelPlan) -> Any:
        key = (plan.cfg, plan.ulysses, plan.ring)
        if key not in self._groups:
            from ..parallel.groups import ParallelGroups

            self._groups[key] = ParallelGroups.build(plan, self.rank, self.world_size, self.timeout_s)
        return self._groups[key]

    def ping(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "loaded": self.patcher is not None}

    @_logged
    def all_reduce_sum(self, value: float) -> float:
        """Sum ``value`` over the default group: proves the process group works end to end."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], device="cpu" if self.backend == "gloo" else "cuda")
        dist.all_reduce(t)
        return float(t.item())

    def free(self) -> None:
        """Drop the model, a pending prefetch and cached groups (the process group stays; it dies with the actor)."""
        if self._prefetch is not None:
            self._prefetch.cancel()
            self._prefetch = None
        self.patcher = None
        self.spec = None
        self._loaded_plain = False
        self._deltas.clear()
        self._groups.clear()
        self._graph_warm.clear()
        gc.collect()
        try:
            import comfy.model_management as mm

            mm.soft_empty_cache()
        except ImportError:
            pass  # ComfyUI was never imported in this process: nothing is cached there


def _import_comfy(
    comfy_root: str | None, cpu: bool, cli_args: dict[str, Any] | None, file_bytes: int | None, mode: str,
    prefetch: Callable[[resident.ResidentDecision], str] | None = None,
) -> dict[str, Any]:
    """Import ComfyUI (flags, model management, loader) with the weight placement decided first.

    ComfyUI fixes CPU vs CUDA and its VRAM mode when ``comfy.model_management`` is imported, so the
    decision (and ``--highvram`` for a resident rank) comes before; then ``prefetch(decision)`` may start
    reading the model file, which overlaps the seconds of ComfyUI imports. The loader is imported here
    too, so that ``load_model``'s time is the load alone. Returns ``resident``, ``resident_reason``,
    ``vram_state``, ``prefetch`` and where the import time went: ``torch_s``, ``cuda_init_s`` (the GPU
    memory query of the decision), ``comfy_mm_s`` (flags + ``comfy.model_management``), ``comfy_sd_s``.
    """
    if not comfy_root:  # ComfyUI comes from PYTHONPATH, imported by load_model with its own defaults
        return {"resident": False, "resident_reason": "no ComfyUI root given", "vram_state": None,
                "prefetch": "off: no ComfyUI root given"}
    t0 = time.perf_counter()
    import torch  # noqa: F401  (timed apart: on GPU hosts the largest single import)

    t1 = time.perf_counter()
    decision = resident.decide_for_rank(cpu, file_bytes, cli_args, mode)  # CUDA ranks: initialises CUDA
    t2 = time.perf_counter()
    started = prefetch(decision) if prefetch is not None else "off"
    t3 = time.perf_counter()
    import_comfy(comfy_root, cpu=cpu, cli_args=resident.worker_flags(cli_args, decision))
    import comfy.model_management as mm

    t4 = time.perf_counter()
    importlib.import_module("comfy.sd")  # the model code: seconds of imports, counted here as import time
    t5 = time.perf_counter()
    final = resident.confirm(decision, mm.vram_state.name)
    return {"resident": final.resident, "resident_reason": final.reason, "vram_state": mm.vram_state.name,
            "prefetch": started, "torch_s": round(t1 - t0, 3), "cuda_init_s": round(t2 - t1, 3),
            "prefetch_start_s": round(t3 - t2, 3), "comfy_mm_s": round(t4 - t3, 3), "comfy_sd_s": round(t5 - t4, 3)}


def _release(prefetch: Prefetch, patcher: Any) -> dict[str, Any]:
    """Free the prefetch buffer once ComfyUI holds the weights, and say whether it was freed.

    Tensors of the model that are views of the buffer (a layer that adopted the file's tensor) are
    copied out first; then the cached block goes back to the driver, as ComfyUI's own loads leave it.
    """
    copied = 0
    if prefetch.buffer_alive():
        gc.collect()  # a reference cycle may be all that still holds the state dict
    if prefetch.buffer_alive():
        try:
            copied = prefetch.release_aliases(patcher.model)
        except Exception:  # noqa: BLE001 (the model is loaded and correct; only memory is at stake)
            log.warning("xDiT: copying model tensors out of the prefetched buffer failed", exc_info=True)
    freed = not prefetch.buffer_alive()
    if freed:
        try:
            import comfy.model_management as mm

            mm.soft_empty_cache()  # the buffer's cached block goes back to the driver
        except ImportError:
            pass  # no ComfyUI in this process (unit tests): nothing cached
    else:
        log.warning("xDiT: the prefetched copy of %s (%.1f GB) is still referenced after ComfyUI's load; it stays "
                    "in GPU memory", prefetch.path, prefetch.bytes_total / 1e9)
    return {"prefetch_aliases_copied": copied, "prefetch_buffer_freed": freed}


def _spec_of(patcher: Any) -> Any:
    from ..models import lookup_config

    return lookup_config(patcher.model.model_config)
