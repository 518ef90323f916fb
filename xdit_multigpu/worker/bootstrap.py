"""Make a ComfyUI tree importable as a library in a process that did not start through ``main.py``.

Used by Ray workers (which import ComfyUI from the same root as the ComfyUI process that started them)
and by the test suite. ComfyUI reads its CLI flags at import time, so they are set before
``comfy.model_management`` is imported.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

# Flags that describe the ComfyUI process's own devices; a worker chooses its device itself.
_DEVICE_FLAGS = frozenset({"cpu", "cuda_device", "default_device", "directml", "oneapi_device_selector"})


def import_comfy(comfy_root: str, *, cpu: bool, cli_args: Mapping[str, Any] | None = None) -> None:
    """Put ``comfy_root`` on ``sys.path`` and set ComfyUI's CLI flags before its first import.

    ``cli_args`` are the host's parsed flags (``vars(comfy.cli_args.args)``) so that a worker computes
    with the same precision / attention options as the host; device flags are not copied.
    Idempotent; it must run before anything imports ``comfy.model_management``.
    """
    root = os.path.abspath(comfy_root)
    # First on sys.path: ComfyUI's nodes.py appends <root>/comfy, and a process spawned from one that
    # imported it inherits that path, where a bare ``utils`` would be comfy/utils.py.
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    from comfy.cli_args import args  # noqa: PLC0415  (ComfyUI's argparse defaults; sys.argv is ignored)

    apply_cli_args(args, cli_args)
    args.cpu = cpu
    if "comfy.model_management" in sys.modules and cpu:
        # Too late to change the device choice; the caller imported ComfyUI before bootstrapping.
        import comfy.model_management as mm  # noqa: PLC0415

        if mm.get_torch_device().type != "cpu":
            raise RuntimeError("comfy.model_management was imported before import_comfy(cpu=True)")
    # ComfyUI's nodes.py puts .../comfy on sys.path, after which a bare ``import utils`` finds
    # comfy/utils.py; main.py imports utils.extra_config first to bind the real ``utils`` package.
    importlib.import_module("utils.extra_config")


def apply_cli_args(args: Any, cli_args: Mapping[str, Any] | None) -> None:
    """Set ``cli_args`` on ComfyUI's flag namespace ``args``: every flag it has, except device flags
    (a worker chooses its device itself). Must run before ``comfy.model_management`` is imported."""
    for key, value in (cli_args or {}).items():
        if key not in _DEVICE_FLAGS and hasattr(args, key):
            setattr(args, key, value)


def host_cli_args() -> dict[str, Any]:
    """The running ComfyUI's parsed CLI flags, to forward to workers."""
    from comfy.cli_args import args  # noqa: PLC0415

    return dict(vars(args))
