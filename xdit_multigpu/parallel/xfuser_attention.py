"""Optional USP backend: xfuser's ``xFuserLongContextAttention`` (``XDIT_ATTENTION_BACKEND=xfuser``).

Same contract as the default yunchang path in ``attention.py``: q/k/v ``(B, T + L_local, H, D)`` with the
replicated text rows first, out the same rows, exact over the full image. xfuser takes the text as
``joint_tensor_*`` with ``joint_strategy="front"``: text queries are prepended to the local image queries,
the text K/V (head-sliced per Ulysses rank by xfuser) join the *first* ring step only, so each is counted
once in the softmax, and the output rows come back as ``[text | local image]``, our layout.

Why a loader: ``import xfuser`` runs its package ``__init__``, which imports every diffusers pipeline and
transformers (+418 MB of dependencies, several undeclared). We need two modules of it. ``load()`` registers
bare package objects for ``xfuser``, ``xfuser.core`` and ``xfuser.core.distributed`` pointing at the
installed files (no ``__init__`` runs) and imports only the real ``long_ctx_attention`` and
``cache_manager`` packages. The bare packages stay in ``sys.modules``, so this runs only inside this pack's
own worker processes (sequence parallel never runs in ComfyUI's process); if xfuser is already imported
for real, that module is used as is.

Kernels: FA3 or flash-attn when installed, else torch's flash (half) / efficient kernel, all returning a
real log-sum-exp (ring > 1 needs it; probed once per device and dtype like the default path). On CPU
(tests) our own LSE kernel is handed to xfuser as its ``attn_processor``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from ..patching import swapped
from .attention import FirstStepJoint, bind_long_context_attention
from .kernels import Kernel, verify_lse

BACKEND_ENV = "XDIT_ATTENTION_BACKEND"


def _bare_package(name: str, path: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [path]  # submodules import from the installed files; no __init__ runs
    mod.__package__ = name
    sys.modules[name] = mod
    return mod


def _distributed_stub(root: str) -> None:
    """``xfuser.core.distributed`` without its ``__init__`` (which builds xfuser's own process groups)."""
    dist = _bare_package("xfuser.core.distributed", os.path.join(root, "core", "distributed"))

    def get_ring_parallel_world_size() -> int:  # only xfuser's Sana subclass calls it
        raise RuntimeError("xfuser's process groups are not used by xdit_multigpu")

    dist.get_ring_parallel_world_size = get_ring_parallel_world_size  # type: ignore[attr-defined]
    runtime = types.ModuleType("xfuser.core.distributed.runtime_state")
    runtime.runtime_state_is_initialized = lambda: False  # type: ignore[attr-defined]  (no PipeFusion cache)
    sys.modules[runtime.__name__] = runtime


@functools.lru_cache(maxsize=1)
def load() -> tuple[type, Any]:
    """``(xFuserLongContextAttention, AttnType)``; raises ``ImportError`` saying what is missing."""
    real = sys.modules.get("xfuser")
    if real is not None and getattr(real, "__file__", None):
        mod = importlib.import_module("xfuser.core.long_ctx_attention")
        return mod.xFuserLongContextAttention, mod.AttnType
    if real is not None:  # our bare package from an earlier, failed attempt
        root = real.__path__[0]
    else:
        spec = importlib.util.find_spec("xfuser")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("xfuser is not installed (pip install xfuser)")
        root = list(spec.submodule_search_locations)[0]
    if "xfuser.core.long_ctx_attention" not in sys.modules:
        _bare_package("xfuser", root)
        _bare_package("xfuser.core", os.path.join(root, "core"))
        _distributed_stub(root)
    # Without a GPU, xfuser defines its attention class as a subclass of ``object``; CPU ranks (tests)
    # import it as if CUDA were present and run it with our CPU kernel.
    importlib.import_module("xfuser.envs")  # its package checks query the GPU when CUDA seems present
    if torch.cuda.is_available():
        mod = _import_attention(root)
    else:
        with swapped(torch.cuda, "is_available", lambda: True):
            mod = _import_attention(root)
    return mod.xFuserLongContextAttention, mod.AttnType


def _import_attention(root: str) -> Any:
    """``xfuser.core.long_ctx_attention`` with its ``ring`` package reduced to the flash ring function.

    The ring package's ``__init__`` also imports the NPU ring, which needs a newer yunchang than xfuser
    declares (``update_npu_out``); the CUDA/CPU path never uses it.
    """
    name = "xfuser.core.long_ctx_attention.ring"
    if name not in sys.modules:
        _bare_package(name, os.path.join(root, "core", "long_ctx_attention", "ring"))
    ring = sys.modules[name]
    flash = importlib.import_module(name + ".ring_flash_attn")
    for attr in ("xdit_ring_flash_attn_func", "xdit_sana_ring_flash_attn_func"):
        setattr(ring, attr, getattr(flash, attr))
    return importlib.import_module("xfuser.core.long_ctx_attention")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _attn_type_for(attn_type: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """xfuser's kernel choice for this device/dtype (None: our CPU kernel as ``attn_processor``)."""
    if device.type == "cpu":
        return None
    half = dtype in (torch.float16, torch.bfloat16)
    if half and _has("flash_attn_interface"):
        return attn_type.FA3
    if half and _has("flash_attn"):
        return attn_type.FA
    return attn_type.TORCH_FLASH if half else attn_type.TORCH_EFFICIENT


def _as_kernel(fn: Callable[..., Any]) -> Kernel:
    """A yunchang/xfuser ``fwd-only`` kernel in ``kernels.Kernel`` form, for ``verify_lse``."""

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None, return_softmax=False)[:2]
        return out, lse

    kernel.__name__ = getattr(fn, "__name__", "xfuser kernel")
    return kernel


class XFuserUSP:
    """``xFuserLongContextAttention`` bound to our Ulysses / ring groups (one per parallelised patcher).

    ``kernel_for(q)``: our LSE kernel for a device xfuser has none for (CPU ranks), already verified by
    the caller (``SequenceAttention.kernel_for``); xfuser's own GPU kernels are verified here.
    """

    calls = 0  # attention calls through xfuser in this process (tests check the backend really ran)

    def __init__(self, ulysses_pg: Any, ring_pg: Any, ring: int, kernel_for: Callable[[torch.Tensor], Kernel]) -> None:
        cls, self._attn_type = load()
        self._attn = bind_long_context_attention(cls, ulysses_pg, ring_pg, attn_type=self._attn_type.TORCH_FLASH)
        self._ring = ring
        self._kernel_for = kernel_for
        self._configured: tuple[str, torch.dtype, int] | None = None

    def _configure(self, q: torch.Tensor) -> None:
        """Pick the kernel for this device / dtype / head size, once (the model keeps them for the run)."""
        key = (str(q.device), q.dtype, q.shape[-1])
        if key == self._configured:
            return
        from yunchang.kernels import select_flash_attn_impl  # noqa: PLC0415

        attn_type = _attn_type_for(self._attn_type, q.device, q.dtype)
        if attn_type is None:
            # xfuser's ring step calls ``attn_processor(q, k, v, dropout_p=..., softmax_scale=..., ...)``
            # when the attention type is none of its own.
            self._attn.attn_type, self._attn.attn_processor = None, FirstStepJoint(self._kernel_for(q), None, None)
        else:
            self._attn.attn_type, self._attn.attn_processor = attn_type, None
            if self._ring > 1:
                verify_lse(_as_kernel(select_flash_attn_impl(attn_type, stage="fwd-only")), q.device, q.dtype,
                           q.shape[-1])
        self._configured = key

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int) -> torch.Tensor:
        """q/k/v ``(B, T + L_local, H, D)`` ([text | image]) -> same layout, exact over the full image.
        The caller routes head counts Ulysses cannot split to the exact all-gather path."""
        self._configure(q)
        XFuserUSP.calls += 1
        scale = 1.0 / math.sqrt(q.shape[-1])
        img = (q[:, text:].contiguous(), k[:, text:].contiguous(), v[:, text:].contiguous())
        if not text:
            return self._attn(None, *img, softmax_scale=scale)
        return self._attn(
            None, *img, softmax_scale=scale,
            joint_tensor_query=q[:, :text].contiguous(), joint_tensor_key=k[:, :text].contiguous(),
            joint_tensor_value=v[:, :text].contiguous(), joint_strategy="front",
        )
