"""``BenchWorker``: the engine's ``Worker`` plus measurement RPCs (the benchmark's pools use it).

``sample`` is the user path unchanged (``Worker.sample``: model delta, ``parallelize``, ComfyUI's
sampler); it only adds a step timer to the progress callback every rank already supports, and keeps
the last run's timings for ``stats``. Nothing here changes what is computed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..engine.request import SampleRequest
from ..worker.worker import Worker
from .timing import StepTimer, memory_stats, profile_summary, profiled, reset_peak


def _counting(counts: dict[str, Any], key: str) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            if key == "text":  # SequenceParallel.shard_text(state, ...): which way the text went
                counts["text_sharded" if args[0].text_sharded else "text_replicated"] += 1
            else:
                counts[key] += 1
                if key == "fused":  # FusedUlysses: head chunks pipelined per call (overlap)
                    counts["fused_chunks"] = self.last_chunks
                if key == "fallback":
                    counts["fallback_reason"] = str(args[0])
            return out

        return counted

    return make


@contextlib.contextmanager
def count_paths() -> Iterator[dict[str, Any]]:
    """Which attention paths one request took (fused Ulysses, yunchang USP, all-gather fallback) and
    whether the text was sharded; counting wrappers on our own classes, removed afterwards."""
    from .. import patching
    from ..parallel import attention, sequence, ulysses

    counts: dict[str, Any] = {"fused": 0, "usp": 0, "fallback": 0, "text_sharded": 0, "text_replicated": 0}
    targets = {"fused": (ulysses.FusedUlysses, "__call__"), "usp": (attention.SequenceAttention, "usp"),
               "fallback": (attention.SequenceAttention, "note_fallback"), "text": (sequence.SequenceParallel, "shard_text")}
    keys = []
    try:
        for name, (owner, attr) in targets.items():
            key = f"xdit_bench.count.{name}"
            if patching.install(key, owner, attr, _counting(counts, name)):
                keys.append(key)
        yield counts
    finally:
        for key in keys:
            patching.remove(key)


class BenchWorker(Worker):
    """A rank that also reports step times, its sample wall time, peak memory and a profile."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, Any] = {}
        self._profile_next = False

    def _cuda(self) -> bool:
        return self.backend == "nccl"

    def sample(self, req: SampleRequest, progress: Callable[[int, int, Any], None] | None = None) -> Any:
        timer = StepTimer(self._cuda())
        t_in = time.time()
        with count_paths() as paths:
            timer.start()
            if self._profile_next:
                self._profile_next = False
                with profiled(self._cuda()) as prof:
                    out = super().sample(req, progress=timer.callback(progress))
                    timer.finish()
                self._last = {**timer.summary(), "profile": profile_summary(prof, req.steps)}
            else:
                out = super().sample(req, progress=timer.callback(progress))
                timer.finish()
                self._last = timer.summary()
        graphs = self.graph_stats.as_dict() if self.graph_stats is not None else None
        self._last.update(rank=self.rank, t_in=t_in, t_out=time.time(), paths=paths, graphs=graphs)
        return out

    def bench_stats(self) -> dict[str, Any]:
        """The last ``sample``'s timings on this rank plus the peak memory since ``bench_reset``."""
        return {**self._last, **memory_stats(self._cuda())}

    def bench_env(self, env: dict[str, str | None]) -> dict[str, str | None]:
        """Set (None: unset) environment variables in this rank, e.g. the A/B switches of
        ``parallel/tuning.py``, which are read when the next request is parallelised; returns the old values."""
        import os

        old = {k: os.environ.get(k) for k in env}
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return old

    def bench_reset(self, profile_next: bool = False) -> dict[str, Any]:
        """Reset the peak-memory counters; ``profile_next``: profile the next ``sample`` on this rank."""
        reset_peak(self._cuda())
        self._profile_next = profile_next
        return {"rank": self.rank}
