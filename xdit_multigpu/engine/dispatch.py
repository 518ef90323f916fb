"""Several GPU groups behind one dispatcher: data-parallel batches and per-request scheduling.

``gpu_devices`` = ``"0,1|2,3"`` (or ``gpus_per_group``) gives groups that each run one parallel plan on
their own pool (own actors, own process group; groups share nothing). ``GroupDispatcher`` decides, per
request, where the work goes:

* **a latent batch** (batch > 1) is cut into contiguous slices of items, each slice sampled by one group
  with exactly the noise ComfyUI gives those items (``SampleRequest.slice``; ancestral / SDE noise is drawn
  for the whole batch and sliced in the worker), and the slices are put back in order. round_robin and
  weighted_round_robin cut the batch up front (equal shares / by weight); least_loaded and adaptive hand
  out one item at a time to whichever group is free, so a slower group simply takes fewer. adaptive
  switches to an up-front cut by measured speed once it has measured every group.
* **a single image** goes to the group the policy picks (round_robin: in turn; least_loaded: fewest in
  flight; weighted: by weight; adaptive: soonest expected finish). Two xDiT KSamplers of one workflow run
  at the same time on different groups (the node is async; see ``nodes/sampler.py``).

A group that fails (start, worker death, timeout) is taken out, its slice goes back to the queue for the
others, and its pool is rebuilt in the background; only when every group is out does the request fall
back to one device (the whole batch, in ComfyUI's process, with the reason shown).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import DispatcherSpec
from .scheduling import Policy, make_policy

if TYPE_CHECKING:
    from ..executor.base import ProgressHook
    from .engine import Engine, SampleOutcome
    from .request import SampleRequest

log = logging.getLogger("xdit_multigpu.dispatch")


@dataclass
class _Group:
    index: int
    spec: DispatcherSpec  # this group's devices; the engine keeps one pool per group
    up: bool = True
    rebuild: threading.Thread | None = None

    def describe(self) -> str:
        return f"group {self.index} ({self.spec.devices.describe()})"


@dataclass
class _Unit:
    start: int
    stop: int
    group: int | None  # the group an up-front cut gave it to; None: any free group


class GroupDispatcher:
    """Groups + one scheduling policy for one ``DispatcherSpec`` (kept by the engine across prompts)."""

    def __init__(self, engine: Engine, spec: DispatcherSpec) -> None:
        self.engine = engine
        self.spec = spec
        self.groups = [_Group(i, spec.for_group(g)) for i, g in enumerate(spec.device_groups())]
        self.policy: Policy = make_policy(spec.scheduling, len(self.groups), spec.group_weights or None)
        self._lock = threading.Lock()  # policy state and group flags

    # -- entry ---------------------------------------------------------------------------------------
    def sample(self, req: SampleRequest, model_spec: Any, heads: int, cfg_active: bool, fallback_patcher: Any,
               progress: ProgressHook | None) -> SampleOutcome:
        self._revive()
        batch = int(req.noise.shape[0])
        whole = _unsplittable(req)
        if batch > 1 and whole is None:
            return self._batch(req, batch, (model_spec, heads, cfg_active), fallback_patcher, progress)
        return self._single(req, batch, (model_spec, heads, cfg_active), fallback_patcher, progress, whole)

    # -- one unit ------------------------------------------------------------------------------------
    def _single(self, req: SampleRequest, batch: int, model: tuple[Any, int, bool], fallback_patcher: Any,
                progress: ProgressHook | None, whole: str | None) -> SampleOutcome:
        notes: list[str] = [f"batch kept whole: {whole}"] if whole and batch > 1 else []
        while True:
            with self._lock:
                available = [g.up for g in self.groups]
                if not any(available):
                    break
                index = self.policy.pick(available)
                self.policy.started(index, batch)
            group = self.groups[index]
            outcome, seconds = self._run(group, req, model, progress)
            with self._lock:
                self.policy.finished(index, batch if outcome is not None else 0, seconds)
            if outcome is not None:
                notes.insert(0, f"{self.spec.scheduling.value} -> {group.describe()}")
                return dataclasses.replace(outcome, groups="; ".join(notes))
            notes.append(f"{group.describe()} failed and is being rebuilt")
        return self._fallback(req, fallback_patcher, notes, progress)

    def _run(self, group: _Group, req: SampleRequest, model: tuple[Any, int, bool],
             progress: ProgressHook | None) -> tuple[SampleOutcome | None, float]:
        """``req`` on ``group``; None (and the group taken out, rebuilt in the background) on failure."""
        from .engine import Unavailable  # noqa: PLC0415

        t0 = time.perf_counter()
        try:
            out = self.engine.sample_group(group.spec, req, *model, progress, {})
        except Unavailable as e:
            log.warning("xDiT: %s failed (%s); taking it out and rebuilding it in the background", group.describe(), e)
            self._take_out(group)
            return None, time.perf_counter() - t0
        return out, time.perf_counter() - t0

    # -- a batch over the groups ---------------------------------------------------------------------
    def _batch(self, req: SampleRequest, batch: int, model: tuple[Any, int, bool], fallback_patcher: Any,
               progress: ProgressHook | None) -> SampleOutcome:
        live = [g for g in self.groups if g.up]
        if not live:
            return self._fallback(req, fallback_patcher, [f"{g.describe()} is being rebuilt" for g in self.groups], progress)
        queue = _Queue(self._cut(batch))
        # ComfyUI's progress bar follows one group (the first live one): one bar, not several racing.
        threads = [threading.Thread(target=self._drain, args=(g, queue, req, model, progress if g is live[0] else None),
                                    name=f"xdit-group-{g.index}", daemon=True)
                   for g in live]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if queue.error is not None:
            raise queue.error  # an interrupt or a ConfigError: the user's to see, not a fallback
        shares = ", ".join(f"{g.describe()}: {queue.items.get(g.index, 0)} item(s)" for g in self.groups)
        notes = [f"batch {batch} over {len(self.groups)} groups by {self.spec.scheduling.value}: {shares}"]
        notes += [f"{self.groups[i].describe()} failed and is being rebuilt" for i in sorted(queue.failed)]
        if queue.pending():
            return self._fallback(req, fallback_patcher, notes, progress)
        import torch  # noqa: PLC0415

        latent = torch.cat([queue.results[s] for s in sorted(queue.results)], dim=0)
        first = queue.outcomes[min(queue.outcomes)]
        return dataclasses.replace(first, latent=latent, groups="; ".join(notes))

    def _cut(self, batch: int) -> list[_Unit]:
        """The work units of a batch: one slice per group (up-front cut) or one item each (dynamic)."""
        with self._lock:
            if not self.policy.cuts_up_front():
                return [_Unit(i, i + 1, None) for i in range(batch)]
            shares = self.policy.split(batch, [g.up for g in self.groups])
        units, start = [], 0
        for index, n in enumerate(shares):
            if n:
                units.append(_Unit(start, start + n, index))
                start += n
        return units

    def _drain(self, group: _Group, queue: _Queue, req: SampleRequest, model: tuple[Any, int, bool],
               progress: ProgressHook | None) -> None:
        """One group's thread: take units meant for it (or for anyone) until the queue is done."""
        while True:
            unit = queue.take(group.index)
            if unit is None:
                return
            n = unit.stop - unit.start
            with self._lock:
                self.policy.started(group.index, n)
            try:
                outcome, seconds = self._run(group, req.slice(unit.start, unit.stop) if n < queue.total else req,
                                             model, progress)
            except BaseException as e:  # noqa: BLE001  (interrupt / ConfigError: stop everyone, re-raise in the caller)
                with self._lock:
                    self.policy.finished(group.index, 0, 0.0)
                queue.fail(e)
                return
            with self._lock:
                self.policy.finished(group.index, n if outcome is not None else 0, seconds)
            if outcome is None:  # this group is out: its unit goes to whoever is still up
                queue.give_back(dataclasses.replace(unit, group=None), group.index)
                return
            queue.done(unit, group.index, outcome)

    # -- failures ------------------------------------------------------------------------------------
    def _take_out(self, group: _Group) -> None:
        with self._lock:
            group.up = False
            if group.rebuild is not None and group.rebuild.is_alive():
                return
            group.rebuild = threading.Thread(target=self._rebuild, args=(group,), name=f"xdit-rebuild-{group.index}",
                                             daemon=True)
            group.rebuild.start()

    def _rebuild(self, group: _Group) -> None:
        try:
            self.engine.start_pool(group.spec)
        except Exception as e:  # noqa: BLE001  (stays out; the next request tries again)
            log.warning("xDiT: rebuilding %s failed: %s", group.describe(), e)
            return
        with self._lock:
            group.up = True
        log.info("xDiT: %s is back", group.describe())

    def _revive(self) -> None:
        """Groups whose background rebuild ended without success get another one."""
        for g in self.groups:
            if not g.up and (g.rebuild is None or not g.rebuild.is_alive()):
                self._take_out(g)

    def _fallback(self, req: SampleRequest, patcher: Any, notes: list[str], progress: ProgressHook | None) -> SampleOutcome:
        reason = "every GPU group failed (" + "; ".join(notes) + ")"
        out = self.engine.fallback(req, patcher, reason, {}, progress)
        return dataclasses.replace(out, groups="; ".join(notes))


class _Queue:
    """Work units shared by the group threads; results keyed by the unit's first item."""

    def __init__(self, units: list[_Unit]) -> None:
        self.units = deque(units)
        self.total = sum(u.stop - u.start for u in units)
        self.results: dict[int, Any] = {}
        self.outcomes: dict[int, SampleOutcome] = {}
        self.items: dict[int, int] = {}  # items done per group
        self.error: BaseException | None = None
        self.failed: set[int] = set()  # groups that failed during this batch
        self._cv = threading.Condition()
        self._running = 0

    def take(self, group: int) -> _Unit | None:
        with self._cv:
            while True:
                if self.error is not None:
                    return None
                for unit in self.units:
                    if unit.group in (None, group):
                        self.units.remove(unit)
                        self._running += 1
                        return unit
                if not self.units and self._running == 0:
                    return None  # all done: no unit can come back from a failing group any more
                self._cv.wait(timeout=1.0)

    def done(self, unit: _Unit, group: int, outcome: SampleOutcome) -> None:
        with self._cv:
            self.results[unit.start] = outcome.latent
            self.outcomes[unit.start] = outcome
            self.items[group] = self.items.get(group, 0) + unit.stop - unit.start
            self._running -= 1
            self._cv.notify_all()

    def give_back(self, unit: _Unit, group: int) -> None:
        with self._cv:
            self.failed.add(group)
            self.units.appendleft(unit)
            self._running -= 1
            # Units cut for this group alone go to anyone now.
            self.units = deque(dataclasses.replace(u, group=None) if u.group == group else u for u in self.units)
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cv:
            if self.error is None:
                self.error = error
            self._running -= 1
            self._cv.notify_all()

    def pending(self) -> bool:
        return bool(self.units)


def _unsplittable(req: SampleRequest) -> str | None:
    """Why this batch must stay on one group (conditioning with its own batch dimension), or None."""
    for name, conds in (("positive", req.positive), ("negative", req.negative)):
        for entry in conds or ():
            tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
            if getattr(tensor, "ndim", 0) and tensor.shape[0] > 1:
                return f"the {name} conditioning has a batch of {tensor.shape[0]}"
    return None


_registry_lock = threading.Lock()


def dispatcher_for(engine: Engine, spec: DispatcherSpec) -> GroupDispatcher:
    """The engine's dispatcher for this spec's groups and policy (kept, so the policy keeps learning)."""
    key = (spec.load, spec.devices, spec.group_size, spec.group_weights, spec.scheduling, spec.ray_address)
    with _registry_lock:
        if key not in engine.dispatchers:
            engine.dispatchers[key] = GroupDispatcher(engine, spec)
        return engine.dispatchers[key]
