"""What a MODEL carries beyond the file the workers load, as a frozen picklable ``ModelDelta``.

Workers load the plain model file; nodes between the loader and the KSampler (LoraLoader,
ModelSampling*, RescaleCFG, ...) modify a *clone* of the host's ModelPatcher. ``describe_model`` turns
those modifications into a ``ModelDelta`` and ``DeltaCache.patcher_for`` (worker side) replays them on
a clone of the worker's own base patcher through ComfyUI's own API, so ComfyUI's patching code does the
weight math in every process.

Carried exactly:

* **weight patches** (``patcher.patches``: LoRA / LoHa / LoKr / OFT adapters, ``diff``/``set`` patches,
  merges): every ``(strength_patch, value, strength_model, offset, function)`` tuple, replayed with
  ``add_patches`` in the same per-key order; tensors travel next to the pickle (see ``travel``),
  keyed by ComfyUI's own ``patches_uuid``, and only when the pool does not hold that key yet;
* **object patches** (``add_object_patch``: ``model_sampling``, ``manual_cast_dtype``, ...);
* **model_options** with every entry, ``transformer_options`` included, and ``force_cast_weights``.

Values travel under ``travel``'s strict rules (callables by importable name or as nested-function /
body-less local-class recipes). Not carried, so the KSampler falls back to one device and names them:
anything failing those rules, and patcher state that has no replay yet (wrappers, callbacks, hooks,
weight wrappers, injections, attachments, additional models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .travel import CannotTravel, Packed, pack, unpack

# (strength_patch, value, strength_model, offset, function) per ComfyUI's ModelPatcher.add_patches
PatchTuple = tuple[float, Any, float, Any, Any]


@dataclass(frozen=True)
class ModelDelta:
    """The MODEL's modifications relative to the loaded file (see the module docstring).

    ``weights`` is None when the workers already hold ``weights_key`` (the engine strips it).
    """

    weights_key: str  # "" when there is no weight patch
    options_key: str  # content hash of ``options``
    options: Packed  # {"object_patches": {...}, "model_options": {...}, "force_cast_weights": bool}
    weights: Packed | None = None  # {key: [PatchTuple, ...]}
    summary: str = ""

    @property
    def key(self) -> str:
        return f"{self.weights_key}|{self.options_key}"

    def without_weights(self) -> ModelDelta:
        return ModelDelta(self.weights_key, self.options_key, self.options, None, self.summary)


@dataclass(frozen=True)
class DeltaDescription:
    """``delta`` is None for an unmodified MODEL; ``problems`` name what cannot travel (fall back)."""

    delta: ModelDelta | None
    problems: tuple[str, ...] = field(default_factory=tuple)


def _unsupported_state(patcher: Any) -> list[str]:
    """Patcher state that is not replayed in workers (yet), named entry by entry."""
    found = []
    for attr in ("wrappers", "callbacks"):
        for kind, by_key in (getattr(patcher, attr, None) or {}).items():
            found += [f"{attr}['{kind}']['{k}'] (not replicated in workers yet)" for k, v in by_key.items() if v]
    for attr in ("hook_patches", "weight_wrapper_patches", "injections", "attachments", "additional_models"):
        if getattr(patcher, attr, None):
            keys = ", ".join(sorted(map(str, getattr(patcher, attr))))
            found.append(f"{attr} ({keys}) (not replicated in workers yet)")
    if getattr(patcher, "current_hooks", None) is not None or getattr(patcher, "forced_hooks", None) is not None:
        found.append("hooks (not replicated in workers yet)")
    return found


def _pack_named(value: Any, name: str, problems: list[str]) -> Any:
    """Check ``value`` travels; on failure add ``name: why`` to ``problems`` and return None."""
    try:
        pack(value)
        return value
    except CannotTravel as e:
        problems.append(f"{name}: {e}")
        return None


def _options_entries(patcher: Any, problems: list[str]) -> dict[str, Any]:
    """Object patches and model_options, each entry checked separately so a failure names it."""
    obj = {k: _pack_named(v, f"object patch '{k}'", problems) for k, v in patcher.object_patches.items()}
    opts: dict[str, Any] = {}
    for k, v in patcher.model_options.items():
        if k == "transformer_options" and isinstance(v, dict):
            to = {}
            for tk, tv in v.items():
                if tk in ("patches", "patches_replace") and isinstance(tv, dict):
                    to[tk] = {n: _pack_named(p, f"model_options['transformer_options']['{tk}']['{n}']", problems)
                              for n, p in tv.items()}
                else:
                    to[tk] = _pack_named(tv, f"model_options['transformer_options']['{tk}']", problems)
            opts[k] = to
        else:
            opts[k] = _pack_named(v, f"model_options['{k}']", problems)
    return {"object_patches": obj, "model_options": opts,
            "force_cast_weights": bool(getattr(patcher, "force_cast_weights", False))}


def _pack_weights(patches: dict[str, list[PatchTuple]], problems: list[str]) -> Packed | None:
    try:
        return pack(patches)
    except CannotTravel:
        for key, plist in patches.items():  # name the first weight key that cannot travel
            try:
                pack(plist)
            except CannotTravel as e:
                problems.append(f"weight patch of '{key}': {e}")
                return None
        raise


def _summary(patcher: Any) -> str:
    parts = []
    if patcher.patches:
        parts.append(f"{len(patcher.patches)} weight patch(es)")
    parts += [f"object patch {k}" for k in sorted(patcher.object_patches)]
    opts = patcher.model_options
    parts += [f"model_options[{k}]" for k in sorted(opts) if k != "transformer_options"]
    parts += [f"transformer_options[{k}]" for k in sorted(opts.get("transformer_options") or {})]
    return ", ".join(parts)


def _unmodified(entries: dict[str, Any]) -> bool:
    """No object patch, no cast flag and no non-empty model_options / transformer_options entry."""
    opts = entries["model_options"]
    return not (entries["object_patches"] or entries["force_cast_weights"]
                or any(v for k, v in opts.items() if k != "transformer_options")
                or any((opts.get("transformer_options") or {}).values()))


def describe_model(patcher: Any) -> DeltaDescription:
    """The delta of ``patcher`` (a ModelPatcher from an xDiT loader, maybe modified by other nodes).

    Cheap: tensors are referenced, not copied or hashed, except those inside object patches and
    model_options (hashed for ``options_key``; they are small, e.g. ``model_sampling``'s sigmas).
    """
    problems = _unsupported_state(patcher)
    entries = _options_entries(patcher, problems)
    weights = _pack_weights(dict(patcher.patches), problems) if patcher.patches else None
    if problems:
        return DeltaDescription(None, tuple(problems))
    if not patcher.patches and _unmodified(entries):
        return DeltaDescription(None)
    options = pack(entries)
    weights_key = f"{patcher.patches_uuid}:{sum(len(v) for v in patcher.patches.values())}" if weights else ""
    return DeltaDescription(ModelDelta(weights_key, options.digest(), options, weights, _summary(patcher)))


def apply_delta(base: Any, weights: dict[str, list[PatchTuple]] | None, options: dict[str, Any]) -> Any:
    """A clone of ``base`` with the weight patches, object patches and model_options replayed.

    Weight patches go through ``add_patches`` grouped by (position in the key's list, strengths), in
    position order, so each key's patch list ends up in the host's order.
    """
    patcher = base.clone()
    groups: dict[tuple[int, float, float], dict[Any, Any]] = {}
    for key, plist in (weights or {}).items():
        for i, (strength, value, strength_model, offset, function) in enumerate(plist):
            k = key if offset is None and function is None else (key, offset, function)
            groups.setdefault((i, strength, strength_model), {})[k] = value
    expected = sum(len(v) for v in (weights or {}).values())
    for (_, strength, strength_model), patches in sorted(groups.items(), key=lambda g: g[0][0]):
        patcher.add_patches(patches, strength, strength_model)
    got = sum(len(v) for v in patcher.patches.values())
    if got != expected:
        raise ValueError(f"model delta: {expected} weight patch(es) sent but {got} applied; the worker's model "
                         "file differs from the host's")
    for name, obj in options["object_patches"].items():
        patcher.add_object_patch(name, obj)
    patcher.model_options = dict(options["model_options"])
    patcher.model_options.setdefault("transformer_options", {})
    patcher.force_cast_weights = options["force_cast_weights"]
    return patcher


class DeltaCache:
    """Worker side: the base patcher with the last delta applied, rebuilt only when its key changes.

    Keeps the last non-empty weight patches (by ``weights_key``, also across requests without weight
    patches) so a request whose weights the pool already sent can omit them; the patched clone keeps
    its ``patches_uuid`` between requests, so ComfyUI does not re-patch the weights.
    """

    def __init__(self) -> None:
        self._weights: tuple[str, dict[str, list[PatchTuple]] | None] = ("", None)
        self._patched: tuple[str, Any] | None = None

    def patcher_for(self, base: Any, delta: ModelDelta | None) -> Any:
        if delta is None:
            return base
        if self._patched is not None and self._patched[0] == delta.key:
            return self._patched[1]
        self._patched = None  # drop the old clone (and its patch tensors) before building the new one
        if delta.weights_key and delta.weights_key != self._weights[0]:
            if delta.weights is None:
                raise RuntimeError(f"model delta: weights {delta.weights_key!r} were not sent and this worker does "
                                   f"not hold them (it holds {self._weights[0]!r})")
            self._weights = ("", None)
            self._weights = (delta.weights_key, unpack(delta.weights))
        weights = self._weights[1] if delta.weights_key else None
        patched = apply_delta(base, weights, unpack(delta.options))
        self._patched = (delta.key, patched)
        return patched

    @property
    def weights_key(self) -> str:
        return self._weights[0]

    def clear(self) -> None:
        self._weights = ("", None)
        self._patched = None
