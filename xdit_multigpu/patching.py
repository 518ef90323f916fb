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


BATCH_NOISE_KEYS = ("xdit.k_diffusion.default_noise_sampler", "xdit.k_diffusion.BrownianTreeNoiseSampler")


@contextlib.contextmanager
def batch_slice_noise(start: int, stop: int, total: int) -> Iterator[None]:
    """While sampling items ``[start, stop)`` of a ``total``-item batch, make ComfyUI's per-step noise
    (ancestral / SDE samplers) the rows ``[start, stop)`` of the noise the whole batch would get.

    ``comfy.k_diffusion.sampling`` builds each sampler's noise source from ``x`` and the seed:
    ``default_noise_sampler(x, seed)`` (one generator over ``x.size()``) and
    ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, ...)`` (one Brownian tree over ``x``'s shape).
    Both draw for the whole batch at once, so a group sampling a slice of the batch would draw different
    noise than the one-device run. Here both are built for the full batch shape and sliced. Only for a
    worker process (one sampling call at a time); restored on exit.
    """
    import comfy.k_diffusion.sampling as kds  # noqa: PLC0415
    import torch  # noqa: PLC0415

    def full(x: Any) -> Any:
        if x.shape[0] != stop - start:
            raise ValueError(f"batch slice [{start}, {stop}) of {total} does not match a batch of {x.shape[0]}")
        return torch.zeros((total, *x.shape[1:]), dtype=x.dtype, layout=x.layout, device=x.device)

    def make_default(original: Callable[..., Any]) -> Callable[..., Any]:
        def default_noise_sampler(x: Any, seed: Any = None) -> Callable[[Any, Any], Any]:
            whole = original(full(x), seed=seed)
            return lambda sigma, sigma_next: whole(sigma, sigma_next)[start:stop]

        return default_noise_sampler

    def make_tree(original: type) -> type:
        class SlicedBrownianTreeNoiseSampler(original):  # type: ignore[misc, valid-type]
            def __init__(self, x: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(full(x), *args, **kwargs)

            def __call__(self, sigma: Any, sigma_next: Any) -> Any:
                return super().__call__(sigma, sigma_next)[start:stop]

        return SlicedBrownianTreeNoiseSampler

    install(BATCH_NOISE_KEYS[0], kds, "default_noise_sampler", make_default)
    install(BATCH_NOISE_KEYS[1], kds, "BrownianTreeNoiseSampler", make_tree)
    try:
        yield
    finally:
        for key in BATCH_NOISE_KEYS:
            remove(key)


BUILD_ON_DEVICE = "xdit.model_detection.model_config_from_unet"


@contextlib.contextmanager
def build_on_device(device: Any) -> Iterator[None]:
    """While ComfyUI's ``load_diffusion_model_state_dict`` runs, build the diffusion model on ``device``.

    That loader calls ``model_config.get_model(sd, "")``, i.e. builds the model on the CPU, then moves it
    to ``unet_offload_device()``: for a resident worker (HIGH_VRAM) the GPU, so a Flux.1-dev copies 24 GB
    of uninitialised CPU memory to the GPU before the weights are loaded. ComfyUI's checkpoint loader
    already passes ``device=`` here (``load_state_dict_guess_config``: ``get_model(..., device=
    inital_load_device)``). This makes the configs returned by ``model_detection.model_config_from_unet``
    build with ``device`` unless the caller names one: the model's own modules get ``device=`` as in the
    checkpoint path; its ``model_sampling`` is built on the CPU and moved, as in both stock paths. Only for a
    worker whose weights are already on ``device`` (the prefetch); restored on exit.
    """
    import comfy.model_detection as md  # noqa: PLC0415

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def model_config_from_unet(*args: Any, **kwargs: Any) -> Any:
            config = original(*args, **kwargs)
            if config is not None:
                config.get_model = functools.partial(config.get_model, device=device)
            return config

        return model_config_from_unet

    fresh = install(BUILD_ON_DEVICE, md, "model_config_from_unet", make)
    try:
        yield
    finally:
        if fresh:
            remove(BUILD_ON_DEVICE)
