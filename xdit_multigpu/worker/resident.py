"""Where a worker keeps the diffusion model's weights: in GPU memory from the start ("resident"), or
in system RAM until the first sampling call (ComfyUI's default).

ComfyUI's loader puts the model on ``unet_offload_device()``: system RAM, unless ComfyUI runs in its
HIGH_VRAM mode (``--highvram`` / ``--gpu-only``), where it is the GPU. A worker owns its GPU, so when
the model fits, HIGH_VRAM makes the load one copy (file -> GPU) instead of two (file -> RAM at pool
start, RAM -> GPU on the first request). ComfyUI fixes its VRAM mode when ``comfy.model_management``
is imported, so the decision is taken, and ``--highvram`` set, before that import.

``decide`` is pure (sizes, host flags, ``XDIT_RESIDENT_WEIGHTS`` in; decision and reason out); only
``gpu_memory`` touches CUDA. Nothing here runs in the ComfyUI (host) process: its own flags and the
in-process fallback are never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ResidentWeights

# Share of the GPU the weights may take; the rest stays for activations, attention workspaces and
# CUDA graphs. The weights are counted twice: with a LoRA, ComfyUI keeps each patched weight's original
# on the offload device, which resident makes the GPU (ModelPatcher.patch_weight_to_device backup), so
# a 12 GB Flux fp8 on a 24 GB card stays in system RAM, as ComfyUI would keep it, instead of running
# out of memory at the first LoRA.
RESIDENT_FRACTION = 0.75
BACKUP_FACTOR = 2
# The host's VRAM choices win over ours; the first group already means resident (copied to workers).
HOST_RESIDENT_FLAGS = ("gpu_only", "highvram")
HOST_OFFLOAD_FLAGS = ("lowvram", "novram", "normalvram", "disable_smart_memory")
GB = 1e9


@dataclass(frozen=True)
class ResidentDecision:
    """``resident``: load the weights into GPU memory (ComfyUI HIGH_VRAM); ``reason`` says why, for logs."""

    resident: bool
    reason: str


def _host_flag(host_flags: Mapping[str, Any] | None, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` the host ComfyUI was started with, as its command-line flag."""
    for name in names:
        if (host_flags or {}).get(name):
            return "--" + name.replace("_", "-")
    return None


def decide(
    file_bytes: int | None,
    gpu: tuple[int, int] | None,
    host_flags: Mapping[str, Any] | None,
    mode: ResidentWeights,
    fraction: float = RESIDENT_FRACTION,
) -> ResidentDecision:
    """Whether a worker holds the weights in GPU memory from the start.

    ``file_bytes``: the model file's size (None: unknown). ``gpu``: ``(free, total)`` bytes of the
    worker's GPU before anything is loaded (None: a CPU rank). ``host_flags``: the host ComfyUI's
    flags (``vars(comfy.cli_args.args)``, None: unknown). Order: a CPU rank is never resident; a host
    VRAM flag wins (``--highvram``/``--gpu-only`` are copied to the workers, so resident; ``--lowvram``
    and the like keep RAM); then ``mode`` off/on; ``auto`` is resident iff the weights and a LoRA's
    backup of them (``BACKUP_FACTOR * file``) plus the headroom ``(1 - fraction) * total`` fit the free
    memory (on an idle GPU: ``2 * file <= fraction * total``).
    """
    if gpu is None:
        return ResidentDecision(False, "CPU rank")
    flag = _host_flag(host_flags, HOST_RESIDENT_FLAGS)
    if flag:
        return ResidentDecision(True, f"host ComfyUI runs with {flag}")
    flag = _host_flag(host_flags, HOST_OFFLOAD_FLAGS)
    if flag:
        return ResidentDecision(False, f"host ComfyUI runs with {flag}")
    if mode is ResidentWeights.OFF:
        return ResidentDecision(False, "XDIT_RESIDENT_WEIGHTS=off")
    if mode is ResidentWeights.ON:
        return ResidentDecision(True, "XDIT_RESIDENT_WEIGHTS=on")
    if file_bytes is None:
        return ResidentDecision(False, "model file size unknown on the driver's node")
    free, total = gpu
    budget = free - (1.0 - fraction) * total  # what is left once the headroom is set aside
    need = BACKUP_FACTOR * file_bytes
    fits = need <= budget
    return ResidentDecision(
        fits,
        f"{file_bytes / GB:.1f} GB file, twice for a LoRA's backup, {'fits' if fits else 'does not fit'} "
        f"{fraction:.0%} of the GPU's {total / GB:.1f} GB ({free / GB:.1f} GB free)",
    )


def worker_flags(host_flags: Mapping[str, Any] | None, decision: ResidentDecision) -> dict[str, Any]:
    """The flags a worker imports ComfyUI with: a copy of the host's, plus ``highvram`` when resident.

    Never mutates ``host_flags`` (the host process's own flags and its in-process fallback stay as they are).
    """
    flags = dict(host_flags or {})
    if decision.resident and not _host_flag(flags, HOST_RESIDENT_FLAGS):
        flags["highvram"] = True
    return flags


def confirm(decision: ResidentDecision, vram_state: str) -> ResidentDecision:
    """What the worker actually does: ComfyUI's ``vram_state`` (imported) against the decision.

    They differ only when ComfyUI was imported before the flag could be set; the reason then says so.
    """
    resident = vram_state == "HIGH_VRAM"
    if resident == decision.resident:
        return decision
    return ResidentDecision(resident, f"{decision.reason}; but ComfyUI's vram_state is {vram_state}")


def gpu_memory() -> tuple[int, int]:
    """``(free, total)`` bytes of this process's current CUDA device (initialises CUDA)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def decide_for_rank(
    cpu: bool, file_bytes: int | None, host_flags: Mapping[str, Any] | None, mode: ResidentWeights | str
) -> ResidentDecision:
    """``decide`` for this process: asks CUDA for the GPU's memory on CUDA ranks only."""
    return decide(file_bytes, None if cpu else gpu_memory(), host_flags, ResidentWeights(mode))
