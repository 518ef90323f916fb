"""Installing callables on a (cloned) ModelPatcher through ComfyUI's extension points, chaining any
patch another node already put in the same slot instead of silently replacing it.

Only closures are installed: ``ModelPatcher.clone`` deep-copies ``model_options``, which keeps
functions as they are but would copy a bound method's instance (process groups included).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

OVERRIDE_KEY = "optimized_attention_override"

BlockArgs = dict[str, Any]
RunBlock = Callable[[BlockArgs], BlockArgs]


def transformer_options_of(patcher: Any) -> dict[str, Any]:
    return patcher.model_options.setdefault("transformer_options", {})


def install_attention_override(patcher: Any, override: Callable[..., Any]) -> None:
    """Set ``transformer_options["optimized_attention_override"]``; an existing override becomes the
    "host" function our override calls for local work (so e.g. a Sage/Flash override keeps working)."""
    to = transformer_options_of(patcher)
    prev = to.get(OVERRIDE_KEY)
    if prev is None:
        to[OVERRIDE_KEY] = override
        return

    def chained(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def host(*a: Any, **kw: Any) -> Any:
            return prev(func, *a, **kw)

        return override(host, *args, **kwargs)

    to[OVERRIDE_KEY] = chained


def replace_block(patcher: Any, block_name: str, index: int, fn: Callable[[BlockArgs, RunBlock], BlockArgs]) -> None:
    """Install ``fn(args, run_block) -> out`` as the ``"dit"`` replace patch of ``(block_name, index)``.

    ``run_block(args)`` runs whatever ran there before: an existing replace patch, else the original
    block.
    """
    existing = transformer_options_of(patcher).get("patches_replace", {}).get("dit", {})
    prev = existing.get((block_name, index))

    def patch(args: BlockArgs, extra: dict[str, Any]) -> BlockArgs:
        def run_block(a: BlockArgs) -> BlockArgs:
            return prev(a, extra) if prev is not None else extra["original_block"](a)

        return fn(args, run_block)

    patcher.set_model_patch_replace(patch, "dit", block_name, index)


def patch_method(patcher: Any, module_path: str, fn: Callable[..., Any], method: str = "forward") -> None:
    """Object-patch ``<module_path>.<method>`` of ``patcher.model`` with ``fn(module, original, *args, **kw)``.

    For models whose forward passes no ``transformer_options`` (so neither the attention override nor a
    block replace reaches them). Installed through ComfyUI's ``ModelPatcher.add_object_patch`` as a
    method bound to the module: ``patch_model`` sets it as an instance attribute and ``unpatch_model``
    restores the original, the module's parameters (and so the state-dict keys that LoRA and weight
    patches target) stay as they are. ``original`` is an object patch already in the slot, else the
    class's own method bound to the module (never the instance attribute, which may be ours).
    ``object_patches`` is copied shallowly by ``clone`` (unlike ``model_options``), so binding the
    module is safe; ``fn`` itself should be a closure holding no per-call state.
    """
    key = f"{module_path}.{method}"
    module = patcher.model.get_submodule(module_path)
    prev = patcher.object_patches.get(key)
    original = prev if prev is not None else getattr(type(module), method).__get__(module)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, original, *args, **kwargs)

    patcher.add_object_patch(key, types.MethodType(patched, module))
