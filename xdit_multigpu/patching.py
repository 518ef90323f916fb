"""The only place where this pack replaces an attribute of a ComfyUI (or torch) object.

Every patch is keyed, idempotent (installing twice is a no-op) and reversible (``remove``), and the
upstream symbol it relies on is pinned by a test in ``tests/comfy/test_host_pins.py``, so a ComfyUI
update that moves it fails CI instead of silently disabling the behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_lock = threading.Lock()


@dataclass
class _Installed:
    owner: Any
    attr: str
    original: Any


_INSTALLED: dict[str, _Installed] = {}


def install(key: str, owner: Any, attr: str, make: Callable[[Any], Any]) -> bool:
    """Replace ``owner.attr`` with ``make(original)`` under ``key``. Returns False if already installed."""
    with _lock:
        if key in _INSTALLED:
            return False
        original = getattr(owner, attr)
        setattr(owner, attr, make(original))
        _INSTALLED[key] = _Installed(owner, attr, original)
        return True


def remove(key: str) -> bool:
    """Restore what ``install(key, ...)`` replaced. Returns False if nothing was installed."""
    with _lock:
        inst = _INSTALLED.pop(key, None)
        if inst is None:
            return False
        setattr(inst.owner, inst.attr, inst.original)
        return True


def installed(key: str) -> bool:
    return key in _INSTALLED


@contextlib.contextmanager
def temporarily(key: str, owner: Any, attr: str, value: Any) -> Iterator[None]:
    """``owner.attr = value`` for the duration of a ``with`` block (e.g. one import), then restored."""
    install(key, owner, attr, lambda _original: value)
    try:
        yield
    finally:
        remove(key)


@contextlib.contextmanager
def swapped(owner: Any, attr: str, value: Any) -> Iterator[Any]:
    """``owner.attr = value`` for the duration of a with-block, restored on exit (also on error); yields
    the original. For a short host call on the thread that runs the prompt (ComfyUI runs one node at a
    time); not for state other threads read concurrently."""
    original = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield original
    finally:
        setattr(owner, attr, original)


FREE_HOOK = "xdit.prompt_queue.set_flag"
FREE_FLAGS = frozenset({"unload_models", "free_memory"})


def install_free_hook(on_free: Callable[[], None]) -> bool:
    """Call ``on_free`` when ComfyUI's ``POST /free`` asks to unload models or free memory.

    ``/free`` sets a flag on ``execution.PromptQueue`` (``set_flag("unload_models" | "free_memory", True)``)
    that the prompt worker honours after the running prompt; we observe the same call. Patching the
    flag setter (not ``unload_all_models``) keeps the pool alive when ComfyUI unloads models for its own
    reasons (an OOM, ``--disable-smart-memory``).
    """
    import execution

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def set_flag(self: Any, name: str, data: Any) -> Any:
            result = original(self, name, data)
            if name in FREE_FLAGS and data:
                on_free()
            return result

        return set_flag

    return install(FREE_HOOK, execution.PromptQueue, "set_flag", make)
