"""Request tensors the ranks already hold are not sent again: the last call's tensors stay on every rank.

ComfyUI caches node outputs, so re-queuing a prompt with a new seed hands the KSampler the very same
CONDITIONING tensors (and the same empty latent) as the run before: a Flux request carries 8-16 MB of
fp32 T5 context that every rank received last time. ``SentTensors`` (the driver's side, one per
executor) remembers the large CPU tensors of the last call that carried any, by identity, with a copy
of their bytes; in the next call such a tensor, byte-for-byte unchanged, travels as ``Held(key)`` (a few
bytes) and the others as ``Keep(key, tensor)`` (out-of-band bytes, as ``transport`` sends them). On a
rank, unpickling a ``Keep`` stores the tensor and a ``Held`` looks it up; ``end_of_args`` then drops
whatever the call did not name, so driver and ranks always agree: both hold exactly the last call's
tensors (a call without large tensors, e.g. a ping, leaves both alone).

Safety: the driver compares the bytes with a copy it takes once the call is submitted (while the ranks
work), not a version counter, because ComfyUI runs nodes under ``torch.inference_mode`` and inference
tensors have none (numpy compares 8 MB in ~0.3 ms on one thread, far less than sending it). A rank
refuses (an error: the engine falls back on one device and rebuilds the pool) a held tensor that was
changed in place during the previous call, which ComfyUI's own caching already rules out (the stock
sampler gets the same cached tensors on every re-run). After a failed call the driver forgets everything.
Memory: at most ``KEEP_MAX_BYTES`` per call are kept (larger payloads, e.g. first-time LoRA weights, travel
plainly), on every rank and once more as the driver's copy.

Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .transport import _rebuild, _Wire, byte_view, wire_fields, wrap_tensors

KEEP_MAX_BYTES = 64 * 2**20  # per call: what the ranks may keep between calls (a Flux request: ~18 MB)


class Held:
    """A tensor every rank holds from the last call: travels as its key."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _held, (self.key,)


class Keep:
    """A tensor sent now (out of band, like ``transport._Wire``) that every rank keeps under ``key``."""

    __slots__ = ("key", "tensor")

    def __init__(self, key: int, tensor: Any) -> None:
        self.key = key
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _keep, (self.key, *wire_fields(self.tensor))


@dataclass(frozen=True)
class _Sent:
    tensor: Any  # held here too, so its id() cannot be reused by another object
    layout: tuple[Any, ...]  # dtype, shape, stride, data pointer when sent
    snapshot: Any  # uint8 copy of its bytes as sent (None until ``SentTensors.snapshot``)
    key: int


Table = dict[int, _Sent]  # id(tensor) -> what was sent


def _layout(t: Any) -> tuple[Any, ...]:
    return t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr()


def _same_bytes(a: Any, b: Any) -> bool:
    """Bitwise equality of two uint8 tensors, compared by numpy as the widest integer words their length
    allows. numpy, not torch: one thread at memory speed (8 MB in ~0.3 ms). torch's compare wakes every
    intra-op thread, and on a 64-core GPU host beside four busy ranks that cost ~20 ms per request."""
    import numpy as np  # noqa: PLC0415

    if a.numel() != b.numel():
        return False
    x, y = a.numpy(), b.numpy()
    for word in (np.int64, np.int32):
        if x.size % np.dtype(word).itemsize == 0:
            return bool(np.array_equal(x.view(word), y.view(word)))
    return bool(np.array_equal(x, y))


def _copy(raw: Any) -> Any:
    """A private copy of a uint8 tensor, made by numpy on one thread (see ``_same_bytes`` for why)."""
    import torch  # noqa: PLC0415

    return torch.from_numpy(raw.numpy().copy())


class SentTensors:
    """The driver's record of what every rank holds. Not thread-safe: the pool serialises its calls."""

    def __init__(self) -> None:
        self._last: Table = {}
        self._next_key = 0

    def mark(self, obj: Any) -> tuple[Any, Table | None]:
        """``obj`` with each large CPU tensor replaced by ``Held`` (every rank has it, same bytes) or
        ``Keep`` / the plain out-of-band wrapper (see ``transport.pack``), and the table to ``commit``
        once the call succeeded (None: no large tensor in ``obj``; the ranks keep what they hold)."""
        table: Table = {}
        budget = [KEEP_MAX_BYTES]

        def leaf(t: Any) -> Any:
            prev = self._last.get(id(t))
            if (prev is not None and prev.tensor is t and prev.layout == _layout(t) and prev.snapshot is not None
                    and _same_bytes(byte_view(t), prev.snapshot)):
                table[id(t)] = prev
                return Held(prev.key)
            nbytes = t.numel() * t.element_size()
            if nbytes > budget[0]:
                return _Wire(t)  # too much to keep: sent as before, not remembered
            budget[0] -= nbytes
            self._next_key += 1
            table[id(t)] = _Sent(t, _layout(t), None, self._next_key)
            return Keep(self._next_key, t)

        out = wrap_tensors(obj, leaf)
        return out, (table or None)

    def snapshot(self, table: Table | None) -> None:
        """Copy the bytes of the tensors ``table`` sends now; called once they were serialised (after the
        call was submitted, while the ranks work: the copy is off the request's critical path)."""
        for key, sent in (table or {}).items():
            if sent.snapshot is None:
                table[key] = dataclasses.replace(sent, snapshot=_copy(byte_view(sent.tensor)))

    def commit(self, table: Table | None) -> None:
        """The call carrying ``table`` succeeded on every rank: they now hold exactly its tensors."""
        if table is not None:
            self._last = table

    def forget(self) -> None:
        """A call failed (or may not have reached every rank): send every tensor again next time."""
        self._last = {}

    def held_keys(self) -> list[int]:
        """Keys the ranks hold, for tests and logs."""
        return sorted(s.key for s in self._last.values())


# -- rank side (module state: one actor per process) -------------------------------------------------
_HELD: dict[int, tuple[Any, int]] = {}  # key -> (tensor, its version when kept)
_NAMED: set[int] = set()  # keys the arguments being unpickled named (since the last end_of_args)


def _keep(key: int, raw: Any, dtype_name: str, shape: tuple[int, ...]) -> Any:
    """Rank side of ``Keep``: the tensor in fresh writable memory, kept for the next call."""
    import torch  # noqa: PLC0415

    with torch.inference_mode(False):  # a normal tensor: its version counter shows any in-place change
        t = _rebuild(raw, dtype_name, shape)
    _HELD[key] = (t, t._version)
    _NAMED.add(key)
    return t


def _held(key: int) -> Any:
    """Rank side of ``Held``: the tensor this rank kept from the last call."""
    entry = _HELD.get(key)
    if entry is None:
        raise RuntimeError(f"request tensor #{key} is not held by this rank (driver and rank out of step)")
    t, version = entry
    if t._version != version:
        raise RuntimeError(f"request tensor #{key} ({tuple(t.shape)}) was modified in place during the previous "
                           "call on this rank, so it no longer equals what the driver holds")
    _NAMED.add(key)
    return t


def end_of_args() -> None:
    """Called on the rank once a call's arguments are unpickled: keep exactly the tensors that call named
    (when it named any), as the driver's ``commit`` does."""
    if not _NAMED:
        return
    for key in [k for k in _HELD if k not in _NAMED]:
        del _HELD[key]
    _NAMED.clear()


def held_on_this_rank() -> list[int]:
    """Keys this rank holds (tests)."""
    return sorted(_HELD)
