"""Model families, one ``ModelSpec`` each. Importing this package registers them all (no ComfyUI import)."""

from . import families  # noqa: F401  (registers the specs)
from .registry import Axis, ModelSpec, all_specs, lookup, lookup_config, register

__all__ = ["Axis", "ModelSpec", "all_specs", "lookup", "lookup_config", "register"]
