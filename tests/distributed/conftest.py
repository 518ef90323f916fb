"""Fixtures shared by the Ray tests of this tier."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cluster(request, comfy_root):
    """One embedded loopback Ray cluster per test module (Ray starts in 3-5 s).

    The requesting module is pickled by value, so fake worker classes defined in it reach the actors.
    Pools the process-wide engine may hold are released before the cluster stops.
    """
    os.environ.setdefault("COMFYUI_PATH", comfy_root)
    import ray.cloudpickle

    from xdit_multigpu.engine.engine import get_engine
    from xdit_multigpu.executor.cluster import ensure_cluster, shutdown_cluster

    ray.cloudpickle.register_pickle_by_value(request.module)
    info = ensure_cluster()
    yield info
    get_engine().release_all(stop_ray=False)
    shutdown_cluster()
