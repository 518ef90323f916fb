"""CUDA graphs for the denoiser call: capture ComfyUI's ``apply_model`` once per input signature, replay it.

Why: at 1024² a DiT step is bound by the host launching ComfyUI's eager kernels one by one (Flux: 57
blocks, hundreds of small kernels each). Sequence / CFG parallel gives every rank less GPU work but the
same number of launches, so without graphs 1024² does not scale. A replayed graph is one launch.

Contract (one ``GraphedApplyModel`` per sampled patcher clone, i.e. per request; installed as the
innermost ``APPLY_MODEL`` wrapper, so every wrapper of other code runs eagerly around it):

* The **signature** of a call is its whole argument tree (``x``, ``t``, conds, ``transformer_options``):
  every tensor's shape / dtype / device / strides, every number and string, and the identity of every
  other object. A call replays only a graph captured from a call with the same signature; what differs
  between such calls is tensor *values*, which are copied into the captured input tensors first.
* Call 1 of a signature runs eagerly (lazy initialisation: NCCL communicators, cuBLAS handles), call 2
  captures and replays, later calls copy and replay. Outputs are cloned out of the graph's memory.
* **Warm start** (``WarmShapes``, owned by the worker for one loaded model and one set of process
  groups): once a call *shape* (``shape_of``: the signature without object identities, constants' values
  and small tensors' shapes, e.g. the step count's sigmas) has run on this rank, a later
  request's first call of that shape is captured at once: the lazy initialisation the eager call was
  for is done. A shape whose warm start fails to capture goes back to eager-then-capture for good.
  ``XDIT_CUDA_GRAPHS_WARM_START=0`` turns it off (A/B; read by the worker per request).
* Whatever fails during capture (a host sync, an unsupported op) leaves that signature eager (logged);
  more than ``max_graphs`` signatures, a ControlNet, CPU tensors or partly offloaded weights: eager.
* ``CudaGraphs.AUTO`` also stays eager when code other than ComfyUI's model and this pack runs inside
  the call (other nodes' patches, wrappers, attention overrides): such code may keep per-step Python
  state, which a replay would not run. ``CudaGraphs.ON`` replays it anyway (the user vouches for it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import CudaGraphs, env_flag

log = logging.getLogger("xdit_multigpu.graphs")

WRAPPER_KEY = "xdit_multigpu.cuda_graphs"
OURS = "xdit_multigpu"
# transformer_options entries whose values run inside the model call.
CODE_ENTRIES = ("patches", "patches_replace", "wrappers", "optimized_attention_override")
# ModelPatcher object patches that are plain math objects of ComfyUI's own nodes (ModelSampling*).
SAFE_OBJECT_PATCHES = frozenset({"model_sampling"})
_PRIMITIVE = (int, float, str, bool, type(None), bytes)


@dataclass
class GraphStats:
    """What one request's denoiser calls did (rank-local; the benchmark reports rank 0's)."""

    eager: int = 0
    captured: int = 0
    replayed: int = 0
    off_reason: str | None = None  # why graphs were not used (for the whole request), if so
    failed: list[str] = field(default_factory=list)  # capture errors, one per signature
    last_miss: str | None = None  # how the last new signature differed from the previous one (diagnostics)
    warm_starts: int = 0  # of ``captured``: captured on a signature's first call (no eager warm-up)
    warm_start_failed: list[str] = field(default_factory=list)  # such captures that failed (then eager)

    def as_dict(self) -> dict[str, Any]:
        return {"eager": self.eager, "captured": self.captured, "replayed": self.replayed,
                "off_reason": self.off_reason, "failed": list(self.failed), "last_miss": self.last_miss,
                "warm_starts": self.warm_starts, "warm_start_failed": list(self.warm_start_failed)}


# -- the argument tree ---------------------------------------------------------------------------------
def flatten(obj: Any, tensors: list[Any], sig: list[Any], device_type: str = "cuda") -> None:
    """Append ``obj``'s tensors on ``device_type`` to ``tensors`` and its structure (everything but those
    tensors' values) to ``sig``. Other tensors are constants of the graph: small ones by value, else identity."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device.type != device_type:
            small = obj.numel() <= 64
            sig.append(("const", tuple(obj.shape), obj.dtype, tuple(obj.reshape(-1).tolist()) if small else id(obj)))
            return
        tensors.append(obj)
        sig.append(("T", tuple(obj.shape), obj.dtype, obj.device, tuple(obj.stride())))
    elif type(obj) is dict:
        sig.append(("D", len(obj)))
        for k, v in obj.items():
            sig.append(k)
            flatten(v, tensors, sig, device_type)
    elif type(obj) in (list, tuple):
        sig.append(("L" if type(obj) is list else "U", len(obj)))
        for v in obj:
            flatten(v, tensors, sig, device_type)
    elif isinstance(obj, _PRIMITIVE) or isinstance(obj, (torch.dtype, torch.device)):
        sig.append((type(obj).__name__, obj))
    else:
        sig.append(("O", id(obj)))


SMALL_TENSOR = 64  # elements: at most this many, a tensor's shape does not name a call shape (warm starts)


def shape_of(sig: tuple[Any, ...]) -> tuple[Any, ...]:
    """The call shape of a signature, for warm starts: without object identities, off-device constants'
    values, and the shapes of small tensors. Two requests' calls then agree when only per-request objects
    or the step count differ (ComfyUI passes ``sample_sigmas``, steps + 1 values, in the call). The lazy
    initialisation a warm-up call is for follows the large tensors' shapes; the full signature still
    decides which captured graph a call may replay, and a warm start that fails to capture costs one
    eager call (``GraphedApplyModel._capture``)."""
    out = []
    for e in sig:
        if type(e) is tuple and e and e[0] == "O":
            e = ("O",)
        elif type(e) is tuple and e and e[0] == "const":
            e = e[:3]
        elif type(e) is tuple and e and e[0] == "T" and _numel(e[1]) <= SMALL_TENSOR:
            e = ("t", e[2], e[3])
        out.append(e)
    return tuple(out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


WARM_START_ENV = "XDIT_CUDA_GRAPHS_WARM_START"


def warm_start_enabled() -> bool:
    """``XDIT_CUDA_GRAPHS_WARM_START`` (default on): whether the worker hands its ``WarmShapes`` to a request."""
    return env_flag(WARM_START_ENV, True)


class WarmShapes:
    """Call shapes (``shape_of``) that already ran on this rank with one loaded model and one set of
    process groups. Their lazy initialisation (NCCL communicators, cuBLAS workspaces, caches that live
    as long as the model) is done, so a later request may capture their first call instead of running it
    eagerly first. The worker owns one per groups key and clears them when the model or groups change."""

    def __init__(self) -> None:
        self._ran: set[tuple[Any, ...]] = set()
        self._refused: set[tuple[Any, ...]] = set()  # a warm start failed: never again for this shape

    def ready(self, shape: tuple[Any, ...]) -> bool:
        return shape in self._ran and shape not in self._refused

    def ran(self, shape: tuple[Any, ...]) -> None:
        self._ran.add(shape)

    def refuse(self, shape: tuple[Any, ...]) -> None:
        self._refused.add(shape)


def rebuild(obj: Any, tensors: Any, device_type: str = "cuda") -> Any:
    """``obj`` with its tensors on ``device_type`` replaced, in ``flatten`` order, by ``next(tensors)``;
    containers are new (dicts, lists, tuples), everything else is the same object."""
    import torch

    if isinstance(obj, torch.Tensor):
        return next(tensors) if obj.device.type == device_type else obj
    if type(obj) is dict:
        return {k: rebuild(v, tensors, device_type) for k, v in obj.items()}
    if type(obj) is list:
        return [rebuild(v, tensors, device_type) for v in obj]
    if type(obj) is tuple:
        return tuple(rebuild(v, tensors, device_type) for v in obj)
    return obj


def _first_difference(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """Where two signatures part (the entry before it names the argument), for the "why no replay" log."""
    if len(old) != len(new):
        return f"{len(old)} -> {len(new)} entries"
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"entry {i} after {new[i - 1]!r}: {a!r} -> {b!r}"[:300] if i else f"entry 0: {a!r} -> {b!r}"[:300]
    return "equal"


def inputs_to_device(args: tuple[Any, ...], kwargs: dict[str, Any], device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's conds on ``device`` up front: ComfyUI hands ``apply_model`` the text context (and other
    conds) on the CPU and copies them to the device inside ``_apply_model`` (``cast_to_device`` /
    ``convert_tensor``), a new CPU tensor every step. Inside a graph that copy would read the captured
    step's CPU tensor forever; copied here, the graph reads device inputs that are refreshed every call.
    Same values: ``_apply_model`` casts the device copy exactly as it cast the CPU tensor.
    ``transformer_options`` and ``control`` are left as they are (code may expect them where they are).
    """
    import torch

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.device != device:
            return v.to(device)
        if type(v) is list:
            return [move(e) for e in v]
        return v

    head = tuple(move(a) if i < 4 else a for i, a in enumerate(args))  # x, t, c_concat, c_crossattn
    rest = {k: v if k in ("transformer_options", "control") else move(v) for k, v in kwargs.items()}
    return head, rest


# -- what runs inside the call ---------------------------------------------------------------------------
def is_ours(fn: Any) -> bool:
    """True for a function / bound method / partial / callable object defined in this package."""
    for attr in ("__func__", "func"):
        fn = getattr(fn, attr, fn)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return isinstance(module, str) and (module == OURS or module.startswith(OURS + "."))


def _code_in(value: Any) -> list[Any]:
    """Callables inside one ``transformer_options`` entry (dicts / lists of them, any depth)."""
    if isinstance(value, Mapping):
        return [c for v in value.values() for c in _code_in(v)]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _code_in(v)]
    return [value] if callable(value) else []


def foreign_code(transformer_options: Mapping[str, Any]) -> str | None:
    """The first patch / wrapper / override inside the model call that is not this pack's, or None."""
    for entry in CODE_ENTRIES:
        for fn in _code_in(transformer_options.get(entry, {})):
            if not is_ours(fn):
                return f"{entry}: {getattr(fn, '__qualname__', type(fn).__name__)}"
    return None


def foreign_object_patches(object_patches: Mapping[str, Any]) -> str | None:
    for key, value in object_patches.items():
        if key not in SAFE_OBJECT_PATCHES and not is_ours(value):
            return f"object patch {key}"
    return None


# -- the wrapper ---------------------------------------------------------------------------------------
class _Graph:
    """One captured call: its input tensors (copied into before replay) and output."""

    def __init__(self, graph: Any, inputs: list[Any], output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output

    def replay(self, tensors: list[Any]) -> Any:
        for dst, src in zip(self.inputs, tensors):
            dst.copy_(src)
        self.graph.replay()
        return self.output.clone()


class CudaBackend:
    """``torch.cuda.graph`` capture; all graphs of a request share one memory pool."""

    device_type = "cuda"

    def __init__(self) -> None:
        self._pool: Any = None

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        import torch

        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        self._pool = graph.pool()
        return graph, out


class GraphedApplyModel:
    """The ``APPLY_MODEL`` wrapper (see the module docstring for the contract)."""

    def __init__(self, mode: CudaGraphs, backend: Any = None, max_graphs: int = 4,
                 warm: WarmShapes | None = None) -> None:
        self.mode = mode
        self.backend = backend or CudaBackend()
        self.max_graphs = max_graphs
        self.warm = warm
        self.stats = GraphStats()
        self._calls: dict[tuple[Any, ...], int] = {}
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: capture failed, stay eager

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        why = self._eager_reason(executor, args, kwargs)
        if why is not None:
            return self._eager(executor, args, kwargs, why)
        args, kwargs = inputs_to_device(args, kwargs, args[0].device)
        tensors: list[Any] = []
        sig: list[Any] = []
        flatten((args, kwargs), tensors, sig, self.backend.device_type)
        key = tuple(sig)
        graph = self._graphs.get(key)
        if graph is not None:
            self.stats.replayed += 1
            return graph.replay(tensors)
        seen = self._calls.get(key, 0)
        if seen == 0 and self._calls:
            self.stats.last_miss = _first_difference(next(reversed(self._calls)), key)
        self._calls[key] = seen + 1
        shape = shape_of(key) if self.warm is not None else None
        if key in self._graphs:  # its capture failed: eager
            return self._eager(executor, args, kwargs, None)
        if seen == 0 and not (shape is not None and self.warm.ready(shape)):  # this signature's warm-up call
            out = self._eager(executor, args, kwargs, None)
            if shape is not None:
                self.warm.ran(shape)
            return out
        if len(self._graphs) >= self.max_graphs:
            self.stats.off_reason = f"more than {self.max_graphs} input signatures"
            return self._eager(executor, args, kwargs, self.stats.off_reason)
        return self._capture(executor, args, kwargs, key, tensors, warm_start=seen == 0)

    def _eager_reason(self, executor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if self.stats.off_reason is not None:
            return self.stats.off_reason
        x, control = args[0], args[4] if len(args) > 4 else kwargs.get("control")
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        if getattr(x, "device", None) is None or x.device.type != self.backend.device_type:
            return f"not on a {self.backend.device_type} device"
        if control is not None:
            return "ControlNet (its residuals are computed per step outside the graph)"
        if getattr(getattr(executor, "class_obj", None), "model_lowvram", False):
            return "weights partly offloaded (lowvram): ComfyUI moves them during the call"
        if self.mode is CudaGraphs.AUTO and isinstance(options, Mapping):
            foreign = foreign_code(options)
            if foreign is not None:
                return f"another node's code runs inside the model call ({foreign}); XDIT_CUDA_GRAPHS=on replays it anyway"
        return None

    def _eager(self, executor: Any, args: tuple[Any, ...], kwargs: dict[str, Any], why: str | None) -> Any:
        if why is not None and self.stats.off_reason is None:
            self.stats.off_reason = why
            log.info("xDiT: CUDA graphs off for this request: %s", why)
        self.stats.eager += 1
        return executor(*args, **kwargs)

    def _capture(self, executor: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: tuple[Any, ...],
                 tensors: list[Any], warm_start: bool = False) -> Any:
        """Capture and replay; on failure run eagerly. A failed warm start is not final: the shape is
        refused for warm starts and the signature's next call captures after this eager one, as usual."""
        inputs = [t.clone() for t in tensors]  # outside the graph's pool: they live as long as the graph
        s_args, s_kwargs = rebuild((args, kwargs), iter(inputs), self.backend.device_type)
        try:
            graph, out = self.backend.capture(lambda: executor(*s_args, **s_kwargs))
        except Exception as e:  # noqa: BLE001  (any capture failure: this signature stays eager)
            error = f"{type(e).__name__}: {e}"[:300]
            if warm_start and self.warm is not None:
                self.warm.refuse(shape_of(key))
                self.stats.warm_start_failed.append(error)
                log.info("xDiT: CUDA graph warm start failed, capturing after a warm-up call instead: %s", error)
            else:
                self._graphs[key] = None
                self.stats.failed.append(error)
                log.warning("xDiT: CUDA graph capture failed, this call shape stays eager: %s", error)
            return self._eager(executor, args, kwargs, None)
        self._graphs[key] = _Graph(graph, inputs, out)
        self.stats.captured += 1
        self.stats.warm_starts += warm_start
        if self.warm is not None:
            self.warm.ran(shape_of(key))
        return self._graphs[key].replay(tensors)


def install(patcher: Any, mode: CudaGraphs, backend: Any = None, family: Any = None,
            warm: WarmShapes | None = None) -> tuple[Any, GraphStats | None]:
    """A clone of ``patcher`` with the graph wrapper innermost (``mode`` OFF: ``patcher`` unchanged).
    ``warm``: the worker's shapes that already ran with this model and these groups (warm start).

    AUTO skips graphs up front for a family not yet verified on GPUs (``family``: its ``ModelSpec``,
    ``cuda_graphs``) and when another node's object patch or hook patches are on the model.
    """
    import comfy.patcher_extension  # noqa: PLC0415  (the package imports without ComfyUI)

    if mode is CudaGraphs.OFF:
        return patcher, None
    stats_only = GraphStats()
    if mode is CudaGraphs.AUTO and family is not None and not getattr(family, "cuda_graphs", False):
        refused = getattr(family, "cuda_graphs_refused", "")
        stats_only.off_reason = (f"{family.display}: {refused}" if refused else
                                 f"not yet verified on GPUs for {family.display}; XDIT_CUDA_GRAPHS=on replays it anyway")
        return patcher, stats_only
    if mode is CudaGraphs.AUTO:
        foreign = foreign_object_patches(getattr(patcher, "object_patches", {}) or {})
        if foreign is None and getattr(patcher, "hook_patches", None):
            foreign = "hook patches (scheduled LoRA)"
        if foreign is not None:
            stats_only.off_reason = f"another node's {foreign}; XDIT_CUDA_GRAPHS=on replays it anyway"
            return patcher, stats_only
    wrapper = GraphedApplyModel(mode, backend, warm=warm)
    clone = patcher.clone()
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    return clone, wrapper.stats
