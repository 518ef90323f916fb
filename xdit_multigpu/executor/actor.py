"""``RayWorkerWrapper``: the body of every rank's Ray actor (``RayExecutor`` spawns one per device).

It builds the project's ``Worker`` lazily (after Ray has set ``CUDA_VISIBLE_DEVICES``) and runs named
worker methods for the driver: results leave as out-of-band buffers (``transport``), request tensors the
rank already holds are looked up (``kept``), and rank 0's progress goes to the driver's sink
(``progress``).
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
from typing import Any

from . import kept
from .progress import SinkReporter
from .transport import pack


def _resolve(worker_cls: str | type) -> type:
    """A worker class, or its qualified name imported."""
    if isinstance(worker_cls, type):
        return worker_cls
    module, _, name = worker_cls.rpartition(".")
    return getattr(importlib.import_module(module), name)


class RayWorkerWrapper:
    """The actor body: builds the worker lazily, i.e. after Ray has set ``CUDA_VISIBLE_DEVICES``."""

    def __init__(self, worker_cls: str | type) -> None:
        self._worker_cls = worker_cls
        self._worker: Any = None

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (sent once at start; also proves the process is up)."""
        import ray  # noqa: PLC0415

        return {
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def free_port(self, host: str) -> int:
        """A free TCP port on ``host`` for the torch.distributed rendezvous (rank 0 only)."""
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def rendezvous_file(self) -> str:
        """A fresh path for torch's FileStore in a private (0700) directory on this node (rank 0 only)."""
        return os.path.join(tempfile.mkdtemp(prefix="xdit_pg_"), "store")

    def execute(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The worker's ``method(*args, **kwargs)``; its result is ``pack``-ed (rank 0's latent travels
        back as an out-of-band buffer, see ``transport``) and arrives as plain tensors at the driver."""
        kept.end_of_args()  # the arguments are unpickled: keep exactly the request tensors they named
        if self._worker is None:
            self._worker = _resolve(self._worker_cls)()
        return pack(getattr(self._worker, method)(*args, **kwargs))

    def execute_reporting(self, sink: Any, preview_interval_s: float | None, call: int, method: str, *args: Any,
                          **kwargs: Any) -> tuple[Any, list[Any]]:
        """``execute`` with a ``progress`` reporter that sends to ``sink`` (fire-and-forget, ordered).

        Returns ``(result, log)``: ``log`` lists every report of this call (``progress.SinkReporter``),
        so the driver needs no drain after the result; rank 0 waits for a report to land only when it
        carried a preview (``settle``).
        """
        reporter = SinkReporter(sink, preview_interval_s, call)
        out = self.execute(method, *args, progress=reporter, **kwargs)
        reporter.settle()
        return out, reporter.log
