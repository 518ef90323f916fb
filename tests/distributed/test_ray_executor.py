"""RayExecutor on an embedded loopback cluster with CPU ranks: process group, failure modes, ports.

One cluster per module (Ray start is 3-5 s). Every wait is bounded by a timeout far below pytest's.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet
from xdit_multigpu.errors import WorkerError, WorkerTimeout

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ray = pytest.importorskip("ray")


class FakeWorker:
    """A worker whose methods misbehave on purpose (pickled by value into the actors)."""

    def __init__(self) -> None:
        self.calls = 0

    def echo(self, value):
        self.calls += 1
        return (os.getpid(), value)

    def boom(self, rank_to_fail, my_rank):
        if my_rank == rank_to_fail:
            raise ValueError(f"boom on rank {my_rank}")
        return my_rank

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def ping(self):
        return "pong"

    def inspect_request(self, request):
        """What arrived: per tensor (sha256 of its bytes, exact type, private (anonymous) memory), plus the request."""
        import dataclasses
        import hashlib

        import torch

        tensors = [request.noise, request.latent_image, request.positive[0][0], request.negative[0][0],
                   request.positive[0][1]["pooled_output"], *request.delta.weights.tensors]
        # Private memory: the mapping holding the bytes is anonymous (this process's heap), not a file
        # mapping such as Ray's shared-memory object store.
        owned = [_mapping_path(t.data_ptr()) in ("", "[heap]") for t in tensors]
        seen = [(hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest(), type(t) is torch.Tensor, o)
                for t, o in zip(tensors, owned)]
        return seen, dataclasses.replace(request, seed=request.seed + 1)


    def hold(self, request, mutate=False):
        """What arrived: whether the conditioning is the very tensor of the last call, its bytes' digest, the
        noise's digest, and the keys this rank keeps (``kept``'s rank side). ``mutate``: change it in place."""
        import hashlib

        import torch

        from xdit_multigpu.executor import kept

        cond = request.positive[0][0]
        same, self._cond = cond is getattr(self, "_cond", None), cond
        digest = hashlib.sha256(cond.contiguous().view(torch.uint8).numpy()).hexdigest()
        if mutate:
            cond.mul_(2.0)
        noise = hashlib.sha256(request.noise.contiguous().view(torch.uint8).numpy()).hexdigest()
        return same, digest, noise, kept.held_on_this_rank()


def cpu(n):
    return DeviceSet(DeviceKind.CPU, tuple(range(n)), f"cpu:{n}")


def _mapping_path(address: int) -> str:
    """The path of the mapping (``/proc/self/maps``) that holds ``address``: "" for anonymous memory."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return rest[4].strip() if len(rest) > 4 else ""
    raise LookupError(f"address {address:#x} is not mapped")


def make(cluster, n, worker_cls=FakeWorker, timeout=60.0):
    from xdit_multigpu.executor.ray_executor import RayExecutor

    return RayExecutor(cpu(n), cluster, worker_cls=worker_cls, start_timeout=timeout)


def _ray_pids() -> set[int]:
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def _flux_request():
    """A ~20 MB Flux-shaped request: fp32 + bf16 contexts, latents, a bf16 LoRA weight in the delta."""
    import torch

    from xdit_multigpu.engine.model_delta import ModelDelta
    from xdit_multigpu.engine.request import SampleRequest
    from xdit_multigpu.engine.travel import pack as travel_pack

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 128, 128, generator=g)
    pos = [[torch.randn(1, 512, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    neg = [[torch.randn(1, 512, 4096, generator=g).bfloat16(), {"pooled_output": torch.zeros(1, 768)}]]
    lora = torch.randn(3072, 1024, generator=g).bfloat16()
    delta = ModelDelta("w", "o", travel_pack({}), travel_pack({"w": [(1.0, ("lora", (lora,)), 1.0, None, None)]}))
    return SampleRequest(noise, noise * 0.5, pos, neg, 7, 20, 3.5, "euler", "simple", delta=delta)


@pytest.mark.parametrize("ranks", [1, 2], ids=["inline", "ray_put"])
def test_request_and_result_travel_bit_exact_as_plain_tensors(cluster, ranks, monkeypatch):
    """Both argument paths (world 1 inline, world > 1 ``ray.put``) and the packed result of ``execute``."""
    import hashlib

    import torch

    from xdit_multigpu.executor import kept, transport

    sent = []  # what collective_rpc hands to Ray: the request must go out packed (out-of-band wrappers)
    mark = kept.SentTensors.mark
    monkeypatch.setattr(kept.SentTensors, "mark", lambda self, obj: sent.append(mark(self, obj)) or sent[-1])
    req = _flux_request()
    want = [req.noise, req.latent_image, req.positive[0][0], req.negative[0][0], req.positive[0][1]["pooled_output"],
            *req.delta.weights.tensors]
    digests = [hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest() for t in want]
    ex = make(cluster, ranks)
    try:
        out = ex.collective_rpc("inspect_request", (req,), timeout=60)
    finally:
        ex.shutdown()
    wrapped = (kept.Keep, transport._Wire)
    assert any(isinstance(getattr(a, "noise", None), wrapped) for args, _ in sent for a in args), sent
    for seen, back in out:
        assert seen == [(d, True, True) for d in digests]
        assert type(back).__name__ == "SampleRequest" and back.seed == 8
        got = [back.noise, back.latent_image, back.positive[0][0], back.negative[0][0],
               back.positive[0][1]["pooled_output"], *back.delta.weights.tensors]
        for a, b in zip(want, got):
            assert type(b) is torch.Tensor and (a.dtype, a.shape) == (b.dtype, b.shape)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_embedded_cluster_listens_on_loopback_only(cluster):
    """Every TCP LISTEN socket of this driver and its descendants (GCS, raylet, agents, workers)."""
    from xdit_multigpu.executor.cluster import is_loopback

    assert cluster.embedded and cluster.node_ip == "127.0.0.1"
    ex = make(cluster, 2)  # workers listen too: include them
    try:
        pids = _ray_pids()
        listening = [
            (c.laddr.ip, c.laddr.port, c.pid)
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
        gcs_port = int(cluster.address.rsplit(":", 1)[1])
        assert gcs_port in {port for _, port, _ in listening}, (cluster.address, listening)
        assert len({pid for *_, pid in listening}) >= 4, listening  # driver, GCS, raylet, 2 workers at least
        exposed = [entry for entry in listening if not is_loopback(entry[0])]
        assert exposed == [], f"Ray sockets listening beyond loopback: {exposed}"
    finally:
        ex.shutdown()


@pytest.mark.unit
def test_is_loopback_rejects_wildcards_and_lan():
    from xdit_multigpu.executor.cluster import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "10.1.2.3"):
        assert not is_loopback(host), host


def test_collective_rpc_returns_rank_order_and_per_rank_args(cluster):
    ex = make(cluster, 3)
    try:
        out = ex.collective_rpc("echo", per_rank_args=[(10,), (11,), (12,)], timeout=30)
        assert [v for _, v in out] == [10, 11, 12]
        assert len({pid for pid, _ in out}) == 3  # one process per rank
        assert ex.collective_rpc("echo", ("x",), timeout=30)[2][1] == "x"
        ex.check_health(timeout=10)
    finally:
        ex.shutdown()
    ex.shutdown()  # idempotent
    with pytest.raises(WorkerError, match="shut down"):
        ex.collective_rpc("echo", (1,), timeout=5)


def test_remote_exception_is_worker_error_naming_rank_method_and_cause(cluster):
    ex = make(cluster, 2)
    pids = ex.actor_pids()
    with pytest.raises(WorkerError) as err:
        ex.collective_rpc("boom", per_rank_args=[(1, 0), (1, 1)], timeout=30)
    msg = str(err.value)
    assert not isinstance(err.value, WorkerTimeout)
    assert "rank 1" in msg and "boom" in msg and "ValueError: boom on rank 1" in msg, msg
    # Fail-stop: every actor is gone, and the executor refuses further calls.
    _wait_dead(pids, 15)
    with pytest.raises(WorkerError, match="shut down|failed"):
        ex.collective_rpc("echo", (1,), timeout=5)


def test_stall_is_worker_timeout_within_bound(cluster):
    ex = make(cluster, 2)
    pids = ex.actor_pids()
    t0 = time.monotonic()
    with pytest.raises(WorkerTimeout, match=r"sleep: rank\(s\) \[0, 1\] did not answer within 2 s"):
        ex.collective_rpc("sleep", (60,), timeout=2)
    assert time.monotonic() - t0 < 6
    _wait_dead(pids, 15)


def test_actor_killed_mid_call_is_worker_error_and_next_pool_works(cluster):
    ex = make(cluster, 2)
    pid1 = ex.actor_pids()[1]
    threading.Timer(1.0, os.kill, (pid1, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        ex.collective_rpc("sleep", (60,), timeout=30)
    took = time.monotonic() - t0
    assert "rank 1" in str(err.value) and "died during sleep" in str(err.value), str(err.value)
    assert took < 20, took
    _wait_dead(ex.actor_pids(), 15)
    ex2 = make(cluster, 2)
    try:
        assert [v for _, v in ex2.collective_rpc("echo", (7,), timeout=30)] == [7, 7]
    finally:
        ex2.shutdown()


def test_abort_check_interrupts_a_running_call_and_stops_the_workers(cluster):
    from xdit_multigpu.executor.ray_executor import WorkerInterrupted

    ex = make(cluster, 2)
    pids = ex.actor_pids()
    t0 = time.monotonic()
    ex.abort_check = lambda: time.monotonic() - t0 > 1.0  # ComfyUI's cancel pressed after 1 s
    with pytest.raises(WorkerInterrupted, match="sleep: interrupted"):
        ex.collective_rpc("sleep", (60,), timeout=30)
    assert time.monotonic() - t0 < 5
    _wait_dead(pids, 15)


def test_four_cpu_ranks_start_on_two_cores(cluster):
    ex = make(cluster, 4)
    try:
        assert len(ex.collective_rpc("ping", timeout=30)) == 4
    finally:
        ex.shutdown()


def test_two_worker_ranks_form_gloo_group_and_all_reduce(cluster, comfy_root):
    """The real Worker: imports ComfyUI (CPU), joins a gloo group over tcp://127.0.0.1, all-reduces."""
    from xdit_multigpu.executor.ray_executor import RayExecutor

    ex = RayExecutor(cpu(2), cluster, start_timeout=60)
    try:
        facts = ex.init_process_group("gloo", 60, comfy_root, None, file_bytes=10**9, resident="on",
                                      model_path="/models/m.safetensors", prefetch="auto")
        assert [f["rank"] for f in facts] == [0, 1]
        for f in facts:  # phases of the start, and the weights' placement (a CPU rank: never on a GPU)
            assert f["import_s"] > 0 and f["pg_s"] >= 0
            assert (f["resident"], f["resident_reason"], f["vram_state"]) == (False, "CPU rank", "DISABLED")
            assert f["prefetch"] == "off: CPU rank"  # the model path reached the rank; CPU ranks never prefetch
            parts = [f[k] for k in ("torch_s", "cuda_init_s", "comfy_mm_s", "comfy_sd_s")]
            assert min(parts) >= 0 and sum(parts) <= f["import_s"] + 0.005  # each rounded to 1 ms
        assert ex.collective_rpc("all_reduce_sum", per_rank_args=[(1.5,), (2.0,)], timeout=30) == [3.5, 3.5]
        pings = ex.collective_rpc("ping", timeout=10)
        assert [p["rank"] for p in pings] == [0, 1]
        # torch's own sockets (rendezvous store, gloo pairs) stay on loopback too.
        from xdit_multigpu.executor.cluster import is_loopback

        pids = set(ex.actor_pids())
        listening = [
            (c.laddr.ip, c.laddr.port, c.pid)
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
        assert len(listening) >= 4, listening  # per rank: Ray core worker + gloo pair listener at least
        assert [e for e in listening if not is_loopback(e[0])] == [], listening
    finally:
        ex.shutdown()


def _wait_dead(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"actor processes still alive after {timeout} s: {alive}")


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _digest(t):
    import hashlib

    import torch

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


@pytest.mark.parametrize("ranks", [1, 2], ids=["inline", "ray_put"])
def test_tensors_every_rank_holds_travel_as_keys(cluster, ranks):
    """A re-run with ComfyUI's cached conditioning and new noise: each rank gets back the conditioning it
    kept (not a new copy), with the same bytes; a ping in between changes nothing; an in-place change on
    the driver sends it again; driver and ranks agree on what is held after every call."""
    import dataclasses

    import torch

    req = _flux_request()
    cond = req.positive[0][0]
    ex = make(cluster, ranks)
    try:
        first = ex.collective_rpc("hold", (req,), timeout=60)
        assert [f[0] for f in first] == [False] * ranks and {f[1] for f in first} == {_digest(cond)}
        assert all(f[3] == ex._sent.held_keys() for f in first)
        ex.collective_rpc("ping", timeout=30)
        again = dataclasses.replace(req, noise=torch.randn(1, 16, 128, 128), seed=8)
        second = ex.collective_rpc("hold", (again,), timeout=60)
        assert [s[0] for s in second] == [True] * ranks  # held: no bytes crossed for it
        assert {s[1] for s in second} == {_digest(cond)}
        assert {s[2] for s in second} == {_digest(again.noise)}
        assert all(s[3] == ex._sent.held_keys() for s in second) and second[0][3] != first[0][3]  # old noise gone
        cond.add_(1.0)  # changed in place on the driver: sent again
        third = ex.collective_rpc("hold", (again,), timeout=60)
        assert [t[0] for t in third] == [False] * ranks and {t[1] for t in third} == {_digest(cond)}
    finally:
        ex.shutdown()


def test_a_held_tensor_changed_in_place_on_a_rank_fails_the_next_call_not_silently(cluster):
    """ComfyUI's cache rules this out; if a sampler did it anyway, the next call must not use the changed copy."""
    req = _flux_request()
    ex = make(cluster, 2)
    try:
        ex.collective_rpc("hold", (req,), {"mutate": True}, timeout=60)
        with pytest.raises(WorkerError, match="modified in place"):
            ex.collective_rpc("hold", (req,), timeout=60)
    finally:
        ex.shutdown()
