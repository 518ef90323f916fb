"""Installing callables on a (cloned) ModelPatcher through ComfyUI's extension points, chaining any
patch another node already put in the same slot instead of silently replacing it.

Only closures are installed: ``ModelPatcher.clone`` deep-copies ``model_options``, which keeps
functions as they are but would copy a bound method's instance (process groups included).
"""

from __future__ import annotations

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
