"""Cheap transport of requests and results through Ray: large CPU tensors travel as out-of-band buffers.

Torch pickles a CPU tensor through its storage's own reduce, which ``torch.save``-s the bytes into an
in-band ``bytes`` object. ``pack`` replaces each large tensor by a ``_Wire`` whose ``__reduce__`` hands
pickle a numpy ``uint8`` view of the tensor's bytes; Ray's pickle-5 serializer sends such buffers out of
band (one copy into the object store, none through pickle). Measured on a 2-core CPU box for a ~19 MB
Flux-shaped request: ``ray.put`` 47 -> 11 ms, a call with it as an inline argument 52 -> 17 ms.

Unpickling a ``_Wire`` yields a plain writable ``torch.Tensor`` (``_rebuild``), so the receiving side
needs no code. ``pack`` never mutates its input and returns the very same object when nothing inside it
was wrapped. Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

MIN_WIRE_BYTES = 64 * 1024  # below this, torch's own pickling costs less than the extra buffer


class _Wire:
    """A CPU tensor on its way through pickle; never seen by the receiver (it gets the tensor)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, tuple[Any, str, tuple[int, ...]]]:
        return _rebuild, wire_fields(self.tensor)


def byte_view(tensor: Any) -> Any:
    """``tensor``'s bytes as they travel: a flat ``uint8`` tensor (a copy only for a non-contiguous,
    conjugated or negated tensor). A uint8 view carries every dtype's exact bits (bf16 and float8 have no
    numpy dtype)."""
    import torch  # noqa: PLC0415

    return tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def wire_fields(tensor: Any) -> tuple[Any, str, tuple[int, ...]]:
    """``(raw, dtype name, shape)`` for ``_rebuild``: ``raw`` is a numpy ``uint8`` view of the bytes (no copy
    for a contiguous tensor), which pickle protocol 5 hands to Ray as an out-of-band buffer."""
    return byte_view(tensor).numpy(), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)


def _rebuild(raw: Any, dtype_name: str, shape: tuple[int, ...]) -> Any:
    """The tensor a ``_Wire`` stood for: same dtype, shape and bits, in fresh writable memory.

    ``raw`` may be a read-only view into Ray's shared object store: copying it out keeps a sampler that
    writes in place from touching shared memory (and from failing on a read-only buffer).
    """
    import torch  # noqa: PLC0415

    # numpy copies on one thread at memory speed, into private memory it allocates with huge-page advice
    # (an 18 MB request: ~0.5 ms). torch.tensor(raw) would wake every intra-op thread, which on a many-core
    # host beside busy ranks cost milliseconds per call (bench.dispatch); torch.empty + memcpy takes its
    # 4 KB-page faults, 5x slower here. The tensor owns the copy through numpy (so its storage is not
    # resizable, as for any from_numpy tensor).
    dtype = getattr(torch, dtype_name)
    if raw.size == 0:  # numpy hands empty arrays a zero stride, which a dtype view refuses
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


def _wants_wire(obj: Any) -> bool:
    """A plain, dense, gradient-free CPU tensor of at least ``MIN_WIRE_BYTES`` (torch already imported).

    Subclasses (``Parameter``, ComfyUI's own types), quantized / sparse / nested / named tensors and
    tensors that need grad keep torch's pickling, which knows how to rebuild them.
    """
    import torch  # noqa: PLC0415

    return (
        type(obj) is torch.Tensor
        and obj.device.type == "cpu"
        and obj.layout == torch.strided
        and not obj.requires_grad
        and not obj.is_quantized
        and not obj.is_nested
        and not any(getattr(obj, "names", None) or ())  # named tensors (gone from recent torch)
        and obj.numel() * obj.element_size() >= MIN_WIRE_BYTES
    )


def pack(obj: Any) -> Any:
    """``obj`` with every large CPU tensor wrapped for out-of-band transport (see the module docstring).

    Walks exact ``list``, ``tuple`` and ``dict`` (any keys; values only) and dataclass instances;
    anything else (namedtuples, dict subclasses, ComfyUI objects inside conditioning dicts) stays as it
    is. A container or dataclass is copied only when something inside it changed, else returned as is
    (``pack(x) is x``). A tensor or container reached twice is packed once and stays shared.
    """
    return wrap_tensors(obj, _Wire)


def wrap_tensors(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``pack`` with ``leaf(tensor)`` as the wrapper of each large CPU tensor (same walk, same rules, same
    sharing); ``leaf`` is called once per distinct tensor and must return a picklable stand-in."""
    import sys  # noqa: PLC0415

    if "torch" not in sys.modules:  # no tensor can exist without torch: nothing to wrap, nothing to import
        return obj
    return _Packer(leaf).walk(obj)


class _Packer:
    """One ``pack`` call: the memo that keeps shared objects shared and stops at cycles."""

    def __init__(self, leaf: Callable[[Any], Any]) -> None:
        self._leaf = leaf
        self._done: dict[int, Any] = {}  # id(original) -> packed (the originals stay alive in the input)
        self._active: set[int] = set()  # containers being walked (a cycle back to one is left as is)

    def walk(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in (str, int, float, bool, bytes, type(None)):
            return obj
        key = id(obj)
        if key in self._done:
            return self._done[key]
        if key in self._active:
            return obj
        if _wants_wire(obj):
            out: Any = self._leaf(obj)
        elif kind is list or kind is tuple or kind is dict or _is_dataclass_instance(obj):
            self._active.add(key)
            try:
                out = self._walk_container(obj)
            finally:
                self._active.discard(key)
        else:
            return obj
        self._done[key] = out
        return out

    def _walk_container(self, obj: Any) -> Any:
        """A copy of list / tuple / dict / dataclass ``obj`` with packed parts, or ``obj`` if none changed."""
        kind = type(obj)
        if kind is dict:
            items = {k: self.walk(v) for k, v in obj.items()}
            return items if any(items[k] is not v for k, v in obj.items()) else obj
        if kind is list or kind is tuple:
            parts = [self.walk(v) for v in obj]
            return kind(parts) if any(p is not v for p, v in zip(parts, obj)) else obj
        return self._walk_dataclass(obj)

    def _walk_dataclass(self, obj: Any) -> Any:
        """A shallow copy of dataclass ``obj`` with its changed fields set, or ``obj`` when none changed.

        Why not ``dataclasses.replace``: it reruns ``__init__`` / ``__post_init__`` (which may inspect a
        field that is now a ``_Wire``) and cannot set ``init=False`` fields. ``object.__setattr__`` on a
        private copy is how frozen dataclasses set their own fields too.
        """
        changed = {}
        for f in dataclasses.fields(obj):
            if not hasattr(obj, f.name):  # an init=False field never assigned
                continue
            value = getattr(obj, f.name)
            packed = self.walk(value)
            if packed is not value:
                changed[f.name] = packed
        if not changed:
            return obj
        new = copy.copy(obj)
        for name, value in changed.items():
            object.__setattr__(new, name, value)
        return new


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)
