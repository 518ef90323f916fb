"""Rank 0's sampling progress on its way to the driver while a ``collective_rpc`` runs.

Rank 0 sends every report to a ``ProgressSink`` actor, fire-and-forget (a step never waits on the
driver), tagged with the call's id and its sequence number; the driver drains the sink every
``PROGRESS_POLL_S`` inside its bounded wait. Rank 0 also keeps a log of its reports (step, total, whether
it carried a preview) and returns it with its result, so the reports the driver has not drained yet reach
it without a drain round trip after the result and without rank 0 waiting for its last put to land.
``CallProgress`` hands every report to the hook exactly once, in order (by sequence number); reports of
other calls (a previous call's undrained tail) are dropped.

A report still missing at the end is taken from the sink by one drain only when it carried a preview
(the log holds no preview latents, to keep the result small); for that, rank 0 waits for its last
preview report to land before it returns (``settle``), so the drain finds it. Without previews (the
default) nothing waits and nothing is drained after the results.

Imports neither torch nor Ray at module level (the worker and driver import it with the executor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .base import ProgressHook

log = logging.getLogger("xdit_multigpu.executor")

PROGRESS_POLL_S = 0.1  # the driver drains the sink this often while rank 0 runs
SETTLE_TIMEOUT_S = 10.0  # rank 0's wait for its last preview report to land (progress never fails a call)
# A drain this close to due is made now: Ray rounds a wait's timeout down to whole milliseconds, so
# waiting out the last fraction would spin through zero-length waits.
DRAIN_SLACK_S = 0.002

Report = tuple[int, int, int, int, Any]  # (call id, sequence number, step, total, preview or None)
LogEntry = tuple[int, int, bool]  # (step, total, carried a preview)


class ProgressSink:
    """A tiny actor between rank 0 and the driver: rank 0 puts reports, the driver drains them."""

    def __init__(self) -> None:
        self._reports: list[Report] = []

    def put(self, call: int, seq: int, step: int, total: int, preview: Any) -> None:
        self._reports.append((call, seq, step, total, preview))

    def drain(self) -> list[Report]:
        reports, self._reports = self._reports, []
        return reports


class SinkReporter:
    """Rank 0's ``progress(step, total, x0)``: every step is sent and logged; x0 at most once per interval."""

    def __init__(self, sink: Any, preview_interval_s: float | None, call: int) -> None:
        self._sink = sink
        self._interval = preview_interval_s
        self._call = call
        self._last_preview = float("-inf")
        self._preview_ref: Any = None  # the put of the last report that carried a preview
        self.log: list[LogEntry] = []  # returned with the result (no latents: it stays small)

    def __call__(self, step: int, total: int, x0: Any = None) -> None:
        preview = None
        now = time.monotonic()
        if self._interval is not None and x0 is not None and now - self._last_preview >= self._interval:
            self._last_preview = now
            preview = small_latent(x0)
        ref = self._sink.put.remote(self._call, len(self.log), int(step), int(total), preview)
        if preview is not None:
            self._preview_ref = ref
        self.log.append((int(step), int(total), preview is not None))

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until the last preview report is in the sink (the driver's final drain must find it)."""
        if self._preview_ref is None:
            return
        import ray  # noqa: PLC0415

        try:
            ray.get(self._preview_ref, timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:  # it then arrives from the log, without preview
            log.debug("xDiT: progress settle: %s", e)


class CallProgress:
    """The driver's side of one call: hands each of rank 0's reports to the hook once, in order.

    Exceptions from the hook propagate (the executor stops the workers and re-raises them).
    """

    def __init__(self, hook: ProgressHook, call: int) -> None:
        self.hook = hook
        self.call = call
        self.delivered = 0  # reports handed to the hook so far (= the next expected sequence number)

    def take(self, reports: list[Report]) -> None:
        """Reports drained from the sink: this call's next ones go to the hook, anything else is dropped."""
        for call, seq, step, total, preview in reports:
            if call == self.call and seq == self.delivered:
                self.hook.update(step, total, preview)
                self.delivered += 1

    def finish(self, log: list[LogEntry], drain: Callable[[], list[Report]]) -> None:
        """Rank 0 returned ``log``: hand over what is still missing. ``drain`` (one round trip) runs only
        when a missing report carried a preview; what the sink has not got yet comes from the log."""
        if any(had_preview for _, _, had_preview in log[self.delivered:]):
            self.take(drain())
        for step, total, _ in log[self.delivered:]:
            self.hook.update(step, total, None)
            self.delivered += 1


def small_latent(x0: Any) -> Any:
    """The preview source: first batch item (first frame of a video latent), float16 numpy on CPU."""
    x = x0[:1, :, :1] if x0.ndim == 5 else x0[:1]
    return x.detach().to("cpu").half().numpy()
