"""The model families this release knows, declared as data.

Sequence-parallel installers are referenced lazily (module path + attribute) so that importing the
registry imports neither ComfyUI nor the family modules' hook code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .registry import Axis, ModelSpec, register

_SP = frozenset({Axis.CFG, Axis.ULYSSES, Axis.RING})
_CFG_ONLY = frozenset({Axis.CFG})


class LazyInstaller:
    """A ``SequenceParallelInstaller`` imported on first call (keeps ``import xdit_multigpu`` light)."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def __call__(self, patcher: Any, ctx: Any) -> None:
        fn = getattr(importlib.import_module(self.module), self.attr)
        fn(patcher, ctx)

    def __repr__(self) -> str:
        return f"{self.module}:{self.attr}"


def _num_heads(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("num_heads", 0))


def _mmdit_heads(cfg: Mapping[str, Any]) -> int:
    # MMDiT: hidden = 64 * depth and heads = depth (SD3.5-Large: 38), see ComfyUI model_detection.
    return int(cfg.get("num_heads") or cfg.get("depth", 0))


def _heads_or(default: int) -> Callable[[Mapping[str, Any]], int]:
    """Heads from the unet_config, else the model class's default (detection leaves it implicit)."""

    def heads(cfg: Mapping[str, Any]) -> int:
        return int(cfg.get("num_heads") or default)

    return heads


def _unet_heads(cfg: Mapping[str, Any]) -> int:
    ch, head_ch = int(cfg.get("model_channels", 0)), int(cfg.get("num_head_channels", 64))
    return ch // head_ch if head_ch > 0 else int(cfg.get("num_heads", 0))


FLUX = register(
    ModelSpec(
        name="flux",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md)
        display="Flux.1 (dev / schnell)",
        config_classes=("Flux", "FluxSchnell", "FluxInpaint"),
        axes=_SP,
        heads=_num_heads,
        hook="DIFFUSION_MODEL wrapper + post_input patch + dit single_block replace + attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.flux", "install_sequence_parallel"),
        control_residuals=True,  # control["input"][i] after double block i, ["output"][i] after single i
    )
)

SD3 = register(
    ModelSpec(
        name="sd3",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md)
        display="SD3 / SD3.5 (Medium, Large, MMDiT-X)",
        config_classes=("SD3",),
        axes=_SP,
        heads=_mmdit_heads,
        hook="dit double_block replace (shard at block 0, gather after the last) + attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.sd3", "install_sequence_parallel"),
        control_residuals=True,  # control["output"][i] added after joint block i
    )
)

SDXL = register(
    ModelSpec(
        name="sdxl",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md)
        display="SDXL",
        config_classes=("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
        axes=_CFG_ONLY,
        heads=_unet_heads,
        hook="CALC_COND_BATCH wrapper (UNet convolutions need the whole image)",
        notes="CFG parallel; sequence parallelism does not apply to a UNet's convolutions",
    )
)

PIXART = register(
    ModelSpec(
        name="pixart",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md)
        display="PixArt-α / PixArt-Σ",
        config_classes=("PixArtAlpha", "PixArtSigma"),
        axes=_SP,
        heads=_heads_or(16),  # PixArtMS default; detection sets 16 (hidden 1152)
        hook="bound-method object patches: blocks.0 / last block forward (shard / gather) + blocks.i.attn forward",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.pixart", "install_sequence_parallel"),
        notes="KV compression (sr_ratio > 1) is refused for sequence parallel; CFG parallel works",
    )
)

# What CUDA graph capture says to HunyuanDiT's and Wan's forwards (tests/gpu/test_graphs_bf16.py).
_CPU_COPY = "its forward copies a CPU tensor to the GPU inside the call, which capture refuses"

HUNYUAN_DIT = register(
    ModelSpec(
        name="hunyuan_dit",
        display="HunyuanDiT",
        config_classes=("HunyuanDiT", "HunyuanDiT1"),
        axes=_SP,
        heads=_heads_or(16),  # HunYuanDiT default; detection leaves num_heads out
        hook="dit double_block replace on every block (shard / slice RoPE / gather) + blocks.i.attn1 object patch",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.hunyuan_dit", "install_sequence_parallel"),
        # HunyuanDiT's forward adds control["output"].pop() to the long-skip input of the blocks after the
        # middle, outside the block replace, while the stream is sharded: the local rows are handed out.
        control_residuals=True,
        cuda_graphs_refused=_CPU_COPY,  # GPU run 5; such a call stays eager anyway, so auto does not try
    )
)

LUMINA2 = register(
    ModelSpec(
        name="lumina2",
        display="Lumina 2 / Z-Image (NextDiT)",
        config_classes=("Lumina2", "ZImage"),
        axes=_SP,
        heads=lambda cfg: int(cfg.get("n_heads") or 32),  # NextDiT default; detection sets 24 / 30
        hook="object patches: noise_refiner.i (shard, slice RoPE) + layers.i (caption replicated, gather after "
        "the last) + attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.lumina", "install_sequence_parallel"),
        notes="caption refiner runs whole on every rank; Z-Image (30 heads): Ulysses 2 / 3 / 5, rest on Ring",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit, Lumina 2 and Z-Image (benchmarks.md, run 5)
    )
)

WAN_T2V = register(
    ModelSpec(
        name="wan",
        display="Wan 2.1 / 2.2 T2V (video)",
        config_classes=("WAN21_T2V", "WAN22_T2V"),
        axes=_SP,
        heads=lambda cfg: int(cfg.get("num_heads") or 16),  # WanModel default; detection sets dim // 128
        hook="dit double_block replace on every block (shard video tokens, slice RoPE / per-frame vec, gather) "
        "+ blocks.i.cross_attn object patch (text cross-attention stays local) + attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.wan", "install_sequence_parallel"),
        notes="text-to-video only (Wan 2.2 A14B loads as WAN21_T2V); I2V / VACE / camera / S2V are refused",
        cuda_graphs_refused=_CPU_COPY,  # GPU run 5, Wan 2.1 and 2.2
    )
)

CHROMA = register(
    ModelSpec(
        name="chroma",
        display="Chroma / Chroma Radiance",
        config_classes=("Chroma", "ChromaRadiance"),  # Radiance: same forward_orig, then a per-patch NeRF head
        axes=_SP,
        heads=_num_heads,  # detection sets 24
        hook="dit double_block / single_block replace on every block (shard / slice RoPE / gather) "
        "+ attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.chroma", "install_sequence_parallel"),
        notes="ControlNet: CFG parallel only",
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md, run 5)
    )
)


def _qwen_heads(cfg: Mapping[str, Any]) -> int:
    # QwenImageTransformer2DModel default 24 heads x 128; detection leaves num_attention_heads out.
    return int(cfg.get("num_attention_heads") or 24)


QWEN_IMAGE = register(
    ModelSpec(
        name="qwen_image",
        display="Qwen-Image / Qwen-Image-Edit",
        config_classes=("QwenImage",),
        axes=_SP,
        heads=_qwen_heads,
        hook="dit double_block replace on every block (shard / slice RoPE / gather) + attention override",
        sequence_parallel=LazyInstaller("xdit_multigpu.models.qwen_image", "install_sequence_parallel"),
        notes="double_block model patches (DiffSynth ControlNet): CFG parallel only",
        control_residuals=True,  # control["input"][i] added to the first L image rows after block i
        cuda_graphs=True,  # GPU: graphed == eager, bit for bit (benchmarks.md, run 5)
    )
)
