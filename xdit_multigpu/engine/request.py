"""Messages from the engine to the workers (control plane).

Tensors inside a request (noise, latent, conditioning) are small next to the model, which every worker
loads itself from the model file; the request is pickled once per call. A model delta's weight patches
(LoRA tensors) ride along only when the pool does not hold them yet (``WorkerPool.sample``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ParallelPlan

if TYPE_CHECKING:
    from .model_delta import ModelDelta


@dataclass(frozen=True)
class BatchSlice:
    """Items ``[start, stop)`` of a ``total``-item latent batch (data parallel over GPU groups)."""

    start: int
    stop: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.total:
            raise ValueError(f"bad batch slice [{self.start}, {self.stop}) of {self.total}")


@dataclass(frozen=True)
class SampleRequest:
    """One ``comfy.sample.sample`` call, identical on every rank.

    ``noise`` is made once on the driver with ComfyUI's own ``prepare_noise`` so every rank (and the
    one-device fallback) starts from the same tensor; ``seed`` still travels because ancestral / SDE
    samplers draw more noise from it during sampling.
    """

    noise: Any  # torch.Tensor, CPU
    latent_image: Any  # torch.Tensor, CPU (after fix_empty_latent_channels)
    positive: Any  # ComfyUI CONDITIONING list
    negative: Any
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    noise_mask: Any = None
    disable_noise: bool = False
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False
    plan: ParallelPlan = ParallelPlan()
    # The MODEL's modifications (LoRA, ModelSampling, model_options...) for workers that loaded the plain
    # file; None for an unmodified MODEL and for the in-process fallback (its MODEL already carries them).
    delta: ModelDelta | None = None
    # Set when this request is one slice of a batch split over GPU groups: noise / latent / mask hold only
    # the slice, and per-step sampler noise is drawn for the whole batch and sliced (``batch_slice_noise``).
    batch: BatchSlice | None = None

    def slice(self, start: int, stop: int) -> SampleRequest:
        """This request for batch items ``[start, stop)`` only (each item keeps exactly its own noise)."""
        total = int(self.noise.shape[0])
        mask = self.noise_mask
        if mask is not None and self.noise.ndim == 4:
            # ComfyUI's prepare_mask -> reshape_mask: (-1, 1, H, W), resized per item, tiled over the batch.
            flat = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
            if flat.shape[0] > 1:
                import comfy.utils  # noqa: PLC0415  (only in ComfyUI's process)

                mask = comfy.utils.repeat_to_batch_size(flat, total)[start:stop]
        return dataclasses.replace(
            self, noise=self.noise[start:stop], latent_image=self.latent_image[start:stop], noise_mask=mask,
            batch=BatchSlice(start, stop, total),
        )
