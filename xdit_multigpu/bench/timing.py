"""Measuring a sampling run the same way in the stock process and in every engine rank.

Per-step latency: ComfyUI's sampler calls its ``callback`` once per step; ``StepTimer`` records a CUDA
event there (no host sync: the event completes when the GPU reaches it) and takes the intervals between
consecutive events after the run. An interval is one whole step as the GPU saw it: the model call(s),
the sampler's update and any host work that kept the GPU waiting. On CPU, wall-clock stamps.

``profile_summary`` turns a ``torch.profiler`` run into the top kernels and the NCCL time per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


class StepTimer:
    """Marks at every sampler step; ``intervals_ms`` after ``finish`` (which syncs the device)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._marks: list[Any] = []
        self.wall_s = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._marks.clear()
        self._t0 = time.perf_counter()
        self.mark()  # request start: start -> first step = per-request setup + the first step

    def mark(self) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def finish(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self._t0

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self._marks, self._marks[1:])]

    def summary(self) -> dict[str, Any]:
        first, *iv = self.intervals_ms() or [None]
        med = statistics.median(iv) if iv else None
        return {"step_ms": [round(x, 3) for x in iv], "median_ms": round(med, 3) if med is not None else None,
                "first_step_ms": round(first, 3) if first is not None else None,
                "setup_ms": round(first - med, 3) if first is not None and med is not None else None,
                "wall_s": round(self.wall_s, 4), "steps_marked": len(self._marks) - 1}

    def callback(self, then: Callable[[int, int, Any], None] | None) -> Callable[[int, int, Any], None]:
        """A ``progress(step, total, x0)`` that marks, then calls ``then`` (the pool's reporter) if any."""

        def progress(step: int, total: int, x0: Any) -> None:
            self.mark()
            if then is not None:
                then(step, total, x0)

        return progress


def memory_stats(cuda: bool) -> dict[str, Any]:
    if not cuda:
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    import torch

    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def profile_summary(prof: Any, steps: int, top: int = 15) -> dict[str, Any]:
    """Top device kernels (self time) and NCCL / attention / GEMM totals, per step, from a profiler run."""
    rows = []
    nccl = attn = gemm = total = cpu_total = 0.0
    for evt in prof.key_averages():
        dev = float(getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0) or 0.0)
        cpu = float(getattr(evt, "self_cpu_time_total", 0.0) or 0.0)
        if dev <= 0.0 and cpu <= 0.0:
            continue
        name = evt.key
        low = name.lower()
        cpu_total += cpu
        if dev > 0:
            total += dev
            if "nccl" in low:
                nccl += dev
            elif "flash" in low or "attention" in low or "fmha" in low:
                attn += dev
            elif "gemm" in low or "matmul" in low or "sm90" in low or "cutlass" in low:
                gemm += dev
        rows.append((dev, cpu, evt.count, name))
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    per = max(1, steps)
    return {
        "steps": steps,
        "device_ms_per_step": round(total / 1000 / per, 3),
        "nccl_ms_per_step": round(nccl / 1000 / per, 3),
        "attention_ms_per_step": round(attn / 1000 / per, 3),
        "gemm_ms_per_step": round(gemm / 1000 / per, 3),
        "host_self_ms_per_step": round(cpu_total / 1000 / per, 3),  # CPU self time of all ops (launch cost)
        "top": [{"name": n[:120], "device_ms_per_step": round(d / 1000 / per, 3), "cpu_ms_per_step": round(c / 1000 / per, 3),
                 "calls_per_step": round(k / per, 1)} for d, c, k, n in rows[:top]],
    }


def profiled(cuda: bool) -> Any:
    """A ``torch.profiler.profile`` context for one sampling run (CPU + CUDA activities)."""
    import torch.profiler as tp

    acts = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
    return tp.profile(activities=acts, record_shapes=False, with_stack=False)
