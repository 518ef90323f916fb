"""Typed errors. Every user-facing error names the field it is about and says how to fix it."""

from __future__ import annotations


class XDiTError(Exception):
    """Base class of every error this pack raises on purpose."""


class ConfigError(XDiTError, ValueError):
    """A node input is invalid. Raised at the boundary, before any worker starts.

    The message always reads ``"<field>: <what is wrong>. <how to fix it>"`` so that ComfyUI's node
    error shows the user which widget to change.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. {fix}")


class UnsupportedModelError(ConfigError):
    """The model (or the requested strategy for it) is not supported."""


class WorkerError(XDiTError, RuntimeError):
    """A worker failed, died or timed out; the engine falls back to one device and rebuilds the pool."""


class WorkerTimeout(WorkerError, TimeoutError):
    """A remote call or collective exceeded its time bound."""


class NotYetAvailableError(ConfigError):
    """A strategy that is part of the product but not built yet (PipeFusion, Tensor)."""
