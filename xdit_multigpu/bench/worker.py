"""``BenchWorker``: the engine's ``Worker`` plus measurement RPCs (the benchmark's pools use it).

``sample`` is the user path unchanged (``Worker.sample``: model delta, ``parallelize``, ComfyUI's
sampler); it only adds a step timer to the progress callback every rank already supports, and keeps
the last run's timings for ``stats``. Nothing here changes what is computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..engine.request import SampleRequest
from ..worker.worker import Worker
from .timing import StepTimer, memory_stats, profile_summary, profiled, reset_peak


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
        self._last.update(rank=self.rank, t_in=t_in, t_out=time.time())
        return out

    def bench_stats(self) -> dict[str, Any]:
        """The last ``sample``'s timings on this rank plus the peak memory since ``bench_reset``."""
        return {**self._last, **memory_stats(self._cuda())}

    def bench_reset(self, profile_next: bool = False) -> dict[str, Any]:
        """Reset the peak-memory counters; ``profile_next``: profile the next ``sample`` on this rank."""
        reset_peak(self._cuda())
        self._profile_next = profile_next
        return {"rank": self.rank}
