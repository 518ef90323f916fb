"""``RayExecutor``: one Ray actor per device, every call bounded, any failure ends the executor.

Why fail-stop: a rank that raises or dies inside a collective leaves the others blocked in it (gloo/NCCL
timeouts do not reliably fire, see the yunchang ring hang), so after the first failure every actor is
killed and the engine rebuilds the pool; no collective stays pending.

GPU pinning: on the embedded cluster each actor gets exactly its listed GPU through its own
``CUDA_VISIBLE_DEVICES`` (Ray's own assignment is told to keep out of it); Ray still books one GPU per
actor so two pools cannot oversubscribe. On a joined cluster Ray chooses the GPUs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from ..config import DeviceKind, DeviceSet
from ..errors import WorkerError, WorkerTimeout
from . import kept
from .actor import RayWorkerWrapper
from .base import DEFAULT_RPC_TIMEOUT_S, Executor, ProgressHook
from .cluster import ClusterInfo, worker_pythonpath
from .progress import DRAIN_SLACK_S, PROGRESS_POLL_S, CallProgress, ProgressSink
from .transport import pack

log = logging.getLogger("xdit_multigpu.executor")

DEFAULT_WORKER = "xdit_multigpu.worker.worker.Worker"
CPU_RANK_CPUS = 0.01  # CPU ranks book almost nothing so 4 ranks start on a 2-core box
POLL_S = 1.0  # wait slice: abort_check is polled this often
# Driver-side bookkeeping of a call (kept's copy of what was sent) waits this long: by then the ranks are
# past unpickling and into their work, so it does not compete with them for the host's cores.
IDLE_AFTER_S = 0.05


class WorkerInterrupted(WorkerError):
    """The caller asked to stop (ComfyUI's cancel) while workers ran; they were killed."""


def _last_line(err: BaseException) -> str:
    """The remote traceback's last line (``ExcType: message``), which names the actual cause."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__name__.startswith("Ray"):
        return f"{type(cause).__name__}: {cause}".strip().splitlines()[-1]
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _physical_gpu(ordinal: int) -> str:
    """Host ordinal -> the id to put in CUDA_VISIBLE_DEVICES (respects the host's own restriction)."""
    host = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    return host[ordinal] if ordinal < len(host) else str(ordinal)


class RayExecutor(Executor):
    """``world_size`` actors, rank order = device order (grouped by node on multi-node clusters)."""

    def __init__(
        self,
        devices: DeviceSet,
        cluster: ClusterInfo,
        *,
        worker_cls: str | type = DEFAULT_WORKER,
        start_timeout: float = 120.0,
    ) -> None:
        import ray  # noqa: PLC0415

        self._ray = ray
        self.devices = devices
        self.cluster = cluster
        self.world_size = devices.world_size
        self._actors: list[Any] = []
        self._failure: str | None = None
        # Polled about once a second while waiting (ComfyUI's cancel button); True kills the workers.
        self.abort_check: Callable[[], bool] | None = None
        self.placement: list[dict[str, Any]] = []
        self._rendezvous_dir: str | None = None
        self._sink: Any = None  # ProgressSink actor, started on the first call that reports progress
        self._calls = 0  # id of the last call that reported progress (tags its reports in the sink)
        self._sent = kept.SentTensors()  # the request tensors every rank holds from the last call
        if self.world_size < 1:
            raise WorkerError("gpu_devices: no device to start a worker on")
        self._check_resources()
        try:
            for i in range(self.world_size):
                self._actors.append(self._spawn(i, worker_cls))
            self._wait_ready(start_timeout)
        except BaseException:
            self._failure = "start failed"
            self._kill_all()  # no half-started pool may keep devices
            raise
        if devices.kind is DeviceKind.CUDA and not cluster.embedded and devices.ids != tuple(range(self.world_size)):
            log.warning(
                "xDiT: on a joined Ray cluster Ray picks the GPUs; gpu_devices %s is used as a count (%d)",
                devices.text or devices.ids, self.world_size,
            )

    # -- start ---------------------------------------------------------------------------------------
    def _check_resources(self) -> None:
        if self.devices.kind is not DeviceKind.CUDA:
            return
        have = int(self._ray.cluster_resources().get("GPU", 0))
        if have < self.world_size:
            raise WorkerError(
                f"gpu_devices: {self.devices.describe()} asks for {self.world_size} GPU(s) but the Ray cluster "
                f"at {self.cluster.address} has {have}. Use fewer GPUs, or check `ray status`"
            )

    def _spawn(self, index: int, worker_cls: str | type) -> Any:
        env = {"PYTHONPATH": worker_pythonpath(self.cluster.comfy_root)}
        if self.cluster.comfy_root:
            env["COMFYUI_PATH"] = self.cluster.comfy_root
        opts: dict[str, Any] = {"max_restarts": 0}
        if self.devices.kind is DeviceKind.CUDA:
            opts["num_gpus"] = 1
            if self.cluster.embedded:
                # Pin exactly the listed GPU; Ray would otherwise pick any free one.
                env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
                env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(self.devices.ids[index])
        else:
            opts["num_cpus"] = CPU_RANK_CPUS
            # Torch would start one OpenMP thread per core in every rank; the worker sets its share later.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.world_size))
        if self.cluster.embedded and sys.platform.startswith("linux"):
            # gloo / NCCL bootstrap sockets otherwise bind the interface the hostname resolves to.
            env.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
            env.setdefault("NCCL_SOCKET_IFNAME", os.environ.get("NCCL_SOCKET_IFNAME", "lo"))
        opts["runtime_env"] = {"env_vars": env}
        cls = self._ray.remote(RayWorkerWrapper)
        return cls.options(**opts).remote(worker_cls)

    def _wait_ready(self, timeout: float) -> None:
        refs = [a.ready.remote() for a in self._actors]
        try:
            infos = self._gather(refs, "start", timeout)
        except WorkerTimeout as e:
            raise WorkerTimeout(
                f"{e}. Ray could not start {self.world_size} worker(s) for {self.devices.describe()}; "
                f"cluster resources: {self._ray.available_resources()}. Check `ray status` or raise XDIT_START_TIMEOUT_S"
            ) from e
        # Ranks sharing a node get neighbouring rank numbers (Ulysses groups stay on fast links).
        order = sorted(range(len(infos)), key=lambda i: (infos[i]["node_ip"] != infos[0]["node_ip"], infos[i]["node_ip"]))
        self._actors = [self._actors[i] for i in order]
        self.placement = [infos[i] for i in order]

    @property
    def single_node(self) -> bool:
        return len({p["node_ip"] for p in self.placement}) <= 1

    @property
    def fast_link_group(self) -> int | None:
        """Ranks per node when the pool spans several nodes with equal counts, else None."""
        per_node: dict[str, int] = {}
        for p in self.placement:
            per_node[p["node_ip"]] = per_node.get(p["node_ip"], 0) + 1
        counts = set(per_node.values())
        return counts.pop() if len(per_node) > 1 and len(counts) == 1 else None

    def init_process_group(
        self, backend: str, timeout_s: float, comfy_root: str | None, cli_args: dict[str, Any] | None,
        *, file_bytes: int | None = None, resident: str | None = None, model_path: str | None = None,
        prefetch: str | None = None,
    ) -> list[dict[str, Any]]:
        """Form the default process group; every rank joins concurrently. Returns each rank's facts
        (``Worker.init_distributed``: import and group times, where its weights will live), rank order.

        ``file_bytes`` (model file size) and ``resident`` (``XDIT_RESIDENT_WEIGHTS``), when given, go to
        every rank, which decides from them whether to load the weights straight into GPU memory;
        ``model_path`` and ``prefetch`` (``XDIT_PREFETCH``) let such a rank read the file meanwhile.
        One machine: a FileStore in a private temp dir, because torch's TCPStore server listens on all
        interfaces whatever host it is given (seen: ``::``), which would open a port to the network.
        Several machines: rank 0 picks a free port on its node IP (TCPStore; the cluster's network).
        """
        if self.single_node:
            path = self._gather([self._actors[0].rendezvous_file.remote()], "rendezvous_file", 30.0)[0]
            self._rendezvous_dir = os.path.dirname(path)
            init_method = f"file://{path}"
        else:
            host = self.placement[0]["node_ip"]
            port = self._gather([self._actors[0].free_port.remote(host)], "free_port", 30.0)[0]
            init_method = f"tcp://{host}:{port}"
        per_rank = [
            (r, self.world_size, init_method, backend, timeout_s, comfy_root, cli_args) for r in range(self.world_size)
        ]
        # Only what was given: a worker class with the older signature keeps working.
        kwargs = {k: v for k, v in (("file_bytes", file_bytes), ("resident_mode", resident), ("model_path", model_path),
                                    ("prefetch_mode", prefetch)) if v is not None}
        self._progress_sink()  # starts while the ranks join and load, ready for the first sampling call
        return self.collective_rpc("init_distributed", kwargs=kwargs, per_rank_args=per_rank, timeout=timeout_s)

    # -- calls ---------------------------------------------------------------------------------------
    def collective_rpc(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,
        per_rank_args: list[tuple[Any, ...]] | None = None,
        on_progress: ProgressHook | None = None,
    ) -> list[Any]:
        if self._failure is not None or not self._actors:
            raise WorkerError(f"{method}: the worker pool is shut down ({self._failure or 'shutdown() was called'})")
        if per_rank_args is not None and len(per_rank_args) != self.world_size:
            raise ValueError(f"per_rank_args has {len(per_rank_args)} entries for {self.world_size} ranks")
        # Large CPU tensors (noise, latents, conditioning, LoRA weights) travel as out-of-band buffers, not
        # through torch's in-band pickling (2 ranks, ~19 MB Flux request: 67 -> 25 ms); actors get plain tensors.
        # Shared ones every rank holds from the last call (ComfyUI's cached conditioning) travel as a key.
        table = None
        kw = pack(kwargs or {})
        if per_rank_args is not None:
            per_rank_args = [pack(tuple(a)) for a in per_rank_args]
        else:
            args, table = self._sent.mark(tuple(args))
        try:
            refs = self._submit(method, args, kw, per_rank_args, on_progress)
            feed = CallProgress(on_progress, self._calls) if on_progress is not None else None
            # The copy of what was sent is taken while the ranks sample, off the request's critical path.
            idle = (lambda: self._sent.snapshot(table)) if table is not None else None
            results = self._gather(refs, method, timeout, feed, idle)
        except BaseException:
            self._sent.forget()  # some rank may not have the call's tensors: send them all next time
            raise
        self._sent.commit(table)
        return results

    def _submit(self, method: str, args: tuple[Any, ...], kw: dict[str, Any],
                per_rank_args: list[tuple[Any, ...]] | None, on_progress: ProgressHook | None) -> list[Any]:
        """Start ``method`` on every rank with packed arguments; returns one ref per rank (rank order)."""
        if per_rank_args is None and self.world_size > 1:
            # Serialise a shared argument (a request with latents and conditioning) once, not once per rank;
            # Ray resolves top-level ObjectRef arguments before the method runs.
            args = tuple(self._ray.put(a) for a in args)
        refs = []
        for r, a in enumerate(self._actors):
            rank_args = per_rank_args[r] if per_rank_args is not None else args
            if r == 0 and on_progress is not None:  # rank 0 reports its steps to the sink
                self._calls += 1
                sink, every = self._progress_sink(), on_progress.preview_interval_s
                refs.append(a.execute_reporting.remote(sink, every, self._calls, method, *rank_args, **kw))
            else:
                refs.append(a.execute.remote(method, *rank_args, **kw))
        return refs

    def _progress_sink(self) -> Any:
        """The pool's ``ProgressSink`` actor (started once, on the driver's node, books no CPU)."""
        if self._sink is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

            here = NodeAffinitySchedulingStrategy(self._ray.get_runtime_context().get_node_id(), soft=True)
            env = {"PYTHONPATH": worker_pythonpath(self.cluster.comfy_root)}
            cls = self._ray.remote(ProgressSink)
            self._sink = cls.options(num_cpus=0, max_restarts=0, scheduling_strategy=here,
                                     runtime_env={"env_vars": env}).remote()
        return self._sink

    def _drain(self, method: str) -> list[Any]:
        """Every report in the sink since the last drain (one bounded round trip)."""
        try:
            return list(self._ray.get(self._sink.drain.remote(), timeout=30.0))
        except self._ray.exceptions.RayError as e:
            self._fail(f"the progress sink failed during {method}")
            raise WorkerError(f"{method}: the progress sink failed: {_last_line(e)}") from e

    def _progress(self, method: str, step: Callable[[], None]) -> None:
        """Run one hand-over of reports to the hook; a raising hook stops the workers, then re-raises."""
        try:
            step()
        except WorkerError:
            raise  # the sink failed: _drain already stopped the workers
        except BaseException as e:
            self._fail(f"{method}: the progress hook raised {type(e).__name__}")
            raise

    def _gather(self, refs: list[Any], method: str, timeout: float, feed: CallProgress | None = None,
                idle: Callable[[], None] | None = None) -> list[Any]:
        """Results in rank order; the first failure (not the slowest rank) ends the wait.

        ``ray.wait`` returns the moment a result is ready, and every other ready result is taken in the
        same pass. With ``feed``, rank 0's ref holds ``(result, log)`` (``execute_reporting``): the sink
        is drained every ``PROGRESS_POLL_S`` while rank 0 runs (never because a result came), and the
        reports still missing when rank 0 returns come from its log (``CallProgress.finish``).
        ``idle`` (driver-side bookkeeping) runs once, ``IDLE_AFTER_S`` into the call, when the ranks are
        past unpickling and the driver would only wait; after the results for a shorter call.
        """
        ray = self._ray
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        start = time.monotonic()
        deadline, next_drain, idle_at = start + timeout, start + PROGRESS_POLL_S, start + IDLE_AFTER_S
        while pending:
            now = time.monotonic()
            self._check_wait(method, timeout, deadline - now, sorted(rank_of[r] for r in pending))
            due = [deadline, now + POLL_S] + ([next_drain] if feed else []) + ([idle_at] if idle else [])
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(due) - now))
            if ready and pending:  # the others that are ready too: no extra wait slice per rank
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            for ref in ready:
                results[rank_of[ref]] = self._result(ref, rank_of[ref], method)
            now = time.monotonic()
            if feed is not None and 0 in results:
                results[0], log = results[0]
                self._progress(method, lambda f=feed, lg=log: f.finish(lg, lambda: self._drain(method)))
                feed = None  # rank 0 is done: its log held the last of its reports
            elif feed is not None and now >= next_drain - DRAIN_SLACK_S:
                self._progress(method, lambda f=feed: f.take(self._drain(method)))
                next_drain = time.monotonic() + PROGRESS_POLL_S
            if idle is not None and pending and now >= idle_at - DRAIN_SLACK_S:
                idle, run = None, idle
                run()
        if idle is not None:
            idle()
        return [results[r] for r in range(len(refs))]

    def _check_wait(self, method: str, timeout: float, left: float, pending_ranks: list[int]) -> None:
        """Stop every worker and raise when the call ran out of time or the caller asked to stop."""
        if left <= 0:
            self._fail(f"{method} timed out after {timeout:.0f} s on rank(s) {pending_ranks}")
            raise WorkerTimeout(f"{method}: rank(s) {pending_ranks} did not answer within {timeout:.0f} s")
        if self.abort_check is not None and self.abort_check():
            self._fail(f"{method} was interrupted")
            raise WorkerInterrupted(f"{method}: interrupted; the workers were stopped")

    def _result(self, ref: Any, rank: int, method: str) -> Any:
        """A ready result, or (every worker stopped) ``WorkerError`` naming the rank and the cause."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as e:
            self._fail(f"rank {rank} died during {method}")
            raise WorkerError(f"rank {rank} ({self._where(rank)}) died during {method}: {_last_line(e)}") from e
        except ray.exceptions.RayError as e:
            self._fail(f"rank {rank} failed in {method}")
            raise WorkerError(f"rank {rank} ({self._where(rank)}) failed in {method}: {_last_line(e)}") from e

    def _where(self, rank: int) -> str:
        if self.devices.kind is DeviceKind.CPU or rank >= len(self.placement):
            return f"{self.devices.kind} rank"
        return f"GPU {self.devices.ids[rank]}" if self.cluster.embedded else f"node {self.placement[rank]['node_ip']}"

    def check_health(self, timeout: float = 10.0) -> None:
        self.collective_rpc("ping", timeout=timeout)

    def actor_pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.placement]

    # -- stop ----------------------------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        log.warning("xDiT: %s; stopping all %d worker(s)", why, len(self._actors))
        self._failure = why
        self._kill_all()

    def _kill_all(self) -> None:
        actors, self._actors = self._actors, []
        if self._sink is not None:
            actors.append(self._sink)
            self._sink = None
        if self._rendezvous_dir and self.cluster.embedded:  # same machine: remove the FileStore's temp dir
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
            self._rendezvous_dir = None
        if not self._ray.is_initialized():
            return  # Ray (and with it every actor) is already gone, e.g. at interpreter exit
        for a in actors:
            try:
                self._ray.kill(a, no_restart=True)
            except (ValueError, RuntimeError, self._ray.exceptions.RayError) as e:
                # Already dead or Ray already shut down: nothing left to release.
                log.debug("xDiT: ray.kill: %s", e)

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "shut down"
        self._kill_all()
