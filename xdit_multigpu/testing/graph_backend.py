"""A CPU stand-in for ``torch.cuda.graph`` (tests): proves the graph wrapper's input / output plumbing.

``capture(fn)`` runs ``fn`` once on the wrapper's captured input tensors and keeps it; ``replay()`` runs it
again on those same tensors and writes the result into the captured output, as a CUDA graph replay
writes into its static output. A wrapper that forgot to copy a call's values into the captured inputs
would replay stale values and the comparison with eager sampling would fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _ReplayGraph:
    def __init__(self, fn: Callable[[], Any], out: Any) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class ReplayBackend:
    """``GraphedApplyModel``'s backend protocol (``device_type``, ``capture``) on CPU tensors."""

    device_type = "cpu"

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, fn: Callable[[], Any]) -> tuple[_ReplayGraph, Any]:
        self.captures += 1
        out = fn()
        return _ReplayGraph(fn, out), out
