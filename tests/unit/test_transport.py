"""``executor.transport.pack``: large CPU tensors pickle as out-of-band buffers and come back bit-exact
(unit tier: plain ``pickle`` protocol 5, the same protocol Ray's serializer uses; no Ray, no ComfyUI)."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import subprocess
import sys
import warnings
from collections import namedtuple

import numpy as np
import pytest

from xdit_multigpu.engine.model_delta import ModelDelta
from xdit_multigpu.engine.request import SampleRequest
from xdit_multigpu.engine.travel import pack as travel_pack
from xdit_multigpu.engine.travel import unpack as travel_unpack
from xdit_multigpu.executor.transport import MIN_WIRE_BYTES, _rebuild, _Wire, pack, wire_fields

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.unit

BIG = 64 * 1024  # elements: above MIN_WIRE_BYTES for every dtype


def _dtypes():
    names = ["bfloat16", "float16", "float32", "float64", "int64", "bool", "uint8", "int8", "complex64",
             "float8_e4m3fn", "float8_e5m2"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def _random(shape, dtype, seed=0):
    """Random bits of ``dtype`` (every byte pattern, NaN payloads included for floats)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a, b):
    """Exact type, dtype, shape and bits."""
    assert type(b) is torch.Tensor, type(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert torch.equal(_bits(a), _bits(b))


def _roundtrip(obj):
    return pickle.loads(pickle.dumps(obj, protocol=5))


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_every_dtype_round_trips_bit_exact(dtype):
    t = _random((2, BIG // 2), dtype)
    packed = pack(t)
    assert isinstance(packed, _Wire)
    _same(t, _roundtrip(packed))


@pytest.mark.parametrize("shape", [(), (0,), (0, 4096, 16), (3, 1)], ids=str)
def test_zero_d_and_empty_tensors_round_trip(shape, monkeypatch):
    monkeypatch.setattr("xdit_multigpu.executor.transport.MIN_WIRE_BYTES", 0)  # wrap even these
    t = _random(shape, torch.float32)
    packed = pack(t)
    assert isinstance(packed, _Wire)
    _same(t, _roundtrip(packed))


def test_non_contiguous_conjugated_and_negated_views_arrive_with_their_values():
    base = _random((256, 512), torch.float32)
    for t in (base.t(), base[:, ::2], base.expand(3, 256, 512), base.narrow(1, 3, 300)):
        assert not t.is_contiguous()
        got = _roundtrip(pack(t))
        _same(t.contiguous(), got)
        assert got.is_contiguous()
    c = _random((128, 128), torch.complex64).conj()  # lazy conj bit: the bits sent must be conjugated
    n = c.imag  # lazy neg bit
    assert c.is_conj() and n.is_neg()
    _same(c.resolve_conj(), _roundtrip(pack(c)))
    _same(n.resolve_neg(), _roundtrip(pack(n)))


def test_large_tensor_round_trips():
    t = _random((1, 16, 512, 512), torch.bfloat16, seed=3)  # 8 MiB
    _same(t, _roundtrip(pack(t)))


def test_received_tensors_are_writable_and_own_their_memory():
    t = torch.arange(BIG, dtype=torch.float32)
    bufs = []
    blob = pickle.dumps(pack(t), protocol=5, buffer_callback=bufs.append)
    readonly = [pickle.PickleBuffer(memoryview(b.raw()).toreadonly()) for b in bufs]  # like Ray's store
    got = pickle.loads(blob, buffers=readonly)
    got.add_(1.0)  # would raise / corrupt shared memory on a view of the buffer
    assert torch.equal(got, torch.arange(BIG, dtype=torch.float32) + 1.0)
    assert torch.equal(t, torch.arange(BIG, dtype=torch.float32))  # the sender's tensor is untouched
    assert got.data_ptr() != t.data_ptr()


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (3, 4097)), (torch.bfloat16, (2, 3, 1001)),
                                            (torch.int64, (513,)), (torch.float32, (2, 0, 16))], ids=str)
def test_rebuild_from_a_read_only_buffer_owns_writable_memory(dtype: torch.dtype, shape: tuple[int, ...]):
    """``_rebuild`` on a read-only uint8 array (Ray's shared store) copies: exact bits, no shared memory."""
    t = _random(shape, dtype, seed=5)
    arr = _bits(t).numpy().copy()
    arr.flags.writeable = False
    before = arr.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a non-writable array without copying
        got = _rebuild(arr, *wire_fields(t)[1:])
    _same(t, got)
    out = _bits(got)
    assert not np.shares_memory(out.numpy(), arr)
    out.bitwise_not_()  # writable, and writing leaves the buffer alone
    assert np.array_equal(arr, before)
    if got.numel():
        assert not torch.equal(_bits(got), torch.from_numpy(before))


def test_zero_copy_path_sends_the_bytes_out_of_band():
    """The point of ``pack``: with protocol 5 + buffer_callback the tensor bytes leave the pickle stream.

    Fails if the wire format goes back to pickling bytes in band (torch's own reduce does that).
    """
    t = _random((4, 1024, 1024), torch.bfloat16)  # 8 MiB
    nbytes = t.numel() * t.element_size()
    bufs = []
    blob = pickle.dumps(pack(t), protocol=5, buffer_callback=bufs.append)
    assert len(blob) < 1024, len(blob)
    assert [b.raw().nbytes for b in bufs] == [nbytes]
    assert bytes(bufs[0].raw()) == _bits(t).numpy().tobytes()
    _same(t, pickle.loads(blob, buffers=bufs))
    # Contrast: the same tensor unpacked goes through torch's pickling, bytes in band.
    torch_bufs = []
    assert len(pickle.dumps(t, protocol=5, buffer_callback=torch_bufs.append)) > nbytes


class Opaque:
    """Stands in for a ComfyUI object in a conditioning dict (a ControlNet): must travel as is."""

    def __init__(self, hint):
        self.hint = hint


Pair = namedtuple("Pair", "a b")


def _flux_conditioning(seed):
    context = _random((1, 64, 4096), torch.float32, seed)
    pooled = _random((1, 768), torch.float32, seed + 1)  # 3 KiB: below the threshold
    return [[context, {"pooled_output": pooled, "guidance": 3.5, "control": Opaque(context), 7: Pair(1, 2)}]]


def test_nested_conditioning_packs_tensors_and_keeps_other_objects():
    cond = _flux_conditioning(0)
    packed = pack(cond)
    assert packed is not cond and packed[0] is not cond[0]
    assert packed[0][1] is cond[0][1]  # nothing to wrap in the dict: the same dict
    assert isinstance(packed[0][0], _Wire)
    assert packed[0][1]["pooled_output"] is cond[0][1]["pooled_output"]  # small: left to torch
    assert packed[0][1]["control"] is cond[0][1]["control"]  # objects are not walked
    assert packed[0][1][7] is cond[0][1][7]
    assert isinstance(cond[0][0], torch.Tensor)  # the input is not mutated
    got = _roundtrip(packed)
    _same(cond[0][0], got[0][0])
    _same(cond[0][1]["pooled_output"], got[0][1]["pooled_output"])
    assert type(got[0][1]["control"]) is Opaque and type(got[0][1][7]) is Pair
    _same(cond[0][1]["control"].hint, got[0][1]["control"].hint)
    assert got[0][1]["guidance"] == 3.5 and type(got) is list and type(got[0][1]) is dict


def test_frozen_sample_request_with_lora_delta_round_trips():
    noise = _random((1, 16, 64, 64), torch.float32, 1)
    lora = _random((64, 3072), torch.bfloat16, 2)
    weights = travel_pack({"diffusion_model.w": [(1.0, ("lora", (lora, lora.T)), 1.0, None, None)]})
    delta = ModelDelta("wk", "ok", travel_pack({}), weights, "lora")
    req = SampleRequest(noise, noise.clone(), _flux_conditioning(3), _flux_conditioning(5), 42, 20, 3.5,
                        "euler", "simple", delta=delta)
    packed = pack(req)
    assert type(packed) is SampleRequest and packed is not req
    assert isinstance(packed.noise, _Wire) and isinstance(packed.delta.weights.tensors[0], _Wire)
    assert isinstance(req.noise, torch.Tensor)  # the frozen original is untouched
    got = _roundtrip(packed)
    assert type(got) is SampleRequest and got.seed == 42 and got.plan == req.plan
    for name in ("noise", "latent_image"):
        _same(getattr(req, name), getattr(got, name))
    _same(req.positive[0][0], got.positive[0][0])
    _same(req.negative[0][0], got.negative[0][0])
    assert got.delta.weights.digest() == delta.weights.digest()
    patch = travel_unpack(got.delta.weights)["diffusion_model.w"][0]
    _same(lora, patch[1][1][0])


def test_shared_tensors_stay_shared():
    t = _random((BIG,), torch.float32)
    got = _roundtrip(pack({"a": t, "b": [t, (t,)]}))
    assert got["a"] is got["b"][0] is got["b"][1][0]
    _same(t, got["a"])


def test_nothing_to_pack_returns_the_same_objects():
    small = torch.zeros(8)
    grad = torch.zeros(BIG, requires_grad=True)
    param = torch.nn.Parameter(torch.zeros(BIG))
    cond = [[small, {"pooled_output": small, "x": Opaque(1)}]]
    req = SampleRequest(small, small, cond, cond, 1, 2, 3.0, "euler", "simple")
    assert pack(req) is req
    for obj in (cond, (1, "a", None), {1: [small]}, grad, param, Pair(torch.zeros(BIG), 1), small, "s", 3):
        assert pack(obj) is obj
    cyclic: list = [small]
    cyclic.append(cyclic)
    assert pack(cyclic) is cyclic


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning")
def test_threshold_and_tensor_kinds():
    under = torch.zeros(MIN_WIRE_BYTES // 4 - 1)
    at = torch.zeros(MIN_WIRE_BYTES // 4)
    assert pack(under) is under and isinstance(pack(at), _Wire)
    for other in (torch.zeros(BIG).to_sparse(), torch.quantize_per_tensor(torch.zeros(BIG), 0.1, 0, torch.qint8)):
        assert pack(other) is other


def test_plain_and_frozen_dataclasses_are_copied_only_when_changed():
    @dataclasses.dataclass
    class Box:
        t: object
        n: int = 0

    box = Box(torch.zeros(BIG), 5)
    packed = pack(box)
    assert type(packed) is Box and packed is not box and packed.n == 5 and isinstance(packed.t, _Wire)
    assert isinstance(box.t, torch.Tensor)
    empty = Box(None)
    assert pack(empty) is empty


def test_importing_transport_imports_neither_torch_nor_ray():
    code = ("import sys, xdit_multigpu.executor.transport as t; "
            "assert t.pack([1]) == [1]; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
