"""What a plan is made of: how the model trains (:class:`TrainSetup`), the device's rates
(:class:`DeviceSpec`), the plan a memory model sees (:class:`PlanInput`), and what it predicts
(:class:`MemoryEstimate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from hf_lowmem.errors import PluginError
from hf_lowmem.planner.shapes import ModelShape
from hf_lowmem.sizes import MiB, gib
from hf_lowmem.spec import PREPARE_STAGES

#: the order in which plugin memory models are applied (the order in which plugins prepare the model)
KIND_ORDER = PREPARE_STAGES

#: GPU components, in the order tables show them
GPU_COMPONENTS = ("weights", "gradients", "optimizer states", "activations", "logits", "temporaries",
                  "transfer buffers", "framework overhead")


class PlanRefused(PluginError):
    """Raised by a plugin's memory model when the plugin would refuse to run this plan (the planner drops it)."""


PRECISIONS = ("bf16-mixed", "bf16", "fp32", "fp16-mixed", "fp16")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")


@dataclass(frozen=True)
class TrainSetup:
    """How the model trains.

    :param micro_batch: sequences per micro-batch (``per_device_train_batch_size``).
    :param seq_len: tokens per sequence.
    :param grad_accum: micro-batches per optimizer step.
    :param precision: ``bf16-mixed`` (fp32 weights, bf16 autocast: ``Trainer(bf16=True)`` on an fp32 model),
        ``bf16`` (bf16 weights), ``fp32``; ``fp16-mixed`` / ``fp16`` count like their bf16 twins.
    :param attn_impl: ``sdpa`` (flash kernel), ``flash_attention_2`` or ``eager``.
    :param device: ``cuda`` or ``cpu`` (the CPU has no CUDA context and uses unfused optimizer kernels).
    :param max_grad_norm: gradient clipping (``0`` = off).
    :param gradient_checkpointing: the Trainer's own ``gradient_checkpointing=True`` (every layer).
    """

    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    precision: str = "bf16-mixed"
    attn_impl: str = "sdpa"
    device: str = "cuda"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for f in ("micro_batch", "seq_len", "grad_accum"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PluginError(f"{f} must be a positive integer, got {v!r}")
        if self.precision not in PRECISIONS:
            raise PluginError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise PluginError(f"attention implementation must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.device not in ("cuda", "cpu"):
            raise PluginError(f"device must be cuda or cpu, got {self.device!r}")

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def window_tokens(self) -> int:
        return self.tokens * self.grad_accum

    @property
    def param_bytes(self) -> int:
        return 4 if self.precision in ("bf16-mixed", "fp32", "fp16-mixed") else 2

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def amp(self) -> bool:
        return self.precision.endswith("-mixed")

    def describe(self) -> str:
        ga = f" x {self.grad_accum} accumulation" if self.grad_accum > 1 else ""
        return (f"micro-batch {self.micro_batch} x seq {self.seq_len}{ga}, {self.precision}, attention {self.attn_impl}"
                f"{', gradient_checkpointing=True' if self.gradient_checkpointing else ''}")


@dataclass(frozen=True)
class DeviceSpec:
    """The rates the speed model uses. Defaults: our H200, measured (``shared/notes/measurements.md``)."""

    name: str = "H200 (measured rates)"
    #: dense bf16 matmul, TFLOP/s (measured 784; spec 989)
    matmul_tflops: float = 784.0
    #: fraction of that a plain Trainer step reaches (7B, seq 2048, micro-batch 4: 10,660 tokens/s)
    train_efficiency: float = 0.55
    #: fp32 matmul without TF32 (used for precision="fp32")
    fp32_tflops: float = 60.0
    h2d_gbps: float = 55.3
    d2h_gbps: float = 55.2
    duplex_gbps: float = 100.7
    hbm_gbps: float = 4800.0
    #: CUDA context + kernel images: on the GPU but outside torch's allocator
    context_bytes: int = 600 * MiB
    #: the disk(s) the stream engine's SSD tier may use: free bytes and sequential GB/s of each, and how many
    #: (``None``: no disk to plan with, so no SSD tier is considered)
    disk_bytes: int | None = None
    disk_gbps: float | None = None
    disks: int = 1

    def __post_init__(self):
        import math

        for f in ("matmul_tflops", "train_efficiency", "fp32_tflops", "h2d_gbps", "d2h_gbps", "duplex_gbps", "hbm_gbps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PluginError(f"{f} must be a positive finite rate, got {v!r}: a rate of 0 would make every step "
                                  "take forever")

    def flops_rate(self, setup: TrainSetup) -> float:
        tf = self.fp32_tflops if setup.precision == "fp32" else self.matmul_tflops
        return tf * 1e12 * self.train_efficiency


DEFAULT_DEVICE = DeviceSpec()


@dataclass
class MemoryEstimate:
    """Where memory goes at the peak of a training step, in bytes.

    :param gpu: component -> bytes at the moment of the GPU peak; the sum is the predicted
        ``torch.cuda.max_memory_allocated``. Components: see :data:`GPU_COMPONENTS` (others allowed).
    :param gpu_extra: GPU memory outside torch's allocated count: CUDA context, allocator slack
        (reserved minus allocated), paged memory. ``gpu_total`` adds it; budgets are checked against that.
    :param host: component -> bytes of host RAM at the host peak.
    :param peak_phase: when the GPU peak happens (e.g. ``"backward, layer 31"``).
    :param speed: throughput relative to the same model with unlimited GPU memory (1.0 = plain GPU training
        with fused AdamW and no recompute), or ``None`` when unknown.
    :param seconds_per_step: modelled seconds per optimizer step on the planner's :class:`DeviceSpec`.
    :param notes: assumptions and caveats worth showing.
    :param speed_notes: why the speed is what it is.
    """

    gpu: dict[str, int] = field(default_factory=dict)
    gpu_extra: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    speed: float | None = None
    seconds_per_step: float | None = None
    notes: list[str] = field(default_factory=list)
    speed_notes: list[str] = field(default_factory=list)
    #: an engine's disk traffic per step and the files it keeps (the stream engine's SSD tier), or ``None``
    disk: dict | None = None

    @property
    def gpu_peak_allocated(self) -> int:
        return int(sum(self.gpu.values()))

    @property
    def gpu_total(self) -> int:
        return int(self.gpu_peak_allocated + sum(self.gpu_extra.values()))

    @property
    def host_total(self) -> int:
        return int(sum(self.host.values()))

    def replace(self, **changes: Any) -> "MemoryEstimate":
        """A copy with fields replaced (dicts and lists are copied, so the original is unchanged)."""
        new = dataclasses.replace(self, gpu=dict(self.gpu), gpu_extra=dict(self.gpu_extra), host=dict(self.host),
                                  notes=list(self.notes), speed_notes=list(self.speed_notes))
        for k, v in changes.items():
            setattr(new, k, v)
        return new

    def to_dict(self) -> dict:
        return {
            "gpu_peak_allocated_gib": round(gib(self.gpu_peak_allocated), 3),
            "gpu_total_gib": round(gib(self.gpu_total), 3),
            "host_total_gib": round(gib(self.host_total), 3),
            "gpu_gib": {k: round(gib(v), 3) for k, v in self.gpu.items()},
            "gpu_extra_gib": {k: round(gib(v), 3) for k, v in self.gpu_extra.items()},
            "host_gib": {k: round(gib(v), 3) for k, v in self.host.items()},
            "peak_phase": self.peak_phase,
            "speed": None if self.speed is None else round(self.speed, 3),
            "seconds_per_step": None if self.seconds_per_step is None else round(self.seconds_per_step, 3),
            "notes": list(self.notes), "speed_notes": list(self.speed_notes),
            **({"disk": {k: round(v, 3) if isinstance(v, float) else v for k, v in self.disk.items()}}
               if self.disk else {}),
        }


@dataclass(frozen=True)
class PlanInput:
    """What a memory model sees: the model, how it trains, the device rates, and the selected plugins
    (``selection``: kind -> names; ``options``: name -> parsed options dataclass or ``None``; ``mode``: the
    distributed mode the plan runs in, as :func:`hf_lowmem.context.distributed_mode` names it)."""

    shape: ModelShape
    setup: TrainSetup
    selection: Mapping[str, tuple[str, ...]]
    options: Mapping[str, Any] = field(default_factory=dict)
    device: DeviceSpec = DEFAULT_DEVICE
    mode: str = "single"

    def names(self) -> list[str]:
        return [n for k in KIND_ORDER for n in self.selection.get(k, ())]

    def has(self, name: str) -> bool:
        return name in self.names()

    def selected(self, kind: str) -> str | None:
        names = self.selection.get(kind) or ()
        return names[0] if names else None

    def option(self, name: str, key: str, default: Any) -> Any:
        opts = self.options.get(name)
        return getattr(opts, key, default) if opts is not None else default

    def label(self) -> str:
        parts = []
        for n in self.names():
            o = self.options.get(n)
            changed = changed_options(o)
            parts.append(n + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else ""))
        return " + ".join(parts) or "(no plugin: the Trainer's defaults)"


def changed_options(opts: Any) -> dict[str, Any]:
    if opts is None or not dataclasses.is_dataclass(opts):
        return {}
    out = {}
    try:
        defaults = type(opts)()  # defaults after __post_init__ normalisation
    except Exception:
        defaults = None
    for f in dataclasses.fields(opts):
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if getattr(opts, f.name) != default:
            out[f.name] = getattr(opts, f.name)
    return out
