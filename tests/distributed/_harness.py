"""Launch N CPU ranks (torch.multiprocessing spawn + gloo) and collect their results, bounded in time.

Each rank imports ComfyUI on CPU through ``xdit_multigpu.worker.bootstrap.import_comfy``, joins a gloo
group on ``tcp://127.0.0.1:<free port>`` with a 60 s timeout, runs ``target(rank, world, payload)`` and
puts its (picklable, tensor-free) result on a queue. Every wait is bounded: a rank that hangs or dies
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(target: Callable[[int, int, Any], Any], rank: int, world: int, port: int, comfy_path: str,
           payload: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        from xdit_multigpu.worker.bootstrap import import_comfy

        import_comfy(comfy_path, cpu=True)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=GLOO_TIMEOUT_S))
        results.put((rank, True, target(rank, world, payload)))
    except BaseException:  # noqa: BLE001  (report any failure of the rank to the parent, then exit)
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: Callable[[int, int, Any], Any], world: int, payload: Any, comfy_path: str,
              timeout_s: float = 600) -> list[Any]:
    """Run ``target`` on ``world`` spawned ranks; returns the results in rank order or raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit: 2 cores, N ranks
    try:
        procs = [ctx.Process(target=_entry, args=(target, r, world, port, comfy_path, payload, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(got))} gave no result in {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
                if dead:
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})") from None
                continue
            got[rank] = (ok, value)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [got[r][1] for r in range(world)]


def groups_for(plan: Any, current: Any, rank: int, world: int) -> Any:
    """The ``ParallelGroups`` of ``plan``: ``current`` when it already is, else rebuilt (old ones freed)."""
    from xdit_multigpu.parallel.groups import ParallelGroups

    degrees = (plan.cfg, plan.ulysses, plan.ring)
    if current is not None and (current.plan.cfg, current.plan.ulysses, current.plan.ring) == degrees:
        return current  # as the worker does: groups are keyed by the degrees only (not e.g. the backend)
    if current is not None:
        current.destroy()
    return ParallelGroups.build(plan, rank, world, timeout_s=GLOO_TIMEOUT_S)


def attention_notes() -> list[str]:
    """The messages the sequence-parallel attention logs on this rank from now on (its one-per-patcher
    "all-gather path" line tells a test which attention path ran); the caller clears the list."""
    import logging

    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    attn_log = logging.getLogger("xdit_multigpu.parallel.attention")
    attn_log.addHandler(handler)
    attn_log.setLevel(logging.INFO)
    return notes


def load_tiny(tiny: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """``{family: (TinyModel, LoadSpec, patcher)}``: each generated file loaded in this process with
    ComfyUI's own loader (the one-device reference of the Ray tests)."""
    from xdit_multigpu.config import LoaderKind, LoadSpec
    from xdit_multigpu.worker import comfy_runtime

    out = {}
    for fam, t in tiny.items():
        load = LoadSpec.for_file(LoaderKind.DIFFUSION_MODEL, t.path, unet_config_json=t.unet_config_json)
        out[fam] = (t, load, comfy_runtime.load_diffusion_model(load))
    return out
