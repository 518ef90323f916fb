"""Messages from the engine to the workers (control plane).

Tensors inside a request (noise, latent, conditioning) are small next to the model, which every worker
loads itself from the model file; the request is pickled once per call. A model delta's weight patches
(LoRA tensors) ride along only when the pool does not hold them yet (``WorkerPool.sample``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ParallelPlan

if TYPE_CHECKING:
    from .model_delta import ModelDelta


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
