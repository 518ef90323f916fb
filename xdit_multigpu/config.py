"""Frozen configuration types, validated once at the node boundary.

Nothing in here imports ComfyUI, Ray or touches a GPU: the node layer passes in what it learned from
the host (e.g. how many CUDA devices are visible) so that parsing stays pure and unit-testable.
"""

from __future__ import annotations

import os
import re
import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from ._compat import StrEnum
from .errors import ConfigError, NotYetAvailableError

MAX_CPU_RANKS = 64
E = TypeVar("E", bound=StrEnum)


class ParallelStrategy(StrEnum):
    """How one generation is split over the devices of a group."""

    HYBRID = "Hybrid"  # planner picks cfg x ulysses x ring from devices, CFG use, heads, topology
    USP = "USP"  # sequence parallel only (Ulysses x Ring)
    CFG = "CFG"  # cond / uncond on different devices only
    PIPEFUSION = "PipeFusion"
    TENSOR = "Tensor"

    @property
    def available(self) -> bool:
        return self in (ParallelStrategy.HYBRID, ParallelStrategy.USP, ParallelStrategy.CFG)

    def require_available(self) -> None:
        if not self.available:
            raise NotYetAvailableError(
                "parallel_strategy",
                f"{self.value} is not yet available in this release",
                "Choose Hybrid (automatic), USP or CFG",
            )


class SchedulingStrategy(StrEnum):
    """How work units are spread over GPU groups (see the dispatcher)."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    ADAPTIVE = "adaptive"


class AttentionBackend(StrEnum):
    """Which library runs sequence-parallel attention (``XDIT_ATTENTION_BACKEND``)."""

    YUNCHANG = "yunchang"  # default: yunchang's LongContextAttention with our LSE kernels
    XFUSER = "xfuser"  # optional: xfuser's xFuserLongContextAttention (xfuser installed; FA3 / flash-attn kernels)

    @classmethod
    def from_env(cls) -> AttentionBackend:
        """The backend named by ``XDIT_ATTENTION_BACKEND`` (unset or empty: yunchang)."""
        return _env_choice("XDIT_ATTENTION_BACKEND", cls, cls.YUNCHANG)


class CudaGraphs(StrEnum):
    """Whether workers replay the denoiser call as a CUDA graph (``XDIT_CUDA_GRAPHS``, see ``worker/graphs.py``)."""

    OFF = "off"
    AUTO = "auto"  # default: on a CUDA device, unless another node's code runs inside the model call
    ON = "on"  # also with other nodes' patches (they must not keep per-step Python state)

    @classmethod
    def from_env(cls) -> CudaGraphs:
        return _env_choice("XDIT_CUDA_GRAPHS", cls, cls.AUTO)


class ResidentWeights(StrEnum):
    """Whether CUDA workers load the diffusion model straight into GPU memory (``XDIT_RESIDENT_WEIGHTS``).

    Resident = ComfyUI's HIGH_VRAM mode in the worker (``--highvram``): the loader copies the file into
    GPU memory once, instead of into system RAM and again to the GPU on the first sampling call. A VRAM
    flag the host ComfyUI was started with always wins (see ``worker.resident.decide``).
    """

    AUTO = "auto"  # default: resident when the model file fits a share of the worker's GPU
    ON = "on"  # resident whatever the file size (the user knows it fits)
    OFF = "off"  # ComfyUI's default: weights in system RAM until the first sampling call

    @classmethod
    def from_env(cls) -> ResidentWeights:
        """The mode named by ``XDIT_RESIDENT_WEIGHTS`` (unset or empty: auto); anything else: ConfigError."""
        return _env_choice("XDIT_RESIDENT_WEIGHTS", cls, cls.AUTO)


class PrefetchWeights(StrEnum):
    """Whether resident CUDA workers read the model file while they import ComfyUI (``XDIT_PREFETCH``).

    ``auto``: a worker whose weights go straight to the GPU (see ``ResidentWeights``) reads a
    ``.safetensors`` file into GPU memory in background threads during its ComfyUI import, then hands
    ComfyUI's own state-dict loader the tensors (``worker/prefetch.py``); CPU ranks, weights kept in
    system RAM and other file formats load with ComfyUI's file loader as before. ``off``: always the latter.
    """

    AUTO = "auto"
    OFF = "off"

    @classmethod
    def from_env(cls) -> PrefetchWeights:
        """The mode named by ``XDIT_PREFETCH`` (unset or empty: auto); anything else: ConfigError."""
        return _env_choice("XDIT_PREFETCH", cls, cls.AUTO)


class DeviceKind(StrEnum):
    CUDA = "cuda"
    CPU = "cpu"  # CPU ranks stand in for GPUs (tests, CI); gloo instead of NCCL


@dataclass(frozen=True)
class DeviceSet:
    """The devices one generation may use, parsed from the ``gpu_devices`` input.

    ``ids`` are CUDA ordinals as the host process sees them (kind CUDA) or rank slots 0..n-1 (kind CPU).
    ``ids == ()`` with ``kind == CUDA`` means "all" was asked on a machine that shows no GPU: the engine
    then samples on ComfyUI's own device and says why.
    """

    kind: DeviceKind
    ids: tuple[int, ...]
    text: str = field(default="", compare=False)
    groups: tuple[tuple[int, ...], ...] = ()  # explicit GPU groups ("0,1|2,3"); () = not given

    @property
    def world_size(self) -> int:
        return len(self.ids)

    def subset(self, ids: tuple[int, ...]) -> DeviceSet:
        """The devices ``ids`` of this set as a set of their own (one GPU group)."""
        if self.kind is DeviceKind.CPU:
            return DeviceSet(self.kind, ids, f"cpu:{len(ids)}")
        return DeviceSet(self.kind, ids, ",".join(map(str, ids)))

    @property
    def backend(self) -> str:
        return "nccl" if self.kind is DeviceKind.CUDA else "gloo"

    def describe(self) -> str:
        if self.kind is DeviceKind.CPU:
            return f"{self.world_size} CPU rank(s)"
        return "GPU " + ",".join(str(i) for i in self.ids) if self.ids else "no GPU"

    @classmethod
    def parse(cls, text: str, visible_gpus: int | None) -> DeviceSet:
        """Parse ``gpu_devices``: ``"0,1,2,3"``, ``"all"``, ``"cpu"`` or ``"cpu:N"``; ``|`` separates
        explicit GPU groups (``"0,1|2,3"``, ``"cpu:2|cpu:2"``), each running one generation at a time.

        ``visible_gpus`` is the number of CUDA devices the host sees, or None when unknown (joining a
        remote Ray cluster), in which case ids are range-checked when workers start.
        """
        raw = (text or "").strip().lower().replace(" ", "")
        if "|" in raw:
            return cls._parse_groups(text, raw, visible_gpus)
        return cls._parse_one(text, raw, visible_gpus)

    @classmethod
    def _parse_groups(cls, text: str, raw: str, visible_gpus: int | None) -> DeviceSet:
        fld = "gpu_devices"
        parts = [cls._parse_one(text, p, visible_gpus) for p in raw.split("|")]
        kinds = {p.kind for p in parts}
        if len(kinds) > 1 or "all" in raw.split("|"):
            raise ConfigError(fld, f'"{text}" mixes "all" or CPU and GPU groups',
                              'Give every group as GPU indices ("0,1|2,3") or every group as "cpu:N"')
        if parts[0].kind is DeviceKind.CPU:  # CPU slots are numbered across the groups
            groups, start = [], 0
            for p in parts:
                groups.append(tuple(range(start, start + p.world_size)))
                start += p.world_size
            if start > MAX_CPU_RANKS:
                raise ConfigError(fld, f'"{text}" asks for {start} CPU ranks', f"Use at most {MAX_CPU_RANKS} in all")
        else:
            groups = [p.ids for p in parts]
            flat = [i for g in groups for i in g]
            dupes = sorted({i for i in flat if flat.count(i) > 1})
            if dupes:
                raise ConfigError(fld, f'"{text}" puts GPU {dupes[0]} in more than one group', "List each GPU once")
        return cls(parts[0].kind, tuple(i for g in groups for i in g), text, tuple(groups))

    @classmethod
    def _parse_one(cls, text: str, raw: str, visible_gpus: int | None) -> DeviceSet:
        fld = "gpu_devices"
        if not raw:
            raise ConfigError(fld, "is empty", 'Enter GPU ids such as "0,1", or "all"')
        if raw == "all":
            n = visible_gpus or 0
            return cls(DeviceKind.CUDA, tuple(range(n)), text)
        m = re.fullmatch(r"cpu(?::(\d+))?", raw)
        if m:
            n = int(m.group(1) or 1)
            if not 1 <= n <= MAX_CPU_RANKS:
                raise ConfigError(fld, f'"{text}" asks for {n} CPU ranks', f"Use cpu:1 .. cpu:{MAX_CPU_RANKS}")
            return cls(DeviceKind.CPU, tuple(range(n)), text)
        ids: list[int] = []
        for part in raw.split(","):
            part = part.removeprefix("cuda:")
            if not part.isdigit():
                raise ConfigError(
                    fld,
                    f'"{text}" is malformed ("{part}" is not a GPU index)',
                    'Use comma-separated GPU indices such as "0,1,2,3", "all", or "cpu:2" for CPU ranks',
                )
            ids.append(int(part))
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(fld, f'"{text}" lists GPU {dupes[0]} more than once', "List each GPU once")
        if visible_gpus is not None:
            bad = [i for i in ids if i >= visible_gpus]
            if bad:
                have = f"GPUs 0..{visible_gpus - 1}" if visible_gpus else "no CUDA GPU"
                raise ConfigError(
                    fld,
                    f"GPU {bad[0]} is out of range: this machine has {have}",
                    'Use indices below the GPU count, "all", or "cpu:N" to test with CPU ranks',
                )
        return cls(DeviceKind.CUDA, tuple(ids), text)


def parse_encoder_device(text: str, visible_gpus: int) -> str | None:
    """Parse the ``device`` input of the VAE / CLIP loaders.

    Returns None for "default" (ComfyUI decides), "cpu", or "cuda:N" (a torch device string).
    """
    raw = (text or "default").strip().lower()
    if raw in ("default", ""):
        return None
    if raw == "cpu":
        return "cpu"
    idx = raw.removeprefix("cuda:").removeprefix("gpu")
    if not idx.isdigit():
        raise ConfigError("device", f'"{text}" is not a device', 'Use "default", "cpu" or a GPU index like "1"')
    if int(idx) >= visible_gpus:
        raise ConfigError(
            "device", f"GPU {idx} is out of range: this machine has {visible_gpus} CUDA GPU(s)", 'Use "cpu" or a lower index'
        )
    return f"cuda:{int(idx)}"


VAE_TILE_PIXELS_ENV = "XDIT_VAE_TILE_PIXELS"
VAE_TILE_TIMEOUT_ENV = "XDIT_VAE_TILE_TIMEOUT_S"
VAE_BLEND_ENV = "XDIT_VAE_BLEND"
VAE_TILE_BATCH_ENV = "XDIT_VAE_TILE_BATCH"


class VAEBlend(StrEnum):
    """Where ComfyUI's tiler blends the tiles of a parallel VAE call."""

    HOST = "host"  # ComfyUI's output device (system RAM unless --gpu-only), exactly as the stock VAE
    DEVICE = "device"  # the VAE's GPU (float32 multiply / add / divide: the same IEEE results), then moved


@dataclass(frozen=True)
class VAEParallelConfig:
    """``parallel_devices`` of Load VAE (xDiT): the devices the VAE's tiles are spread over.

    ``devices``: one torch device string per slot ("cuda:1", or "cpu" repeated for CPU test slots).
    ``tile_pixels``: a plain decode / encode of an image with more pixels than this goes the parallel
    tiled way; 0 = only where ComfyUI's own memory estimate exceeds the VAE device's free memory (where
    the stock VAE would run out of memory and retry tiled). ``max_batch``: tiles of equal shape run
    together on one device (``XDIT_VAE_TILE_BATCH``; 1 = one tile per call, bit-identical to ComfyUI's
    tiler; more may change the last bits where kernels pick other algorithms for other batch sizes).
    ``blend``: see ``VAEBlend`` (``XDIT_VAE_BLEND``).
    """

    devices: tuple[str, ...]
    tile_pixels: int = 0
    max_batch: int = 1
    timeout_s: float = 600.0
    blend: VAEBlend = VAEBlend.HOST

    def describe(self) -> str:
        kinds = {d.split(":")[0] for d in self.devices}
        if kinds == {"cpu"}:
            return f"{len(self.devices)} CPU slots"
        return "GPU " + ",".join(d.split(":")[-1] for d in self.devices)


def env_flag(name: str, default: bool) -> bool:
    """Environment variable ``name`` as an on / off switch (1/true/yes/on, 0/false/no/off; ``default`` when
    unset or blank); anything else is a ``ConfigError`` naming the variable and the fix."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f'is "{raw}"', "Set it to 1 or 0, or unset it")


def env_number(name: str, default: float, minimum: float, *, exclusive: bool = False) -> float:
    """Environment variable ``name`` as a number >= ``minimum`` (``exclusive``: > ``minimum``), ``default``
    when unset or blank; anything else is a ``ConfigError`` naming the variable and the fix."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")  # fails both comparisons below
    if not (value > minimum if exclusive else value >= minimum):
        bound = f"{'>' if exclusive else '>='} {minimum:g}"
        raise ConfigError(name, f'"{raw}" is not a number {bound}', f"Set {name} to a number {bound}, or unset it")
    return value


def parse_vae_parallel(text: str, visible_gpus: int | None) -> VAEParallelConfig | None:
    """Parse ``parallel_devices``: "" (off: the stock VAE), "0,1,2,3", "all" or "cpu:N" (as ``gpu_devices``).

    One device is also off (the stock VAE, exactly). Environment: ``XDIT_VAE_TILE_PIXELS`` (see
    ``VAEParallelConfig.tile_pixels``), ``XDIT_VAE_TILE_TIMEOUT_S`` (bound on the wait for one tile).
    """
    fld = "parallel_devices"
    if not (text or "").strip():
        return None
    try:
        ds = DeviceSet.parse(text, visible_gpus)
    except ConfigError as e:
        raise ConfigError(fld, e.problem, e.fix + ", or leave it empty for the stock VAE") from None
    if ds.kind is DeviceKind.CUDA and not ds.ids:
        raise ConfigError(fld, '"all" finds no CUDA GPU on this machine', 'Leave it empty, or use "cpu:2" to test')
    if ds.world_size < 2:
        return None
    devices = ("cpu",) * ds.world_size if ds.kind is DeviceKind.CPU else tuple(f"cuda:{i}" for i in ds.ids)
    return VAEParallelConfig(
        devices=devices,
        tile_pixels=int(env_number(VAE_TILE_PIXELS_ENV, 0, 0)),
        timeout_s=env_number(VAE_TILE_TIMEOUT_ENV, 600.0, 1.0),
        max_batch=int(env_number(VAE_TILE_BATCH_ENV, 1, 1)),
        blend=_env_blend(),
    )


def _env_blend() -> VAEBlend:
    return _env_choice(VAE_BLEND_ENV, VAEBlend, VAEBlend.HOST)


def _env_choice(name: str, choices: type[E], default: E) -> E:
    """The member of a lower-case ``StrEnum`` named by environment variable ``name`` (unset / empty:
    ``default``); anything else is a ConfigError naming the variable and the choices."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    try:
        return choices(raw)
    except ValueError:
        raise ConfigError(name, f'is "{raw}"', f"Set it to one of {[c.value for c in choices]}, or unset it") from None


class LoaderKind(StrEnum):
    DIFFUSION_MODEL = "diffusion_model"  # UNETLoader semantics
    CHECKPOINT = "checkpoint"  # CheckpointLoaderSimple semantics (workers load only the diffusion model)


@dataclass(frozen=True)
class LoadSpec:
    """What every worker loads: the same file, with ComfyUI's own loader, with the same options.

    ``signature`` (size and mtime) changes when the file is replaced, which rebuilds the pool.
    ``unet_config_json`` is set by tests only: the architecture of a file ComfyUI's detection refuses
    (a Flux smaller than the hard-coded 24 x 128 heads); no node input sets it.
    """

    kind: LoaderKind
    path: str
    weight_dtype: str = "default"
    signature: tuple[int, int] = (0, 0)
    unet_config_json: str | None = None

    @classmethod
    def for_file(
        cls, kind: LoaderKind, path: str, weight_dtype: str = "default", unet_config_json: str | None = None
    ) -> LoadSpec:
        st = os.stat(path)
        sig = (st.st_size, int(st.st_mtime_ns))
        return cls(kind, os.path.abspath(path), weight_dtype, sig, unet_config_json)


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of one generation: ``cfg * ulysses * ring == world_size``.

    Rank layout (CFG outermost, Ulysses innermost so that Ulysses all-to-alls stay between
    neighbouring GPUs, which usually share the fastest links)::

        rank = cfg_rank * (ulysses * ring) + ring_rank * ulysses + ulysses_rank
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    reason: str = field(default="", compare=False)
    attention: AttentionBackend = AttentionBackend.YUNCHANG  # used only when ulysses * ring > 1
    graphs: CudaGraphs = CudaGraphs.OFF  # the engine sets XDIT_CUDA_GRAPHS' value; OFF for in-process sampling

    def __post_init__(self) -> None:
        for name in ("cfg", "ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelPlan.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(cfg_rank, ring_rank, ulysses_rank) of a global rank."""
        cfg_rank, sp_rank = divmod(rank, self.sp)
        ring_rank, uly_rank = divmod(sp_rank, self.ulysses)
        return cfg_rank, ring_rank, uly_rank

    def describe(self) -> str:
        text = f"cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring} on {self.world_size} device(s)"
        if self.sp > 1 and self.attention is not AttentionBackend.YUNCHANG:
            text += f" ({self.attention.value} attention)"
        return text


@dataclass(frozen=True)
class DispatcherSpec:
    """The ``XDIT_DISPATCHER`` value a loader hands to ``KSampler (xDiT Multi-GPU)``.

    It is a description, not a live object: the engine keeps the worker pools and finds (or builds)
    the pool for this spec on use. ``family`` is the ``ModelSpec`` name the loader detected.
    """

    load: LoadSpec
    devices: DeviceSet
    strategy: ParallelStrategy = ParallelStrategy.HYBRID
    scheduling: SchedulingStrategy = SchedulingStrategy.ROUND_ROBIN
    family: str = ""
    ray_address: str | None = None
    group_size: int = 0  # devices per GPU group; 0 = explicit "|" groups, else one group of all devices
    group_weights: tuple[float, ...] = ()  # weighted_round_robin: one per group; () = measured throughput
    ulysses_degree: int = 0  # Ulysses part of the sequence split (rest on ring); 0 = the planner's choice

    def pool_key(self) -> tuple[object, ...]:
        """Identity of the worker pool: same file, same devices, same cluster -> same pool."""
        return (self.load, self.devices, self.ray_address)

    def device_groups(self) -> tuple[DeviceSet, ...]:
        """The GPU groups, each a ``DeviceSet`` that runs one generation (validated by ``check_groups``)."""
        dev = self.devices
        if dev.groups:
            return tuple(dev.subset(g) for g in dev.groups)
        if self.group_size > 0 and dev.world_size > self.group_size:
            n = self.group_size
            return tuple(dev.subset(dev.ids[i : i + n]) for i in range(0, dev.world_size, n))
        return (dev,)

    def for_group(self, group: DeviceSet) -> DispatcherSpec:
        """This spec on one of its groups (what the engine builds one pool for)."""
        return dataclasses.replace(self, devices=group, group_size=0, group_weights=())

    def check_groups(self) -> None:
        """Raise ``ConfigError`` (naming the field and the fix) for groups that cannot be formed."""
        n, size = self.devices.world_size, self.group_size
        if size < 0:
            raise ConfigError("gpus_per_group", f"is {size}", "Use 0 (one group, or the groups in gpu_devices) or more")
        if self.devices.groups and size:
            raise ConfigError("gpus_per_group", f"is {size} but gpu_devices already gives groups with |",
                              "Set gpus_per_group to 0, or list the devices without |")
        if size and n and n % size:
            raise ConfigError("gpus_per_group", f"is {size}, which does not divide the {n} listed devices",
                              f"Use a divisor of {n}, or list the groups explicitly as in \"0,1|2,3\"")
        groups = len(self.device_groups())
        if self.group_weights:
            if len(self.group_weights) != groups or any(w <= 0 for w in self.group_weights):
                raise ConfigError("group_weights", f"gives {len(self.group_weights)} weight(s) for {groups} group(s)",
                                  f"Give {groups} positive numbers separated by commas, or leave it empty")
