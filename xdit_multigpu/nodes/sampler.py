"""``KSampler (xDiT Multi-GPU)``: the stock KSampler's inputs plus the dispatcher.

One device: exactly ``nodes.common_ksampler`` (ComfyUI's own sampler, progress bar and previews).
Several devices: the engine runs ComfyUI's own ``comfy.sample.sample`` on every rank of the worker
pool; whenever that cannot be done, the stock path runs instead and the node says why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..config import DispatcherSpec
from .common import CATEGORY, DISPATCHER

log = logging.getLogger("xdit_multigpu")


class XDiTKSampler:
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    DESCRIPTION = (
        "KSampler that splits one generation over the devices of its dispatcher (sequence and CFG parallel), "
        "with ComfyUI's own samplers and schedulers. Same picture as the stock KSampler."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import nodes

        stock = nodes.KSampler.INPUT_TYPES()
        required = dict(stock["required"])
        required["xdit_dispatcher"] = (
            DISPATCHER,
            {"tooltip": "From Load UNet / Load Checkpoint (xDiT Multi-GPU): the devices and plan for this model."},
        )
        return {"required": required, "hidden": {"unique_id": "UNIQUE_ID"}}

    async def run(self, **inputs: Any) -> dict[str, Any]:
        """ComfyUI's entry point. Async so that ComfyUI's executor can start other nodes meanwhile: two
        xDiT KSamplers on independent branches of one workflow then sample at the same time on different
        GPU groups. The work itself runs in a thread (it blocks on the workers); ComfyUI's execution
        context (which node is running, for progress messages) is copied into that thread."""
        return await asyncio.to_thread(self.sample, **inputs)

    def sample(
        self,
        model: Any,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        xdit_dispatcher: DispatcherSpec,
        denoise: float = 1.0,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        from ..engine.sampling import sample_latent

        result = sample_latent(
            model, xdit_dispatcher, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
        )
        log.info("[xDiT] %s", result.status)
        return {"ui": {"text": [result.status]}, "result": (result.latent,)}
