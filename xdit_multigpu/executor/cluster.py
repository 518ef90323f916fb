"""The Ray cluster the workers run on: an embedded one bound to loopback, or one the user joins.

Embedded (default): ``ray.init(address="local")`` always starts a fresh cluster, so a stale
``ray_current_cluster`` file (left by a crashed session) is never followed. Every Ray process of it
listens on 127.0.0.1 only: an open Ray port is remote code execution for anyone on the network.
Joined: ``RAY_ADDRESS`` (or an explicit address) names a cluster the user runs and secures.

Importing this module does not import Ray.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import WorkerError

log = logging.getLogger("xdit_multigpu.cluster")

LOOPBACK = "127.0.0.1"
NAMESPACE = "xdit_multigpu"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class ClusterInfo:
    """Where the workers run. ``embedded`` clusters are ours: we started them and shut them down."""

    address: str  # GCS address, "host:port"
    embedded: bool
    node_ip: str  # this node's IP as Ray knows it (127.0.0.1 for an embedded cluster)
    comfy_root: str | None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, how gRPC reports it)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def comfy_root() -> str | None:
    """The ComfyUI tree the host runs from (``folder_paths`` lives at its root), else ``COMFYUI_PATH``."""
    fp = sys.modules.get("folder_paths")
    if fp is not None and getattr(fp, "__file__", None):
        return os.path.dirname(os.path.abspath(fp.__file__))
    env = os.environ.get("COMFYUI_PATH")
    return os.path.abspath(env) if env else None


def worker_pythonpath(root: str | None) -> str:
    """PYTHONPATH for workers: ComfyUI root, this pack's repository root, then whatever was there.

    Job-level (and per-actor) ``env_vars`` keep the trees in place; ``py_modules``/``working_dir`` would
    copy them into Ray's temp dir, where ComfyUI's ``folder_paths`` finds no models.
    """
    parts = [p for p in (root, PACK_ROOT) if p]
    parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


_lock = threading.Lock()
_current: ClusterInfo | None = None
_atexit_registered = False
_owned = False  # True when this module called ray.init (so it may call ray.shutdown)
_requested: str | None = None  # the address the user asked to join (None: embedded)


def ensure_cluster(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> ClusterInfo:
    """Start (or join) the cluster once per process; later calls return the same one.

    ``address`` or ``RAY_ADDRESS`` joins an existing cluster (the user's explicit choice); otherwise an
    embedded loopback-only cluster starts. ``num_cpus``/``num_gpus`` override Ray's detection for an
    embedded cluster (tests use ``num_gpus`` to exercise GPU pinning without GPUs). Raises
    ``WorkerError`` when Ray cannot start or connect.
    """
    global _current
    import ray  # noqa: PLC0415  (Ray is optional at import time; ImportError means "no Ray" upstream)

    target = address or os.environ.get("RAY_ADDRESS") or None
    if target == "local":
        target = None
    with _lock:
        if _current is not None and ray.is_initialized():
            if target is None or target in (_requested, _current.address):
                return _current
            raise WorkerError(
                f"ray_address: this ComfyUI already runs workers on Ray cluster {_current.address}; "
                f"joining {target} instead needs a ComfyUI restart"
            )
        if ray.is_initialized():
            # Another pack started Ray in this process: reuse it (actors carry their own PYTHONPATH) and
            # leave its shutdown to that pack.
            ctx = ray.get_runtime_context()
            _current = ClusterInfo(ctx.gcs_address, False, ray.util.get_node_ip_address(), comfy_root())
            _set_state(owned=False, requested=target)
            log.info("xDiT: reusing the Ray connection this process already has (%s)", _current.address)
            if not is_loopback(_current.node_ip):
                log.warning("xDiT: that Ray cluster was not started by xDiT and listens on %s, not loopback only",
                            _current.node_ip)
        elif target:
            _current = _join(ray, target)
            _set_state(owned=True, requested=target)
        else:
            # Ray starts its GCS and raylet with PR_SET_PDEATHSIG, which Linux fires when the *thread* that
            # forked them exits. The caller may be a short-lived thread (the async KSampler runs in
            # asyncio.to_thread, whose pool ends with the prompt), so the processes are forked from a
            # thread that lives as long as this process.
            future = _keeper().submit(_start_embedded, ray, num_cpus, num_gpus)
            _current = future.result()
            _set_state(owned=True, requested=target)
        _register_atexit()
        return _current


_KEEPER: concurrent.futures.ThreadPoolExecutor | None = None


def _keeper() -> concurrent.futures.ThreadPoolExecutor:
    """One long-lived thread that starts the embedded cluster's processes (see ``ensure_cluster``)."""
    global _KEEPER
    if _KEEPER is None:
        _KEEPER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdit-ray")
    return _KEEPER


def _set_state(owned: bool, requested: str | None) -> None:
    global _owned, _requested
    _owned, _requested = owned, requested


def _runtime_env(root: str | None) -> dict[str, Any]:
    return {"env_vars": {"PYTHONPATH": worker_pythonpath(root)}}


JOIN_PROBE_TIMEOUT_S = 5.0


def _resolve_join_address(ray: Any, address: str) -> tuple[str, str, int]:
    """(address for ray.init, host, port). "auto" is read from Ray's temp dir, which may be stale."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die  # noqa: PLC0415

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise WorkerError(f"ray_address: auto found no running Ray cluster ({e}). Start one or set RAY_ADDRESS") from e
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        raise WorkerError(f'ray_address: "{address}" is not host:port. Use e.g. 10.0.0.5:6379, or leave it empty')
    return address, host.strip("[]"), int(port)


def _join(ray: Any, address: str) -> ClusterInfo:
    """Connect to the user's cluster; a short TCP probe first, because ray.init retries a dead address for
    a minute or more (e.g. a stale ``ray_current_cluster``) and ComfyUI must not hang on it."""
    root = comfy_root()
    target, host, port = _resolve_join_address(ray, address)
    try:
        socket.create_connection((host, port), timeout=JOIN_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise WorkerError(
            f"ray_address: nothing answers at {host}:{port} ({e}). Check RAY_ADDRESS and that the cluster runs (`ray status`)"
        ) from e
    kwargs: dict[str, Any] = {"address": target, "namespace": NAMESPACE, "runtime_env": _runtime_env(root)}
    loop = is_loopback(host)
    if loop:
        kwargs["_node_ip_address"] = LOOPBACK  # a loopback-only cluster: this driver must not use the LAN IP
    try:
        with _loopback_node_ip() if loop else contextlib.nullcontext():
            ray.init(**kwargs)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError... depending on the stage
        raise WorkerError(
            f"ray_address: could not join the Ray cluster at {target}: {type(e).__name__}: {e}. "
            "Check `ray status` on that cluster; with token auth set RAY_AUTH_MODE=token and the cluster's token"
        ) from e
    ctx = ray.get_runtime_context()
    info = ClusterInfo(ctx.gcs_address, False, ray.util.get_node_ip_address(), root)
    log.info("xDiT: joined Ray cluster %s", info.address)
    return info


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make Ray keep ``_node_ip_address="127.0.0.1"`` instead of replacing it with the LAN address.

    ``ray.init`` passes the node IP through ``resolve_ip_for_localhost``, which maps loopback to the
    machine's routable IP unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false (its Windows/macOS
    default, env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read at Ray's import). With a loopback node IP,
    Ray's gRPC servers (GCS, raylet, core workers) and agents bind 127.0.0.1 instead of all interfaces.
    The flag is restored right after the cluster starts; the result is verified by ``_check_loopback``.
    """
    import ray._private.ray_constants as rc  # noqa: PLC0415

    old = rc.ENABLE_RAY_CLUSTER
    rc.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        rc.ENABLE_RAY_CLUSTER = old


def _start_embedded(ray: Any, num_cpus: int | None, num_gpus: int | None = None) -> ClusterInfo:
    root = comfy_root()
    kwargs: dict[str, Any] = {
        "address": "local",  # never follow RAY_ADDRESS or a stale ray_current_cluster file
        "namespace": NAMESPACE,
        "include_dashboard": False,  # no dashboard, so no job-submission HTTP API
        "_node_ip_address": LOOPBACK,
        "runtime_env": _runtime_env(root),
        "num_cpus": num_cpus or os.cpu_count() or 1,
    }
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    try:
        with _loopback_node_ip():
            ray.init(**kwargs)
    except Exception as e:  # Ray start failures come as many types; all mean "no cluster"
        raise WorkerError(f"could not start the embedded Ray cluster: {type(e).__name__}: {e}") from e
    node_ip = ray.util.get_node_ip_address()
    gcs = ray.get_runtime_context().gcs_address
    _check_loopback(ray, node_ip, gcs)
    log.info("xDiT: started an embedded Ray cluster on %s (loopback only)", gcs)
    return ClusterInfo(gcs, True, node_ip, root)


def _check_loopback(ray: Any, node_ip: str, gcs: str) -> None:
    """Refuse to keep an embedded cluster whose node address is not loopback (fail closed)."""
    host = gcs.rsplit(":", 1)[0].strip("[]")
    if not (is_loopback(node_ip) and is_loopback(host)):
        ray.shutdown()
        raise WorkerError(
            f"the embedded Ray cluster came up on {gcs} (node {node_ip}), not on loopback; it was shut down. "
            "Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before starting ComfyUI, or run your own cluster and set RAY_ADDRESS"
        )


def current() -> ClusterInfo | None:
    return _current


def shutdown_cluster() -> None:
    """Disconnect from Ray; an embedded cluster's processes exit with it. Idempotent."""
    global _current
    with _lock:
        info, _current = _current, None
        if info is None or not _owned:
            return
        try:
            import ray  # noqa: PLC0415

            if ray.is_initialized():
                ray.shutdown()
        except (ImportError, RuntimeError, OSError) as e:
            log.warning("xDiT: Ray shutdown raised %s: %s", type(e).__name__, e)


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        # Workers must not outlive ComfyUI: ray.shutdown() stops the embedded cluster's processes.
        atexit.register(shutdown_cluster)
        _atexit_registered = True
