"""``executor.kept``: request tensors every rank holds from the last call travel as a key, not as bytes
(unit tier: the driver side and the rank side in one process, through pickle protocol 5 with out-of-band
buffers, the protocol Ray's serializer uses; no Ray)."""

from __future__ import annotations

import pickle

import pytest

from xdit_multigpu.executor import kept, transport

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def rank_state(monkeypatch):
    """A fresh rank side per test (it is module state: one actor per process)."""
    monkeypatch.setattr(kept, "_HELD", {})
    monkeypatch.setattr(kept, "_NAMED", set())


def _request(seed: int = 0, cond=None):
    g = torch.Generator().manual_seed(seed)
    cond = cond if cond is not None else torch.randn(1, 64, 1024, generator=g)  # 256 KiB
    return {"noise": torch.randn(1, 16, 32, 32, generator=g), "positive": [[cond, {"guidance": 3.5}]]}


def _call(sent: kept.SentTensors, obj):
    """One call as ``RayExecutor.collective_rpc`` makes it: mark on the driver, pickle (bytes out of band),
    snapshot, unpickle + end_of_args on the rank, commit. Returns (what the rank got, out-of-band bytes)."""
    marked, table = sent.mark(obj)
    bufs: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(marked, protocol=5, buffer_callback=bufs.append)
    sent.snapshot(table)
    got = pickle.loads(blob, buffers=bufs)
    kept.end_of_args()
    sent.commit(table)
    return got, sum(memoryview(b).nbytes for b in bufs)


def test_first_call_sends_everything_and_every_side_keeps_it():
    sent, req = kept.SentTensors(), _request()
    got, nbytes = _call(sent, req)
    assert nbytes == req["noise"].nbytes + req["positive"][0][0].nbytes
    assert torch.equal(got["noise"], req["noise"]) and torch.equal(got["positive"][0][0], req["positive"][0][0])
    assert got["positive"][0][1] == {"guidance": 3.5}
    assert sent.held_keys() == kept.held_on_this_rank() and len(sent.held_keys()) == 2


def test_a_reused_tensor_travels_as_its_key_and_arrives_as_the_rank_s_copy():
    """ComfyUI's cache hands the sampler the same conditioning on a re-run; only the new noise travels."""
    sent, first = kept.SentTensors(), _request(0)
    got1, _ = _call(sent, first)
    again = _request(1, cond=first["positive"][0][0])
    got2, nbytes = _call(sent, again)
    assert nbytes == again["noise"].nbytes  # the conditioning's 256 KiB stayed home
    assert got2["positive"][0][0] is got1["positive"][0][0]  # the tensor the rank kept
    assert torch.equal(got2["noise"], again["noise"])
    assert sent.held_keys() == kept.held_on_this_rank() and len(sent.held_keys()) == 2  # old noise dropped


@pytest.mark.parametrize("inference", [False, True], ids=["normal", "inference_mode"])
def test_a_tensor_changed_in_place_on_the_driver_is_sent_again(inference):
    """ComfyUI runs nodes under ``torch.inference_mode``: its tensors have no version counter, so the
    driver compares bytes (a server test caught ``_version`` raising on them)."""
    with torch.inference_mode(inference):
        req = _request()
    sent = kept.SentTensors()
    _call(sent, req)
    _, nbytes = _call(sent, req)
    assert nbytes == 0
    with torch.inference_mode(inference):
        req["positive"][0][0][0, 0, 0] += 1.0  # one element, in place
    got, nbytes = _call(sent, req)
    assert nbytes == req["positive"][0][0].nbytes  # the unchanged noise still travels as its key
    assert torch.equal(got["positive"][0][0], req["positive"][0][0])


def test_a_call_without_large_tensors_leaves_both_sides_alone():
    sent, req = kept.SentTensors(), _request()
    _call(sent, req)
    keys = sent.held_keys()
    got, nbytes = _call(sent, ("ping", torch.zeros(4)))  # small tensors travel in band, nothing is marked
    assert nbytes == 0 and sent.held_keys() == keys == kept.held_on_this_rank()
    _, nbytes = _call(sent, req)
    assert nbytes == 0  # still held: noise and conditioning both travel as keys


def test_after_a_failed_call_the_driver_sends_everything_again():
    sent, req = kept.SentTensors(), _request()
    _call(sent, req)
    sent.forget()
    _, nbytes = _call(sent, req)
    assert nbytes == req["noise"].nbytes + req["positive"][0][0].nbytes


def test_what_exceeds_the_budget_travels_plainly_and_is_not_remembered(monkeypatch):
    monkeypatch.setattr(kept, "KEEP_MAX_BYTES", 100 * 1024)
    sent, req = kept.SentTensors(), _request()
    marked, table = sent.mark(req)
    assert isinstance(marked["noise"], kept.Keep)  # 64 KiB fits
    assert isinstance(marked["positive"][0][0], transport._Wire)  # 256 KiB does not
    assert len(table) == 1


def test_a_rank_refuses_a_held_tensor_modified_in_place_during_the_last_call():
    sent, req = kept.SentTensors(), _request()
    got, _ = _call(sent, req)
    got["positive"][0][0].mul_(2.0)  # what ComfyUI's own caching rules out
    marked, _ = sent.mark(req)
    blob = pickle.dumps(marked, protocol=5)
    with pytest.raises(RuntimeError, match="modified in place"):
        pickle.loads(blob)


def test_a_key_the_rank_does_not_hold_is_an_error_not_a_wrong_tensor():
    sent, req = kept.SentTensors(), _request()
    _call(sent, req)
    kept._HELD.clear()  # e.g. a rank that lost its state: the driver and the rank are out of step
    marked, _ = sent.mark(req)
    with pytest.raises(RuntimeError, match="out of step"):
        pickle.loads(pickle.dumps(marked, protocol=5))


def _raw(n: int, seed: int = 0):
    """``n`` random bytes as a uint8 tensor (what ``transport.byte_view`` hands ``_same_bytes``)."""
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# 8 | n (int64 words), 4 | n but not 8 (int32 words), odd (uint8), the 1- and 3-byte edges.
SIZES = [1, 3, 4100, 4101, 4104]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_same_bytes_sees_one_flipped_byte_anywhere(n: int, where: str):
    """Equal copies compare equal; one flipped byte (the tail's last one included) does not."""
    a = _raw(n)
    assert kept._same_bytes(a, a.clone())
    b = a.clone()
    i = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    b[i] ^= 0x01
    assert not kept._same_bytes(a, b) and not kept._same_bytes(b, a)


@pytest.mark.parametrize("n", SIZES)
def test_same_bytes_is_false_for_different_lengths(n: int):
    a = _raw(n + 1)
    assert not kept._same_bytes(a[:n], a) and not kept._same_bytes(a, a[:n])
    assert not kept._same_bytes(a[:0], a[:1]) and kept._same_bytes(a[:0], a[:0].clone())


@pytest.mark.parametrize("count", [3, 2050, 2051, 2052], ids=lambda c: f"{2 * c}B")
def test_same_bytes_compares_bf16_bits_not_values(count: int):
    """bf16 (no numpy dtype) viewed as bytes: -0.0 is not 0.0 and a NaN equals the same NaN, bit for bit."""
    x = torch.randn(count, generator=torch.Generator().manual_seed(count)).to(torch.bfloat16)
    x[-1] = float("nan")
    # NaN != NaN as values, equal as bits
    assert kept._same_bytes(transport.byte_view(x), transport.byte_view(x.clone()))
    x[-1] = 0.0
    y = x.clone()
    y[-1] = -0.0  # equal as values, one sign bit apart
    assert not kept._same_bytes(transport.byte_view(x), transport.byte_view(y))
    y = x.clone()
    y.view(torch.int16)[-1] ^= 1  # the lowest mantissa bit of the last element
    assert not kept._same_bytes(transport.byte_view(x), transport.byte_view(y))
