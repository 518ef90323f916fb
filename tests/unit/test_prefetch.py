"""``worker/prefetch.py``: the safetensors header parser, the threaded read and the state dict it builds.

Every file is generated here with ``safetensors`` itself (or written byte by byte where a case needs a
layout safetensors would not produce), and the prefetched dict is compared with ``safetensors``' own
reading: same keys in ``safe_open(...).keys()`` order (what ComfyUI's ``load_torch_file`` iterates),
same dtypes, shapes and bits, same metadata. CPU device: the direct read, and the staged read (the CUDA
path's two-buffer logic without CUDA). Unit tier: no ComfyUI, no GPU.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xdit_multigpu.worker import prefetch as pf
from xdit_multigpu.worker.prefetch import Prefetch, parse_header, regions

pytestmark = pytest.mark.unit

META = {"format": "pt", "note": "tiny test file"}


def _mixed() -> dict[str, torch.Tensor]:
    """Every supported dtype, odd sizes, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1000, generator=g)
    return {
        "blocks.0.w_bf16": f[:777].reshape(7, 111).bfloat16(),
        "blocks.0.b_f16": f[:13].half(),
        "f32.odd": f[:333].reshape(3, 111).clone(),
        "f64.vec": f[:5].double(),
        "i64": torch.arange(-3, 8, dtype=torch.int64),
        "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "i16": torch.tensor([-7, 300, 5], dtype=torch.int16),
        "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
        "u8": torch.randint(0, 256, (17,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True, False]),
        "f8_e4m3": f[:31].to(torch.float8_e4m3fn),
        "f8_e5m2": f[:29].reshape(29, 1).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: dict[str, torch.Tensor], path: str) -> None:
    ref = load_file(path)
    with safe_open(path, framework="pt") as f:
        assert list(got) == list(f.keys())  # ComfyUI builds its dict in this order
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(_bits(got[k]), _bits(t)), k


@pytest.fixture
def mixed_file(tmp_path):
    path = str(tmp_path / "mixed.safetensors")
    save_file(_mixed(), path, metadata=META)
    return path


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize(("threads", "chunk"), [(1, pf.CHUNK_BYTES), (3, 7), (4, 64), (2, 1000)])
def test_prefetch_equals_safetensors(mixed_file, staged, threads, chunk):
    """Chunks smaller than tensors (7 bytes), regions ending mid-tensor, one chunk for the whole file."""
    p = Prefetch.start(mixed_file, "cpu", threads=threads, chunk_bytes=chunk, staged=staged)
    sd, meta = p.result(timeout=30)
    assert meta == META
    _assert_same(sd, mixed_file)
    facts = p.facts()
    assert facts["prefetch_bytes"] == parse_header(mixed_file).data_bytes == p.bytes_done
    assert facts["prefetch_read_s"] >= 0
    assert p.buffer_alive()
    del sd
    assert not p.buffer_alive()  # the caller's dict was the only owner of the buffer
    with pytest.raises(RuntimeError, match="already taken"):
        p.result(timeout=1)


def test_no_metadata_and_an_empty_file(tmp_path):
    path = str(tmp_path / "plain.sft")
    save_file({"a": torch.ones(2, 3)}, path)
    sd, meta = Prefetch.start(path, "cpu").result(timeout=30)
    assert meta is None  # as safe_open(...).metadata() without __metadata__
    _assert_same(sd, path)
    empty = str(tmp_path / "empty.safetensors")
    save_file({}, empty)
    assert Prefetch.start(empty, "cpu").result(timeout=30) == ({}, None)
    assert pf.is_safetensors("/m/X.SafeTensors") and pf.is_safetensors("a.sft") and not pf.is_safetensors("a.ckpt")


def test_views_share_the_buffer_and_unaligned_tensors_are_copied(tmp_path):
    """A 3-byte I8 tensor first puts the F32 tensor at offset 3: valid safetensors layout, not viewable."""
    path = str(tmp_path / "unaligned.safetensors")
    f32 = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    header = {"a_i8": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
              "b_f32": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
              "c_i8": {"dtype": "I8", "shape": [1], "data_offsets": [15, 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]) + f32.numpy().tobytes() + bytes([9]))
    sd, _ = Prefetch.start(path, "cpu", chunk_bytes=5).result(timeout=30)
    assert torch.equal(sd["b_f32"], f32) and sd["a_i8"].tolist() == [1, 2, 3] and sd["c_i8"].tolist() == [9]
    storage = sd["a_i8"].untyped_storage().data_ptr()
    assert sd["c_i8"].untyped_storage().data_ptr() == storage  # a view of the one buffer
    assert sd["b_f32"].untyped_storage().data_ptr() != storage  # copied out: offset 3 is not 4-aligned


def _write_header(path, header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: open(p, "wb").write(b"abc"), "too small to be a safetensors file"),
        (lambda p: open(p, "wb").write(struct.pack("<Q", 10**12) + b"{}"), "header length 10+ is implausible"),
        (lambda p: open(p, "wb").write(struct.pack("<Q", 100) + b"{}"), "truncated: the header needs 108 bytes"),
        (lambda p: _write_header(p, b"{not json"), "the header is not valid JSON"),
        (lambda p: _write_header(p, b"[1, 2]"), "the header is not a JSON object"),
        (lambda p: _write_header(p, {"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
        (lambda p: _write_header(p, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
         "dtype C64 is not supported by the prefetch"),
        (lambda p: _write_header(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
         "8 bytes for shape [3] of F32"),
        (lambda p: _write_header(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
         "starts at byte 4, expected 0"),
        (lambda p: _write_header(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "bad shape"),
        (lambda p: _write_header(p, {"w": {"dtype": "F32", "shape": [2]}}), "malformed header entry"),
    ],
)
def test_corrupt_headers_are_clear_errors(tmp_path, make, message):
    path = str(tmp_path / "bad.safetensors")
    make(path)
    with pytest.raises(ValueError, match=r"bad\.safetensors: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        Prefetch.start(path, "cpu").result(timeout=30)


def test_one_header_reader_strict_for_the_prefetch_lenient_for_detection(tmp_path):
    """The framing errors are the same for every reader; only the prefetch refuses dtypes it cannot copy
    (detection needs keys and shapes), and the tiny-model cache treats any unreadable file as stale."""
    from xdit_multigpu.engine.model_info import read_safetensors_header
    from xdit_multigpu.testing.tiny_models import _read_header

    odd = str(tmp_path / "odd.safetensors")
    _write_header(odd, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "__metadata__": {"k": "v"}}, bytes(8))
    entries, meta = read_safetensors_header(odd)
    assert entries == {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}} and meta == {"k": "v"}
    assert _read_header(odd) == ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "__metadata__": {"k": "v"}},
                                 os.path.getsize(odd))  # the size the header implies: the whole file
    with pytest.raises(ValueError, match="dtype C64 is not supported by the prefetch"):
        parse_header(odd)
    cut = str(tmp_path / "cut.safetensors")
    with open(cut, "wb") as f:
        f.write(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="truncated: the header needs 108 bytes"):
        read_safetensors_header(cut)
    assert _read_header(cut) is None


def test_a_truncated_file_is_a_clear_error_from_result(mixed_file):
    with open(mixed_file, "rb") as f:
        blob = f.read()
    with open(mixed_file, "wb") as f:
        f.write(blob[:-5])
    p = Prefetch.start(mixed_file, "cpu", threads=3, chunk_bytes=16)
    with pytest.raises(ValueError, match=f"truncated: the data section needs {len(blob)} bytes, the file has "
                                         f"{len(blob) - 5}"):
        p.result(timeout=30)
    assert not p.buffer_alive()


def test_a_file_that_shrinks_during_the_read_fails_the_reader(mixed_file, monkeypatch):
    """The header was complete but a reader hits the end of the file (replaced / truncated meanwhile)."""
    real = pf._read_exact

    def short(f, view, path):
        if f.tell() > 200:
            raise ValueError(f"{path}: truncated while reading (file changed or shrank)")
        real(f, view, path)

    monkeypatch.setattr(pf, "_read_exact", short)
    p = Prefetch.start(mixed_file, "cpu", threads=2, chunk_bytes=32, staged=True)
    with pytest.raises(ValueError, match="truncated while reading"):
        p.result(timeout=30)
    assert not p.buffer_alive()


def test_regions_cover_the_data_on_chunk_bounds():
    assert regions(0, 4, 8) == []
    assert regions(10, 4, 32) == [(0, 10)]
    assert regions(100, 3, 8) == [(0, 40), (40, 80), (80, 100)]  # 13 chunks: 5 + 5 + 3
    for total, threads, chunk in [(1, 1, 1), (97, 4, 7), (4096, 4, 1024), (4097, 4, 1024)]:
        parts = regions(total, threads, chunk)
        assert len(parts) <= threads and parts[0][0] == 0 and parts[-1][1] == total
        assert all(a[1] == b[0] and a[1] % chunk == 0 for a, b in zip(parts, parts[1:]))


@pytest.fixture
def blocked_read(monkeypatch):
    """Readers block until the returned event is set (a hung read)."""
    gate = threading.Event()
    real = pf._read_exact

    def blocked(f, view, path):
        gate.wait(30)
        real(f, view, path)

    monkeypatch.setattr(pf, "_read_exact", blocked)
    yield gate
    gate.set()


def test_timeout_stall_and_cancel(mixed_file, blocked_read):
    p = Prefetch.start(mixed_file, "cpu", threads=2, chunk_bytes=16)
    with pytest.raises(TimeoutError, match="not done after 0 s"):
        p.result(timeout=0.3)
    with pytest.raises(TimeoutError, match=r"no progress for 0 s \(0.00 of 0.00 GB read\)"):
        p.result(timeout=30, stall_s=0.3)
    assert not p.done
    blocked_read.set()
    p.cancel()
    assert p.done and not p.buffer_alive()
    with pytest.raises(RuntimeError, match="cancelled"):
        p.result(timeout=1)


def test_cancel_after_the_read_drops_the_buffer(mixed_file):
    p = Prefetch.start(mixed_file, "cpu")
    p._done.wait(30)
    assert p.buffer_alive()
    p.cancel()
    assert not p.buffer_alive()


def test_release_aliases_copies_out_adopted_tensors(mixed_file):
    """A layer that adopts the file's tensor (as ``MixedPrecisionOps`` does) would keep the buffer alive."""
    p = Prefetch.start(mixed_file, "cpu")
    sd, _ = p.result(timeout=30)
    module = torch.nn.Module()
    module.adopted = torch.nn.Parameter(sd["f32.odd"], requires_grad=False)  # shares the buffer's storage
    module.register_buffer("counts", sd["i32"])
    module.own = torch.nn.Parameter(sd["f64.vec"].clone())
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    del sd
    assert p.buffer_alive()
    assert p.release_aliases(module) == 2
    assert not p.buffer_alive()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items())
    assert p.release_aliases(module) == 0
