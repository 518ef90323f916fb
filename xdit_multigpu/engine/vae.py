"""``Load VAE (xDiT)``'s parallel VAE: ComfyUI's own VAE whose 2-D tiled decode / encode spreads the tiles
over several devices.

``XDiTVAE`` subclasses ``comfy.sd.VAE`` and overrides only ``decode_tiled_`` / ``encode_tiled_`` (the 2-D
tilers that ``decode_tiled`` / ``encode_tiled`` and the stock VAE's out-of-memory fallback call) and, for
large images, ``decode`` / ``encode``. The tiler itself stays ComfyUI's: it runs twice through
``parallel.tiles.run_tiled`` with ``first_stage_model`` swapped (on this instance, restored after) for
an object whose ``decode`` / ``encode`` records the tile and then replays the outputs computed on the
devices. Each device slot runs ``first_stage_model`` itself (the slot on the VAE's own device, as
ComfyUI's model management loaded it) or a plain copy of it moved to that device (made once, on first
use, dropped on ``/free``), with the tile exactly as the host prepared it (dtype, ``process_input``).
So the result equals ComfyUI's tiled decode / encode with the same tile settings, bit for bit on devices
of one type (tested on CPU slots; on GPUs it is equal up to kernel nondeterminism across cards).

Imports ComfyUI and torch: import this module lazily (from a node's function), never at package import.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch

from .. import patching
from ..config import VAEBlend, VAEParallelConfig
from ..parallel.tiles import TileShapeError, TileStats, run_tiled

log = logging.getLogger("xdit_multigpu")

_LIVE: weakref.WeakSet[XDiTVAE] = weakref.WeakSet()  # for /free; guarded: /free runs on another thread
_LIVE_LOCK = threading.Lock()


def _track(vae: XDiTVAE) -> None:
    with _LIVE_LOCK:
        _LIVE.add(vae)


class _TileModel:
    """Stands in for ``first_stage_model`` inside ComfyUI's tiler: ``decode`` / ``encode`` is ``fn``."""

    def __init__(self, method: str, fn: Callable[[Any], Any]) -> None:
        setattr(self, method, fn)


class _Replicas:
    """Copies of ``first_stage_model`` on the other device slots, made once and dropped on ``/free``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_slot: dict[int, torch.nn.Module] = {}

    def get(self, slot: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        with self._lock:
            if slot not in self._by_slot:
                self._by_slot[slot] = make()
            return self._by_slot[slot]

    def release(self) -> list[torch.device]:
        with self._lock:
            devices = [next(m.parameters()).device for m in self._by_slot.values() if any(True for _ in m.parameters())]
            self._by_slot.clear()
        return devices


def _device(text: str) -> torch.device:
    dev = torch.device(text)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _empty_cache(devices: list[torch.device]) -> None:
    """Give cached blocks back on the helper GPUs: the sampling workers share them."""
    for dev in {d for d in devices if d.type == "cuda"}:
        with torch.cuda.device(dev):
            torch.cuda.empty_cache()


def release_replicas() -> None:
    """Drop every parallel VAE's device copies (``/free`` and exit; the VAE itself stays usable)."""
    freed: list[torch.device] = []
    with _LIVE_LOCK:
        live = list(_LIVE)
    for vae in live:
        freed += vae._xdit_replicas.release()
    _empty_cache(freed)


def _runner(module: torch.nn.Module, method: str, device: torch.device, output_device: Any) -> Callable[[Any], Any]:
    """One device slot: the host's per-tile call on ``device``; the output goes to ComfyUI's output device.

    Grad mode is per thread, so inference mode is set here as ComfyUI sets it for the prompt thread.
    """
    call = getattr(module, method)

    def run(tile: torch.Tensor) -> torch.Tensor:
        guard = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        with torch.inference_mode(), guard:
            return call(tile.to(device)).to(output_device)

    return run


def _scaled(amount: Any, dim: int, val: int) -> int:
    """``tiled_scale_multidim``'s output size of one dimension (its ``get_upscale``, rounded)."""
    up = amount[dim] if isinstance(amount, (tuple, list)) else amount
    return round(up(val) if callable(up) else up * val)


def _report(text: str) -> None:
    """The path taken, in the log and as progress text on the node that is running (VAE Decode...)."""
    log.info("[xDiT] %s", text)
    try:
        import server
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        instance = getattr(server.PromptServer, "instance", None)
        if ctx is not None and instance is not None:
            instance.send_progress_text(f"xDiT: {text}", ctx.node_id)
    except Exception:  # noqa: BLE001  (a UI hint must never fail a decode)
        log.debug("[xDiT] no progress text for the VAE path", exc_info=True)


class XDiTVAE(comfy.sd.VAE):
    """ComfyUI's VAE; 2-D tiled decode / encode run over ``xdit_parallel.devices`` (see module doc)."""

    xdit_parallel: VAEParallelConfig

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_xdit_replicas", None)  # device copies (and a lock) do not travel; remade on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._xdit_replicas = _Replicas()
        _track(self)

    # --- where the stock VAE would decode / encode whole: large images go tiled ------------------------

    def decode(self, samples_in: torch.Tensor, vae_options: dict[str, Any] = {}) -> torch.Tensor:  # noqa: B006
        pixels = samples_in.shape[-1] * samples_in.shape[-2] * _scaled(self.upscale_ratio, 0, 1) ** 2
        reason = None if vae_options else self._xdit_large(samples_in, pixels, self.memory_used_decode)
        if reason is None:
            return super().decode(samples_in, vae_options)
        _report(f"VAE Decode: {reason}: parallel tiled decode (ComfyUI's default tiles)")
        return self.decode_tiled(samples_in)

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        pixels = pixel_samples.shape[1] * pixel_samples.shape[2] if pixel_samples.ndim == 4 else 0
        reason = self._xdit_large(pixel_samples.movedim(-1, 1), pixels, self.memory_used_encode)
        if reason is None:
            return super().encode(pixel_samples)
        _report(f"VAE Encode: {reason}: parallel tiled encode (ComfyUI's default tiles)")
        return self.encode_tiled(pixel_samples)

    def _xdit_large(self, x: torch.Tensor, pixels: int, memory_used: Callable[..., float]) -> str | None:
        """Why a plain call on a 2-D image goes tiled, or None. The memory check loads the VAE as the stock
        call does right after (same arguments, so that call is then a no-op)."""
        if x.ndim != 4 or self.latent_dim != 2 or self.extra_1d_channel is not None:
            return None
        limit = self.xdit_parallel.tile_pixels
        if limit and pixels > limit:
            return f"{pixels} pixels > {limit}"
        estimate = memory_used(x.shape, self.vae_dtype)
        mm.load_models_gpu([self.patcher], memory_required=estimate, force_full_load=self.disable_offload)
        free = mm.get_free_memory(self.device)
        if estimate > free:
            return f"ComfyUI estimates {estimate / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {self.device}"
        return None

    # --- the 2-D tilers: ComfyUI's own, with the tiles computed on every device -------------------------

    def decode_tiled_(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16) -> Any:
        host = super().decode_tiled_
        return self._xdit_scatter(
            "decode", lambda: host(samples, tile_x, tile_y, overlap), self.output_channels, self.upscale_ratio,
            f"decode {tuple(samples.shape)}, tiles {tile_x}x{tile_y} overlap {overlap}",
        )

    def encode_tiled_(
        self, pixel_samples: torch.Tensor, tile_x: int = 512, tile_y: int = 512, overlap: int = 64
    ) -> Any:
        host = super().encode_tiled_
        return self._xdit_scatter(
            "encode", lambda: host(pixel_samples, tile_x, tile_y, overlap), self.latent_channels,
            1 / self.downscale_ratio, f"encode {tuple(pixel_samples.shape)}, tiles {tile_x}x{tile_y} overlap {overlap}",
        )

    # 1-D (audio) and 3-D (video) tilers stay ComfyUI's, on the VAE's device: say so.
    def decode_tiled_1d(self, *args: Any, **kwargs: Any) -> Any:
        _report("1-D VAE tiled decode runs on one device (parallel tiles are for image VAEs)")
        return super().decode_tiled_1d(*args, **kwargs)

    def decode_tiled_3d(self, *args: Any, **kwargs: Any) -> Any:
        _report("3-D (video) VAE tiled decode runs on one device (parallel tiles are for image VAEs)")
        return super().decode_tiled_3d(*args, **kwargs)

    def encode_tiled_1d(self, *args: Any, **kwargs: Any) -> Any:
        _report("1-D VAE tiled encode runs on one device (parallel tiles are for image VAEs)")
        return super().encode_tiled_1d(*args, **kwargs)

    def encode_tiled_3d(self, *args: Any, **kwargs: Any) -> Any:
        _report("3-D (video) VAE tiled encode runs on one device (parallel tiles are for image VAEs)")
        return super().encode_tiled_3d(*args, **kwargs)

    def _xdit_scatter(self, method: str, host: Callable[[], Any], channels: int, scale: Any, what: str) -> Any:
        """Run ComfyUI's tiler ``host()`` with its per-tile ``first_stage_model.<method>`` on every slot."""
        cfg = self.xdit_parallel
        stock_out = self.output_device
        on_gpu = cfg.blend is VAEBlend.DEVICE and torch.device(self.device).type == "cuda"
        out_dev = self.device if on_gpu else stock_out
        runners = self._xdit_runners(method, out_dev)

        def out_shape(tile: torch.Tensor) -> tuple[int, ...]:
            # What the tiler sizes its output by (round(get_scale)); a real tile of another shape is refused.
            return (tile.shape[0], channels) + tuple(_scaled(scale, d, s) for d, s in enumerate(tile.shape[2:]))

        def placeholder(tile: torch.Tensor) -> torch.Tensor:
            # A 1x1 tile: the tiler blends it in a single pixel (or broadcasts it where the whole input is one
            # tile), so the rehearsal costs no per-tile blending; its result is discarded.
            shape = (tile.shape[0], channels) + (1,) * (tile.ndim - 2)
            return torch.zeros((), dtype=torch.float32, device=out_dev).expand(shape)

        def tiled(fn: Callable[[Any], Any], rehearsal: bool) -> Any:
            # The rehearsal's progress bar would jump to 100 % at once: mute it (the replay's is real).
            quiet = patching.swapped(comfy.utils, "PROGRESS_BAR_HOOK", None) if rehearsal else nullcontext()
            blend = patching.swapped(self, "output_device", out_dev) if on_gpu else nullcontext()
            with quiet, blend, patching.swapped(self, "first_stage_model", _TileModel(method, fn)):
                return host()

        t0 = time.perf_counter()
        try:
            out, stats = run_tiled(tiled, runners, placeholder, out_shape, timeout_s=cfg.timeout_s,
                                   max_batch=cfg.max_batch)
        except TileShapeError as e:
            _report(f"VAE {what}: {e}; ComfyUI's tiler on one device instead")
            return host()
        finally:
            _empty_cache([_device(d) for d in cfg.devices if _device(d) != self.device])
        _report(self._xdit_summary(what, stats, time.perf_counter() - t0))
        return out.to(stock_out)

    def _xdit_runners(self, method: str, out_dev: Any) -> list[Callable[[Any], Any]]:
        """One runner per slot: the first slot on the VAE's own device runs ``first_stage_model``, the
        others a copy of it (same dtype) moved to their device; outputs go to ``out_dev`` (where the
        tiler blends)."""
        main = self.first_stage_model
        runners, own_used = [], False
        for slot, text in enumerate(self.xdit_parallel.devices):
            dev = _device(text)
            if dev == self.device and not own_used:
                own_used, module = True, main
            else:
                module = self._xdit_replicas.get(slot, lambda d=dev: copy.deepcopy(main).to(d))
            runners.append(_runner(module, method, dev, out_dev))
        return runners

    def _xdit_summary(self, what: str, stats: TileStats, seconds: float) -> str:
        cfg = self.xdit_parallel
        per = ", ".join(f"{d}: {n}" for d, n in zip(cfg.devices, stats.per_slot))
        where = f"{stats.tiles} tiles over {cfg.describe()} ({per})"
        return f"VAE {what}: {where}, blend on {cfg.blend.value}, {seconds:.2f} s"


def parallelize(vae: comfy.sd.VAE, cfg: VAEParallelConfig) -> XDiTVAE:
    """An ``XDiTVAE`` sharing ``vae``'s state (model, patcher, settings): the same VAE, tiling in parallel.

    ``vae`` keeps working as the stock VAE (tests compare the two on the very same weights).
    """
    par = XDiTVAE.__new__(XDiTVAE)
    par.__dict__.update(vae.__dict__)
    par.xdit_parallel = cfg
    par._xdit_replicas = _Replicas()
    _track(par)
    return par
