"""Scheduling policies: which GPU group gets the next work unit, and how a batch is split over groups.

Pure and deterministic (no Ray, no torch), so each policy is unit-tested with exact expectations. The
engine owns the groups and reports to the policy: ``started`` / ``finished`` for in-flight counts and
measured throughput (work items per second). A policy never sees tensors.

- ``round_robin``: groups in turn, regardless of load or speed.
- ``least_loaded``: the group with the fewest work items in flight (ties: lowest index).
- ``weighted_round_robin``: smooth weighted round robin (nginx's algorithm) over user weights, or over
  measured throughput when no weights are given; batches split in proportion to the weights.
- ``adaptive``: a running estimate (EWMA) of each group's throughput; picks the group that would finish a
  new item first (in-flight + 1) / speed, and splits batches in proportion to the estimated speeds.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from ..config import SchedulingStrategy


def proportional_split(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` items into ``len(weights)`` integer shares proportional to ``weights``.

    Largest-remainder method: shares sum to ``total`` exactly; ties go to the lower index. Weights must
    be non-negative with a positive sum.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    shares = [int(e) for e in exact]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


class Policy(abc.ABC):
    """Chooses groups. ``n_groups`` is fixed for the policy's lifetime (a new pool set, a new policy)."""

    def __init__(self, n_groups: int) -> None:
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups
        self.in_flight = [0] * n_groups

    @abc.abstractmethod
    def pick(self, available: Sequence[bool] | None = None) -> int:
        """Group index for the next single work unit, among the ``available`` ones (default: all)."""

    def weights(self) -> list[float]:
        """Relative share of a batch per group; default: equal."""
        return [1.0] * self.n_groups

    def cuts_up_front(self) -> bool:
        """True: a batch is cut into one slice per group (``split``); False: it is handed out one item at
        a time to whichever group is free."""
        return True

    def split(self, batch: int, available: Sequence[bool] | None = None) -> list[int]:
        """Items of a batch per group (sums to ``batch``; 0 for groups that are not ``available``)."""
        ok = self._available(available)
        return proportional_split(batch, [w if a else 0.0 for w, a in zip(self.weights(), ok)])

    def _available(self, available: Sequence[bool] | None) -> list[bool]:
        ok = [True] * self.n_groups if available is None else list(available)
        if len(ok) != self.n_groups or not any(ok):
            raise ValueError(f"need {self.n_groups} availability flags with at least one True, got {ok}")
        return ok

    def started(self, group: int, items: int = 1) -> None:
        self.in_flight[group] += items

    def finished(self, group: int, items: int, seconds: float) -> None:
        self.in_flight[group] = max(0, self.in_flight[group] - items)

    def describe(self, shares: Sequence[int]) -> str:
        return ", ".join(f"group {i}: {n}" for i, n in enumerate(shares))


class RoundRobin(Policy):
    def __init__(self, n_groups: int) -> None:
        super().__init__(n_groups)
        self._next = 0

    def pick(self, available: Sequence[bool] | None = None) -> int:
        ok = self._available(available)
        while not ok[self._next]:  # a group that is down loses its turn
            self._next = (self._next + 1) % self.n_groups
        g = self._next
        self._next = (self._next + 1) % self.n_groups
        return g


class LeastLoaded(Policy):
    def cuts_up_front(self) -> bool:
        return False  # in-flight work decides, item by item

    def pick(self, available: Sequence[bool] | None = None) -> int:
        ok = self._available(available)
        return min((i for i in range(self.n_groups) if ok[i]), key=lambda i: (self.in_flight[i], i))


class _Throughput:
    """EWMA of items / second per group; ``None`` until a group has finished something."""

    def __init__(self, n_groups: int, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.rate: list[float | None] = [None] * n_groups

    def update(self, group: int, items: int, seconds: float) -> None:
        if items <= 0 or seconds <= 0:
            return
        r = items / seconds
        old = self.rate[group]
        self.rate[group] = r if old is None else (1 - self.alpha) * old + self.alpha * r

    def measured(self) -> bool:
        """Every group has finished something."""
        return all(r is not None for r in self.rate)

    def known(self) -> list[float]:
        """Rates with unmeasured groups at the mean of the measured ones (1.0 when none is measured)."""
        seen = [r for r in self.rate if r is not None]
        default = sum(seen) / len(seen) if seen else 1.0
        return [default if r is None else r for r in self.rate]


class WeightedRoundRobin(Policy):
    """Smooth weighted round robin: over a cycle, group i is picked weight_i / sum(weights) of the time."""

    def __init__(self, n_groups: int, weights: Sequence[float] | None = None, alpha: float = 0.3) -> None:
        super().__init__(n_groups)
        if weights is not None and (len(weights) != n_groups or any(w <= 0 for w in weights)):
            raise ValueError(f"weights must be {n_groups} positive numbers, got {list(weights)}")
        self.fixed = list(weights) if weights is not None else None
        self.speed = _Throughput(n_groups, alpha)
        self._current = [0.0] * n_groups

    def weights(self) -> list[float]:
        return list(self.fixed) if self.fixed is not None else self.speed.known()

    def pick(self, available: Sequence[bool] | None = None) -> int:
        ok = self._available(available)
        w = [x if a else 0.0 for x, a in zip(self.weights(), ok)]
        for i in range(self.n_groups):
            self._current[i] += w[i]
        g = max((i for i in range(self.n_groups) if ok[i]), key=lambda i: (self._current[i], -i))
        self._current[g] -= sum(w)
        return g

    def finished(self, group: int, items: int, seconds: float) -> None:
        super().finished(group, items, seconds)
        self.speed.update(group, items, seconds)


class Adaptive(Policy):
    """Learns each group's throughput; sends work where it would finish first."""

    def __init__(self, n_groups: int, alpha: float = 0.3) -> None:
        super().__init__(n_groups)
        self.speed = _Throughput(n_groups, alpha)

    def pick(self, available: Sequence[bool] | None = None) -> int:
        ok = self._available(available)
        rates = self.speed.known()
        return min((i for i in range(self.n_groups) if ok[i]), key=lambda i: ((self.in_flight[i] + 1) / rates[i], i))

    def weights(self) -> list[float]:
        return self.speed.known()

    def cuts_up_front(self) -> bool:
        return self.speed.measured()  # item by item while learning

    def finished(self, group: int, items: int, seconds: float) -> None:
        super().finished(group, items, seconds)
        self.speed.update(group, items, seconds)


def make_policy(strategy: SchedulingStrategy, n_groups: int, weights: Sequence[float] | None = None) -> Policy:
    """The policy object for a ``scheduling_strategy`` input."""
    if strategy is SchedulingStrategy.ROUND_ROBIN:
        return RoundRobin(n_groups)
    if strategy is SchedulingStrategy.LEAST_LOADED:
        return LeastLoaded(n_groups)
    if strategy is SchedulingStrategy.WEIGHTED_ROUND_ROBIN:
        return WeightedRoundRobin(n_groups, weights)
    return Adaptive(n_groups)
