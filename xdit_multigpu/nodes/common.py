"""Inputs and helpers shared by the xDiT nodes (ComfyUI schema only; logic lives in engine/)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..config import DeviceKind, DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, ParallelStrategy, SchedulingStrategy
from ..engine.model_info import inspect_model_file
from ..errors import ConfigError

CATEGORY = "xDiT Multi-GPU"
DISPATCHER = "XDIT_DISPATCHER"

TIP_GPUS = (
    'Devices that share ONE generation: GPU indices such as "0,1,2,3", "all" for every visible GPU, '
    'or "cpu:N" to let N CPU processes stand in for GPUs (testing). One device = ComfyUI\'s own sampler. '
    '"|" separates GPU groups that work side by side, e.g. "0,1|2,3": a batch is split over the groups.'
)
TIP_STRATEGY = (
    "Hybrid (default) plans CFG x Ulysses x Ring from the devices, whether CFG is used and the model's heads. "
    "USP: sequence parallel only. CFG: cond and uncond on two devices. PipeFusion / Tensor: not yet available."
)
TIP_SCHEDULING = "How work is spread over GPU groups when there are several (data-parallel batches, queued prompts)."
TIP_GROUP_SIZE = (
    "GPUs per group: 0 = one group of all listed GPUs (or the groups given with | in gpu_devices); e.g. 2 with "
    '"0,1,2,3" = groups 0,1 and 2,3. Each group runs one generation; batches and workflow branches use all groups.'
)
TIP_WEIGHTS = (
    'weighted_round_robin only: one weight per group, e.g. "2,1" when group 0 is twice as fast. '
    "Empty = weights measured from each group's throughput."
)
TIP_ULYSSES = (
    "Hybrid / USP: how many devices of the sequence split use Ulysses (all-to-all, best on NVLink); the rest "
    "use Ring (K/V passed along, tolerates PCIe or several machines). 0 = automatic (as much Ulysses as the "
    "model's heads allow). Must divide the model's heads and the devices of the split."
)
TIP_RAY = 'Ray cluster to join, e.g. "auto" or "host:port". Empty: an embedded local cluster on this machine only.'
TIP_DISPATCHER = "Where and how the KSampler (xDiT Multi-GPU) runs this model. Connect it to the KSampler."


def dispatcher_inputs() -> dict[str, Any]:
    """Required inputs every xDiT model loader adds to the stock loader's."""
    return {
        "gpu_devices": ("STRING", {"default": "all", "tooltip": TIP_GPUS}),
        "parallel_strategy": ([s.value for s in ParallelStrategy], {"default": "Hybrid", "tooltip": TIP_STRATEGY}),
        "scheduling_strategy": ([s.value for s in SchedulingStrategy], {"tooltip": TIP_SCHEDULING}),
    }


def optional_inputs() -> dict[str, Any]:
    return {
        "gpus_per_group": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": TIP_GROUP_SIZE, "advanced": True}),
        "group_weights": ("STRING", {"default": "", "tooltip": TIP_WEIGHTS, "advanced": True}),
        "ray_address": ("STRING", {"default": "", "tooltip": TIP_RAY, "advanced": True}),
        "ulysses_degree": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": TIP_ULYSSES, "advanced": True}),
    }


def parse_weights(text: str) -> tuple[float, ...]:
    """``group_weights``: "2,1" -> (2.0, 1.0); empty -> () (measured)."""
    raw = (text or "").replace(" ", "")
    if not raw:
        return ()
    try:
        return tuple(float(x) for x in raw.split(","))
    except ValueError:
        raise ConfigError("group_weights", f'"{text}" is malformed', 'Give numbers separated by commas, e.g. "2,1"') from None


def visible_gpus(ray_address: str | None) -> int | None:
    """CUDA devices this process sees; None when joining a remote cluster (checked when workers start)."""
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_dispatcher(
    field: str,
    folder: str,
    name: str,
    kind: LoaderKind,
    gpu_devices: str,
    parallel_strategy: str,
    scheduling_strategy: str,
    weight_dtype: str = "default",
    ray_address: str = "",
    gpus_per_group: int = 0,
    group_weights: str = "",
    ulysses_degree: int = 0,
) -> DispatcherSpec:
    """Validate every loader input and build the ``XDIT_DISPATCHER`` value. Raises ``ConfigError``."""
    import folder_paths

    address = (ray_address or "").strip() or None
    devices = DeviceSet.parse(gpu_devices, visible_gpus(address))
    try:
        strategy = ParallelStrategy(parallel_strategy)
    except ValueError:
        raise ConfigError("parallel_strategy", f'"{parallel_strategy}" is unknown', "Choose Hybrid, USP or CFG") from None
    strategy.require_available()
    try:
        scheduling = SchedulingStrategy(scheduling_strategy)
    except ValueError:
        opts = ", ".join(s.value for s in SchedulingStrategy)
        raise ConfigError("scheduling_strategy", f'"{scheduling_strategy}" is unknown', f"Choose one of {opts}") from None
    grouping = DispatcherSpec(None, devices, group_size=int(gpus_per_group or 0), group_weights=parse_weights(group_weights))  # type: ignore[arg-type]
    grouping.check_groups()
    path = folder_paths.get_full_path(folder, name) if name else None
    info = inspect_model_file(field, path, name, kind)
    degree = int(ulysses_degree or 0)
    family = ""
    if info is not None:
        family = info.spec.name
        for group in grouping.device_groups():  # every group runs the plan on its own devices
            _check_strategy(info.spec, strategy, group)
            _check_ulysses(info, strategy, group, degree)
    assert path is not None  # inspect_model_file raised otherwise
    load = LoadSpec.for_file(kind, path, weight_dtype)
    return dataclasses.replace(grouping, load=load, strategy=strategy, scheduling=scheduling, family=family,
                               ray_address=address, ulysses_degree=degree)


def _check_ulysses(info: Any, strategy: ParallelStrategy, devices: DeviceSet, degree: int) -> None:
    """``ulysses_degree`` against the model's heads and the group, as the planner will split it without an
    uncond pass (with one, Hybrid halves the split; the KSampler then checks again before any worker starts)."""
    from ..engine import planner

    if degree > 0:
        planner.plan(strategy, max(devices.world_size, 1), False, info.heads, info.spec.axes, ulysses=degree)


def _check_strategy(spec: Any, strategy: ParallelStrategy, devices: DeviceSet) -> None:
    from ..models import Axis

    sp_axes = spec.supports(Axis.ULYSSES) or spec.supports(Axis.RING)
    if strategy is ParallelStrategy.USP and not sp_axes:
        raise ConfigError(
            "parallel_strategy",
            f"USP (sequence parallel) is not available for {spec.display} ({spec.notes or 'not supported'})",
            "Choose Hybrid or CFG",
        )
    if strategy is ParallelStrategy.CFG and devices.world_size not in (1, 2):
        raise ConfigError(
            "parallel_strategy",
            f"CFG parallel runs cond and uncond on exactly 2 devices, but gpu_devices lists {devices.world_size}",
            "List 2 devices, or choose Hybrid to combine CFG with sequence parallelism",
        )


def validation_message(fn: Any, *args: Any, **kwargs: Any) -> bool | str:
    """Run a validator for ComfyUI's VALIDATE_INPUTS: True, or the error text ComfyUI shows on the node."""
    try:
        fn(*args, **kwargs)
    except ConfigError as e:
        return str(e)
    return True


def is_cpu_set(spec: DispatcherSpec) -> bool:
    return spec.devices.kind is DeviceKind.CPU
