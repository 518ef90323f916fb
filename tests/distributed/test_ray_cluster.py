"""Cluster lifecycle: GPU pinning to exactly the listed ids, joining via RAY_ADDRESS, shutdown.

GPU pinning runs without GPUs: the embedded cluster is told it has 4 (``num_gpus=4``), Ray books one
per actor, and the test reads each actor's ``CUDA_VISIBLE_DEVICES``; no CUDA call is made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from xdit_multigpu.config import DeviceKind, DeviceSet

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ray = pytest.importorskip("ray")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EnvWorker:
    def env(self, name):
        return os.environ.get(name)


@pytest.fixture(scope="module")
def cluster(comfy_root):
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    import ray.cloudpickle

    from xdit_multigpu.executor.cluster import ensure_cluster, shutdown_cluster

    shutdown_cluster()  # another module's cluster may still be up in this process
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    info = ensure_cluster(num_gpus=4)
    yield info
    shutdown_cluster()


def test_cuda_ranks_get_exactly_the_listed_gpus(cluster, monkeypatch):
    from xdit_multigpu.executor.ray_executor import RayExecutor

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ex = RayExecutor(DeviceSet(DeviceKind.CUDA, (2, 3), "2,3"), cluster, worker_cls=EnvWorker, start_timeout=60)
    try:
        assert [p["cuda_visible_devices"] for p in ex.placement] == ["2", "3"]
        assert ex.collective_rpc("env", ("CUDA_VISIBLE_DEVICES",), timeout=20) == ["2", "3"]
        # Ray still books one GPU per rank, so pools cannot oversubscribe the machine.
        assert ray.available_resources().get("GPU", 0) == 2
    finally:
        ex.shutdown()


def test_more_gpus_than_the_cluster_has_is_a_worker_error(cluster):
    from xdit_multigpu.errors import WorkerError
    from xdit_multigpu.executor.ray_executor import RayExecutor

    with pytest.raises(WorkerError, match=r"asks for 5 GPU\(s\) but the Ray cluster .* has 4"):
        RayExecutor(DeviceSet(DeviceKind.CUDA, (0, 1, 2, 3, 4), "0-4"), cluster, worker_cls=EnvWorker)


def test_worker_pythonpath_puts_comfy_and_pack_first(cluster):
    from xdit_multigpu.executor.ray_executor import RayExecutor

    ex = RayExecutor(DeviceSet(DeviceKind.CPU, (0,), "cpu:1"), cluster, worker_cls=EnvWorker, start_timeout=60)
    try:
        path = ex.collective_rpc("env", ("PYTHONPATH",), timeout=20)[0].split(os.pathsep)
        assert path[:2] == [os.path.abspath(os.environ["COMFYUI_PATH"]), REPO]
    finally:
        ex.shutdown()


def test_ray_address_joins_the_existing_cluster(cluster):
    """A second process with RAY_ADDRESS joins (embedded=False) instead of starting its own."""
    code = textwrap.dedent(
        """
        import json, ray
        from xdit_multigpu.executor.cluster import ensure_cluster, shutdown_cluster
        info = ensure_cluster()
        print(json.dumps({"address": info.address, "embedded": info.embedded, "gpus": ray.cluster_resources().get("GPU")}))
        shutdown_cluster()
        """
    )
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"address": cluster.address, "embedded": False, "gpus": 4.0}
    assert ray.is_initialized()  # the joiner's shutdown only disconnected it; our cluster is up


def test_dead_ray_address_fails_fast_instead_of_hanging():
    """A stale or wrong address must not make ComfyUI wait for Ray's minute-long reconnect loop."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(
        """
        import time
        from xdit_multigpu.errors import WorkerError
        from xdit_multigpu.executor.cluster import ensure_cluster
        t0 = time.monotonic()
        try:
            ensure_cluster()
        except WorkerError as e:
            print(round(time.monotonic() - t0, 2), e)
        """
    )
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    took, _, msg = out.stdout.strip().partition(" ")
    assert msg.startswith(f"ray_address: nothing answers at 127.0.0.1:{port}"), out.stdout + out.stderr[-1500:]
    assert float(took) < 10


def test_workers_die_with_a_killed_comfyui():
    """SIGKILL of the driver (no atexit): GCS, raylet and the worker actors exit within seconds.

    Ray's two agents (no GPU, loopback only) notice about a minute later; seen: 62 s. The test stops
    them itself, by pid, so nothing it started outlives it.
    """
    import signal
    import time

    import psutil

    code = textwrap.dedent(
        """
        import os, sys, time, psutil
        import ray.cloudpickle
        from xdit_multigpu.config import DeviceKind, DeviceSet
        from xdit_multigpu.executor.cluster import ensure_cluster
        from xdit_multigpu.executor.ray_executor import RayExecutor
        class W:
            def ping(self): return os.getpid()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ex = RayExecutor(DeviceSet(DeviceKind.CPU, (0, 1), "cpu:2"), ensure_cluster(), worker_cls=W, start_timeout=60)
        kids = psutil.Process().children(recursive=True)
        print("PIDS", " ".join(f"{p.pid}:{p.name()}" for p in kids), flush=True)
        time.sleep(120)
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = next((ln for ln in proc.stdout if ln.startswith("PIDS")), "")
        kids = {int(p): n for p, _, n in (x.partition(":") for x in line.split()[1:])}
    finally:
        proc.kill()
        proc.wait(10)
    assert any("RayWorkerWrapper" in n for n in kids.values()), kids
    must_die = {p: n for p, n in kids.items() if "Agent" not in n}

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def alive(pids):
        return [p for p in pids if running(p)]

    deadline = time.monotonic() + 15
    while alive(must_die) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = alive(must_die)
    for pid in alive(kids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited between the check and the kill
    assert left == [], [(p, kids[p]) for p in left]


def test_shutdown_cluster_is_idempotent_and_ray_can_start_again(comfy_root):
    from xdit_multigpu.executor import cluster as c

    c.shutdown_cluster()
    c.shutdown_cluster()
    assert not ray.is_initialized() and c.current() is None
