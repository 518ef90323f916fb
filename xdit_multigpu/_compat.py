"""Small shims for the Python versions ComfyUI users run (3.10+)."""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """``enum.StrEnum`` (3.11+) for 3.10: members are their string values."""

    def __str__(self) -> str:
        return str(self.value)
