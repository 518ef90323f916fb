"""Read a ``.safetensors`` model file straight into one device buffer, in background threads.

Why: a resident CUDA rank spends 10+ s importing ComfyUI (mostly Python, the GPU and the disk idle) and
then as long again in ComfyUI's file loader (mmap, pageable copies into the GPU parameters). Started
before the import, ``Prefetch`` reads the file's data section into one GPU allocation meanwhile, and
``load_model`` hands ComfyUI's own state-dict loader the tensors as views of that buffer: the model's
construction and weight loading stay ComfyUI's, only the file read moves earlier.

The file format is parsed here (8-byte little-endian header length, JSON header, data section) and
checked as strictly as ``safetensors`` does (dtype, sizes, contiguous offsets, truncation). Keys come
in ``safe_open(...).keys()`` order (sorted), the order ComfyUI's ``load_torch_file`` builds its dict in.

On CUDA each thread reads its own region through two small pinned host buffers used alternately
(``copy_(non_blocking=True)`` on the thread's own stream; an event tells when a buffer may be
refilled), so pinned memory stays at ``threads * 2 * chunk`` bytes and is released after the read. On
the CPU (tests) the threads read into the buffer directly. Imports torch lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("xdit_multigpu.worker")

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # what ComfyUI's load_torch_file opens with safetensors
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
CHUNK_BYTES = 32 * 1024 * 1024  # one read / one host-to-device copy
READ_THREADS = 4  # pinned memory in use: READ_THREADS * 2 * CHUNK_BYTES = 256 MB per rank
# safetensors dtype name -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def is_safetensors(path: str) -> bool:
    """Whether ComfyUI would open ``path`` with safetensors (the only format prefetched)."""
    return path.lower().endswith(SAFETENSORS_SUFFIXES)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: ``start``/``end`` are byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed header. ``data_offset``: where the data section starts in the file; ``data_bytes``: its length."""

    entries: tuple[TensorEntry, ...]  # sorted by name
    metadata: dict[str, str] | None
    data_offset: int
    data_bytes: int


def read_header_json(path: str) -> tuple[dict[str, Any], int]:
    """``(header object, header length n)`` of a safetensors file: the 8-byte length, then n bytes of
    JSON; the data section starts at ``8 + n``. ``ValueError`` naming the file and the problem.

    The one reader of the format's framing: ``parse_header`` (strict, for the prefetch), the loader
    validation (``engine.model_info``) and the tiny-model cache check build on it.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too small to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} is implausible (corrupt, or not a safetensors file)")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: the header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    return doc, n


def parse_header(path: str) -> Header:
    """Parse and validate the header of ``path``; ``ValueError`` naming the file and the problem."""
    size = os.path.getsize(path)
    doc, n = read_header_json(path)
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    entries = sorted((_entry(path, name, info) for name, info in doc.items()), key=lambda e: e.name)
    end = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):  # no holes, no overlaps (as safetensors checks)
        if e.start != end:
            raise ValueError(f"{path}: tensor {e.name!r} starts at byte {e.start}, expected {end} (invalid offsets)")
        end = e.end
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: the data section needs {8 + n + end} bytes, the file has {size}")
    return Header(tuple(entries), metadata, 8 + n, end)


def _entry(path: str, name: str, info: Any) -> TensorEntry:
    """One header entry, checked: known dtype, non-negative shape, byte length = elements x dtype size."""
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from None
    if dtype not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r}: dtype {dtype} is not supported by the prefetch")
    ints = (*shape, start, end)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints) or end < start:
        raise ValueError(f"{path}: tensor {name!r}: bad shape {list(shape)} or offsets {[start, end]}")
    if end - start != math.prod(shape) * DTYPES[dtype][1]:
        raise ValueError(f"{path}: tensor {name!r}: {end - start} bytes for shape {list(shape)} of {dtype}")
    return TensorEntry(name, dtype, shape, start, end)


def build_state_dict(buf: Any, header: Header) -> dict[str, Any]:
    """The tensors of ``header`` as views of ``buf`` (the data section, uint8), in key order.

    A tensor whose address is not a multiple of its element size cannot be a view (torch refuses,
    kernels assume alignment): it is copied out instead (files written by safetensors itself are aligned).
    """
    import torch

    base = buf.data_ptr()
    sd: dict[str, Any] = {}
    for e in header.entries:
        torch_name, itemsize = DTYPES[e.dtype]
        raw = buf[e.start:e.end]
        if (base + e.start) % itemsize:
            raw = raw.clone()
        sd[e.name] = raw.view(getattr(torch, torch_name)).view(e.shape)
    return sd


def regions(total: int, threads: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``[0, total)`` into at most ``threads`` contiguous regions whose inner bounds fall on chunks."""
    if total <= 0:
        return []
    chunks = math.ceil(total / chunk)
    per = math.ceil(chunks / max(1, min(threads, chunks))) * chunk
    return [(s, min(s + per, total)) for s in range(0, total, per)]


class PrefetchCancelled(Exception):
    """Raised inside the reader threads when ``cancel`` was called."""


def _read_exact(f: Any, view: memoryview, path: str) -> None:
    """Fill ``view`` from ``f`` (unbuffered reads may return less than asked)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: truncated while reading (file changed or shrank)")
        got += n


class Prefetch:
    """One background read of a safetensors file into one buffer on ``device`` (see the module docstring).

    ``start`` returns at once; ``result`` hands over ``(state_dict, metadata)`` exactly once and keeps no
    reference, so the caller's dropping the dict frees the buffer (``buffer_alive`` checks that).
    """

    def __init__(self, path: str, device: Any, threads: int, chunk_bytes: int, staged: bool) -> None:
        self.path = os.path.abspath(path)
        self.device = device
        self.threads, self.chunk_bytes, self.staged = max(1, threads), max(1, chunk_bytes), staged
        self.bytes_total = 0
        self.read_s: float | None = None  # header + allocation + read + views, once done
        self._progress = [0] * self.threads  # bytes read, per reader thread (each writes only its own slot)
        self._lock = threading.Lock()
        self._cancel = threading.Event()  # cancel() was called
        self._stop = threading.Event()  # the readers stop at their next chunk (cancel, or another reader failed)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._result: tuple[dict[str, Any], dict[str, str] | None] | None = None
        self._buffer_ref: Any = None  # a weak reference to the buffer's storage
        self._buffer_ptr = 0
        self._thread = threading.Thread(target=self._run, name="xdit-prefetch", daemon=True)

    @classmethod
    def start(cls, path: str, device: Any, *, threads: int = READ_THREADS, chunk_bytes: int = CHUNK_BYTES,
              staged: bool | None = None) -> Prefetch:
        """Start reading ``path`` into memory on ``device`` (a torch device or its name); returns at once.

        ``staged`` (default: on CUDA devices) reads through two staging buffers per thread; tests set it
        on the CPU to run that path's logic without CUDA.
        """
        import torch

        dev = torch.device(device)
        p = cls(path, dev, threads, chunk_bytes, dev.type == "cuda" if staged is None else staged)
        p._thread.start()
        return p

    @property
    def bytes_done(self) -> int:
        return sum(self._progress)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float, stall_s: float | None = None) -> tuple[dict[str, Any], dict[str, str] | None]:
        """Wait for the read; ``(state_dict, metadata)``. Re-raises the reader's exception; ``TimeoutError``
        when not done after ``timeout`` s, or when no byte arrived for ``stall_s`` s (a hung read)."""
        start = time.monotonic()
        last, last_t = -1, start
        while not self._done.wait(0.2):
            now = time.monotonic()
            done = self.bytes_done
            if done != last:
                last, last_t = done, now
            if now - start >= timeout:
                raise TimeoutError(f"prefetch not done after {timeout:.0f} s ({self._progress_text()})")
            if stall_s is not None and now - last_t >= stall_s:
                raise TimeoutError(f"prefetch made no progress for {stall_s:.0f} s ({self._progress_text()})")
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._result is None:
                raise RuntimeError("prefetch result was already taken, or the prefetch was cancelled")
            out, self._result = self._result, None
        return out

    def cancel(self, timeout: float = 30.0) -> None:
        """Stop the read and drop what it holds (idempotent). Waits up to ``timeout`` s for the threads."""
        self._cancel.set()
        self._stop.set()
        self._done.wait(timeout)
        with self._lock:
            self._result = None
            self._error = None

    def buffer_alive(self) -> bool:
        """Whether anything still holds the buffer (after ``result``: the caller's tensors or aliases of them)."""
        return self._buffer_ref is not None and not self._buffer_ref.expired()

    def release_aliases(self, module: Any) -> int:
        """Copy out every parameter / buffer of ``module`` that is a view of the buffer; returns how many.

        ComfyUI's loader copies file tensors into the model's own parameters, except where a layer adopts
        the tensor it is given (e.g. ``comfy.ops.MixedPrecisionOps``: ``weight.to(device)`` is the tensor
        itself once it is on the device); such a view would keep the whole file's buffer allocated.
        """
        import torch

        if not self.buffer_alive():
            return 0
        copied = 0
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and self._aliases(p):
                    if type(p.data) is torch.Tensor:
                        p.data = p.data.clone()
                    else:  # a tensor subclass (QuantizedTensor): a new Parameter around its clone
                        m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    copied += 1
            for name, b in list(m._buffers.items()):
                if b is not None and self._aliases(b):
                    m._buffers[name] = b.clone()
                    copied += 1
        return copied

    def facts(self) -> dict[str, Any]:
        """``prefetch_bytes``, ``prefetch_read_s``, ``prefetch_gbps`` (for the start phases)."""
        s = self.read_s
        return {"prefetch_bytes": self.bytes_total, "prefetch_read_s": round(s, 3) if s is not None else None,
                "prefetch_gbps": round(self.bytes_total / s / 1e9, 2) if s else None}

    # -- the reading threads --------------------------------------------------------------------------
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            result: Any = self._read()
            self.read_s = time.perf_counter() - t0
            with self._lock:
                if not self._cancel.is_set():
                    self._result = result
            result = None  # cancelled meanwhile: the buffer goes before _done says so
        except BaseException as e:  # noqa: BLE001 (handed to result(), which re-raises it in the caller)
            log.debug("xDiT prefetch of %s failed", self.path, exc_info=True)
            with self._lock:  # no traceback kept: its frames would hold the buffer until the error is dropped
                self._error = None if self._cancel.is_set() else e.with_traceback(None)
        finally:
            self._done.set()

    def _read(self) -> tuple[dict[str, Any], dict[str, str] | None]:
        """Header, one buffer, the threaded read, the views: ``(state_dict, metadata)``."""
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef

        header = parse_header(self.path)
        self.bytes_total = header.data_bytes
        buf = torch.empty(header.data_bytes, dtype=torch.uint8, device=self.device)
        self._buffer_ref = StorageWeakRef(buf.untyped_storage())
        self._buffer_ptr = buf.untyped_storage().data_ptr()
        self._read_all(buf, header)
        return build_state_dict(buf, header), header.metadata

    def _read_all(self, buf: Any, header: Header) -> None:
        """Read the data section with one thread per region; the first real error wins."""
        errors: list[BaseException] = []

        def run(i: int, start: int, end: int) -> None:
            try:
                self._read_region(buf, header.data_offset, i, start, end)
            except BaseException as e:  # noqa: BLE001
                errors.append(e.with_traceback(None))  # frames would hold the buffer (see _run)
                self._stop.set()  # the other threads stop at their next chunk

        threads = [threading.Thread(target=run, args=(i, s, e), name=f"xdit-prefetch-{i}", daemon=True)
                   for i, (s, e) in enumerate(regions(header.data_bytes, self.threads, self.chunk_bytes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.staged and self.device.type == "cuda":
            _release_pinned()
        real = [e for e in errors if not isinstance(e, PrefetchCancelled)]
        if real:
            raise real[0]
        if errors or self._stop.is_set():
            raise PrefetchCancelled("prefetch cancelled")

    def _read_region(self, buf: Any, offset: int, i: int, start: int, end: int) -> None:
        with open(self.path, "rb", buffering=0) as f:  # unbuffered: readinto fills our memory directly
            f.seek(offset + start)
            if self.staged:
                self._read_staged(f, buf, i, start, end)
                return
            view = memoryview(buf.numpy())  # a CPU buffer: read straight into it
            for pos in range(start, end, self.chunk_bytes):
                self._check_cancel()
                n = min(self.chunk_bytes, end - pos)
                _read_exact(f, view[pos:pos + n], self.path)
                self._progress[i] += n

    def _read_staged(self, f: Any, buf: Any, i: int, start: int, end: int) -> None:
        """Read through two staging buffers (pinned on CUDA): one fills from the file while the other's
        copy to the device runs on this thread's stream; an event says when a buffer may be refilled."""
        import torch

        cuda = self.device.type == "cuda"
        size = min(self.chunk_bytes, end - start)
        stage = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        stream = torch.cuda.Stream(device=self.device) if cuda else None
        events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else [None, None]
        try:
            for k, pos in enumerate(range(start, end, self.chunk_bytes)):
                self._check_cancel()
                j, n = k % 2, min(self.chunk_bytes, end - pos)
                if events[j] is not None:
                    events[j].synchronize()  # this buffer's previous copy has landed (no-op before the first)
                _read_exact(f, memoryview(stage[j].numpy())[:n], self.path)
                if stream is None:
                    buf[pos:pos + n].copy_(stage[j][:n])
                else:
                    with torch.cuda.stream(stream):
                        buf[pos:pos + n].copy_(stage[j][:n], non_blocking=True)
                        events[j].record(stream)
                self._progress[i] += n
        finally:
            if stream is not None:
                stream.synchronize()  # every copy done before the buffer is used or the staging memory freed
            stage.clear()  # even if a traceback keeps this frame alive, the pinned memory goes

    def _check_cancel(self) -> None:
        if self._stop.is_set():
            raise PrefetchCancelled("prefetch cancelled")

    def _aliases(self, t: Any) -> bool:
        return self._buffer_ptr in _storage_ptrs(t)

    def _progress_text(self) -> str:
        total = self.bytes_total
        return f"{self.bytes_done / 1e9:.2f} of {total / 1e9:.2f} GB read" if total else "header not read yet"


def _storage_ptrs(t: Any) -> list[int]:
    """Base addresses of the storages behind ``t`` (a tensor subclass: its inner tensors')."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        return [p for a in attrs for p in _storage_ptrs(getattr(t, a))]
    return [t.untyped_storage().data_ptr()]


def _release_pinned() -> None:
    """Give the staging buffers' pinned memory back: torch's host allocator caches freed pinned blocks."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
