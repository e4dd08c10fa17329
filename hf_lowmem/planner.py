"""The memory planner: where GPU and host memory go when a model trains, and which plugins make it fit.

Three layers, each usable on its own:

1. **Shapes.** :func:`load_model_shape` reads a model's configuration (a preset name such as
   ``llama2-7b``, a ``config.json``, a model folder, a hub id that is cached, a ``PretrainedConfig``
   or a model object) and instantiates it on the ``meta`` device to count parameters exactly, block by
   block, without allocating or loading a single weight. :class:`TrainSetup` says how it trains
   (micro-batch, sequence length, gradient accumulation, precision, attention kernel).

2. **Estimates.** :func:`estimate_memory` turns a shape, a setup and a plugin selection into a
   :class:`MemoryEstimate`: the peak GPU memory *as ``torch.cuda.max_memory_allocated`` counts it*,
   split into weights, gradients, optimizer states, activations, logits, temporaries, transfer buffers
   and framework overhead; what the allocator does not count (CUDA context, allocator slack, paged
   memory); and the host memory. The GPU peak comes from a replay of one training step, tensor class
   by tensor class: forward stores each layer's saved activations (counted per operation of a Llama-style
   decoder layer: the same bytes autograd's saved-tensor hooks see), the loss materialises the logits,
   backward releases activations while gradients appear, the optimizer step adds its temporaries;
   the second micro-batch of an accumulation window starts with all gradients present. The peak is the
   largest of those moments, and the breakdown is taken at that moment.

   Each plugin's effect is a *memory model* keyed by its name: the first-party plugins' models live
   here (:data:`BUILTIN_MODELS`); any plugin can supply or override one through the
   ``hf_lowmem_estimate_memory`` hook (see :mod:`hf_lowmem.spec`), which receives the estimate so far
   and returns a replacement.

3. **Plans.** :func:`plan_training` enumerates the combinations of registered plugins, estimates each,
   gives each a relative speed (a step-time model: FLOPs at the device's rate, recompute, optimizer
   memory traffic, host<->GPU copies that compute cannot hide), and picks the fastest that fits the GPU
   and host budgets; among plans within 5% of the fastest, lossless ones come first. It keeps the
   rejected alternatives with the reason, and the smallest budget that any plan meets.

Sizes are read by :func:`hf_lowmem.sizes.parse_size`: ``"8GiB"`` is 8 x 2^30 bytes, ``"8GB"`` 8 x 10^9, as
written. Every reported number is in GiB.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from hf_lowmem.errors import MemoryBudgetError, PluginError

GiB = 2**30
MiB = 2**20

#: the order in which plugin memory models are applied (the same as ``hf_lowmem_prepare_model``)
KIND_ORDER = ("quantization", "attention", "offload", "optimizer")

#: GPU components, in the order tables show them
GPU_COMPONENTS = ("weights", "gradients", "optimizer states", "activations", "logits", "temporaries",
                  "transfer buffers", "framework overhead")


# =====================================================================================================
# sizes
# =====================================================================================================
from hf_lowmem.sizes import fmt_count, parse_size  # noqa: E402,F401  (re-exported: the one size parser)


def gib(nbytes: float) -> float:
    return nbytes / GiB


def fmt_gib(nbytes: float, digits: int = 2) -> str:
    return f"{nbytes / GiB:.{digits}f}"


def fmt_size(nbytes: float) -> str:
    """``8.00 GiB``, ``536.0 MiB``, ``12.0 KiB``: readable at any scale."""
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= mult:
            return f"{nbytes / mult:.2f} {unit}" if unit == "GiB" else f"{nbytes / mult:.1f} {unit}"
    return f"{int(nbytes)} B"


def gib_up(nbytes: float) -> float:
    """``nbytes`` in GiB, rounded up to 0.1 (a budget that is at least ``nbytes``)."""
    return math.ceil(nbytes / GiB * 10 - 1e-9) / 10


def size_arg(nbytes: float) -> str:
    """A budget argument at least ``nbytes``: GiB rounded up to 0.1, or MiB for less than 1 GiB."""
    if nbytes >= GiB:
        return f"{gib_up(nbytes):g}GiB"
    return f"{max(1, math.ceil(nbytes / MiB))}MiB"


# =====================================================================================================
# model shapes
# =====================================================================================================
#: configurations of well-known models, so that planning works offline (values from their config.json)
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                     tie_word_embeddings=True, max_position_embeddings=131072),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False, max_position_embeddings=2048),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=4096),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=32768),
}
_ALIASES = {"llama-2-7b": "llama2-7b", "llama2": "llama2-7b", "llama-2-13b": "llama2-13b", "llama-3-8b": "llama3-8b",
            "llama3.1-8b": "llama3-8b", "llama-3.2-1b": "llama-1b", "llama3.2-1b": "llama-1b", "llama-3.2-3b": "llama-3b",
            "llama3.2-3b": "llama-3b", "smollm2": "smollm2-135m", "smollm-135m": "smollm2-135m",
            "mistral-7b-v0.1": "mistral-7b", "qwen2.5-0.5b": "qwen2.5-0.5b"}

_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers")
_NORM_PATHS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "decoder.norm")


@dataclass(frozen=True)
class ModelShape:
    """The parameter layout of a causal LM, counted on the meta device. Byte counts elsewhere are
    derived from these numbers; nothing here depends on dtypes."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params_total: int
    #: parameters of each decoder layer
    layer_params: tuple[int, ...]
    #: the 2-D weights of one decoder layer: (name, (rows, cols))
    layer_matrices: tuple[tuple[str, tuple[int, int]], ...]
    embed_params: int
    #: LM head parameters not shared with the embedding (0 when tied)
    head_params: int
    #: final norm and anything outside embedding, layers and head
    other_params: int
    #: the decoder layer looks like Llama's (q/k/v/o projections, gated MLP, RMSNorm)
    llama_like: bool = True
    gated_mlp: bool = True
    max_positions: int = 0

    @property
    def linear_layer_params(self) -> int:
        """Parameters of one layer that sit in 2-D weights (projections)."""
        return sum(r * c for _, (r, c) in self.layer_matrices)

    @property
    def largest_param(self) -> int:
        mats = [r * c for _, (r, c) in self.layer_matrices] or [0]
        return max(max(mats), self.embed_params, self.head_params)

    def block_params(self) -> list[int]:
        """[embedding, layer 1..N, final norm + head] as the stream engine schedules them."""
        return [self.embed_params, *self.layer_params, self.head_params + self.other_params]

    def describe(self) -> str:
        gqa = f", {self.n_kv_heads} KV heads" if self.n_kv_heads != self.n_heads else ""
        return (f"{self.name}: {fmt_count(self.params_total)} params ({self.model_type}, {self.n_layers} layers, "
                f"hidden {self.hidden}, MLP {self.intermediate}, {self.n_heads} heads{gqa}, vocab {self.vocab}"
                f"{', tied embeddings' if self.tied else ''})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_params"] = list(self.layer_params)[:1] + (["..."] if self.n_layers > 1 else [])
        d["layer_matrices"] = [[n, list(s)] for n, s in self.layer_matrices]
        return d


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, **overrides: Any):
    """A ``PretrainedConfig`` for a preset name (``llama2-7b``, ``smollm2-135m``, ...)."""
    from transformers import AutoConfig

    key = _preset_key(name)
    if key is None:
        raise PluginError(f"unknown model preset {name!r}; presets: {', '.join(preset_names())}")
    kw = dict(PRESETS[key])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.name_or_path = key
    return cfg


def _preset_key(name: str) -> str | None:
    k = str(name).strip().lower().replace("_", "-")
    k = k.split("/")[-1]
    k = _ALIASES.get(k, k)
    return k if k in PRESETS else None


def load_model_shape(spec: Any, **config_overrides: Any) -> ModelShape:
    """Read a model's parameter layout without loading weights.

    ``spec``: a :class:`ModelShape`; a model object (its parameters are counted where they are); a
    ``PretrainedConfig``; or a string: a preset name (:data:`PRESETS`), a ``config.json`` path, a model
    folder, or a hub id (read from the local cache when offline). ``config_overrides`` change config
    fields first (e.g. ``num_hidden_layers=16`` for a slice)."""
    if isinstance(spec, ModelShape):
        if config_overrides:
            raise PluginError("config overrides need a config, not a ModelShape")
        return spec
    if hasattr(spec, "parameters") and hasattr(spec, "config") and not config_overrides:
        return shape_from_model(spec)
    if hasattr(spec, "to_dict") and hasattr(spec, "model_type"):  # a PretrainedConfig
        cfg = spec
        if config_overrides:
            cfg = type(cfg).from_dict({**cfg.to_dict(), **config_overrides})
        return shape_from_config(cfg)
    if hasattr(spec, "parameters") and hasattr(spec, "config"):
        return load_model_shape(spec.config, **config_overrides)
    if not isinstance(spec, (str, os.PathLike)):
        raise PluginError(f"cannot read a model shape from {type(spec).__name__}; give a preset name, a config.json,"
                          " a model folder or a PretrainedConfig")
    text = os.fspath(spec)
    if _preset_key(text) is not None and not os.path.exists(text):
        return shape_from_config(preset_config(text, **config_overrides))
    from transformers import AutoConfig

    try:
        if os.path.isfile(text):
            with open(text) as f:
                raw = json.load(f)
            if "model_type" not in raw:
                raise PluginError(f"{text} has no model_type, so its architecture is unknown; add \"model_type\": \"llama\""
                                  " (or the right type) to it")
            raw.update(config_overrides)
            model_type = raw.pop("model_type")
            raw.pop("architectures", None)
            raw.pop("transformers_version", None)
            cfg = AutoConfig.for_model(model_type, **raw)
            cfg.name_or_path = os.path.basename(os.path.dirname(os.path.abspath(text))) or text
        else:
            cfg = AutoConfig.from_pretrained(text, **config_overrides)
    except PluginError:
        raise
    except Exception as e:  # OSError offline, ValueError for an unknown model type, ...
        raise PluginError(
            f"cannot read a model configuration from {text!r} ({type(e).__name__}: {e}). Give a config.json, a model "
            f"folder with one, a hub id that is in the local cache, or a preset: {', '.join(preset_names())}"
        ) from e
    return shape_from_config(cfg)


def shape_from_config(config: Any) -> ModelShape:
    """Instantiate the model on the meta device (no memory, no weights) and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise PluginError(
            f"cannot build {getattr(config, 'model_type', '?')!r} on the meta device to count its parameters "
            f"({type(e).__name__}: {e}); is it a causal LM that transformers knows?"
        ) from e
    return shape_from_model(model, name=getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"))


def _get(module: Any, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def shape_from_model(model: Any, name: str | None = None) -> ModelShape:
    """Count the parameters of a model object (on any device, including meta)."""
    from torch import nn

    cfg = model.config
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = next((m for p in _LAYER_PATHS if isinstance(m := _get(base, p), nn.ModuleList)), None)
    if layers is None or len(layers) == 0:
        raise PluginError(f"{type(model).__name__}: cannot find its decoder layers (a ModuleList at "
                          f"{', '.join(_LAYER_PATHS)}); the planner needs a decoder-only causal LM")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()

    def count(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embed_n = count(embed.parameters()) if embed is not None else 0
    layer_n = tuple(count(layer.parameters()) for layer in layers)
    head_n = count(head.parameters()) if head is not None else 0
    other_n = count(model.parameters())
    tied = head is not None and embed is not None and head_n == 0 and head.weight is embed.weight
    mats = tuple((n, (int(p.shape[0]), int(p.shape[1]))) for n, p in layers[0].named_parameters() if p.dim() == 2)
    names = {n.rsplit(".", 2)[-2] if n.count(".") else n for n, _ in mats}
    llama_like = {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    gated = {"gate_proj", "up_proj", "down_proj"} <= names or "gate_up_proj" in names
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or (embed.embedding_dim if embed else 0))
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    n_kv = int(getattr(cfg, "num_key_value_heads", 0) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // n_heads)
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0) or (embed.num_embeddings if embed is not None else 0))
    total = embed_n + sum(layer_n) + head_n + other_n
    return ModelShape(
        name=name or getattr(cfg, "name_or_path", "") or getattr(cfg, "model_type", "model"),
        model_type=str(getattr(cfg, "model_type", "?")), n_layers=len(layers), hidden=hidden, intermediate=inter,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab=vocab, tied=tied, params_total=total,
        layer_params=layer_n, layer_matrices=mats, embed_params=embed_n, head_params=head_n, other_params=other_n,
        llama_like=llama_like, gated_mlp=gated, max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )


# =====================================================================================================
# how it trains, and on what
# =====================================================================================================
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

    def flops_rate(self, setup: TrainSetup) -> float:
        tf = self.fp32_tflops if setup.precision == "fp32" else self.matmul_tflops
        return tf * 1e12 * self.train_efficiency


DEFAULT_DEVICE = DeviceSpec()


# =====================================================================================================
# estimates
# =====================================================================================================
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
        }


@dataclass(frozen=True)
class PlanInput:
    """What a memory model sees: the model, how it trains, the device rates, and the selected plugins
    (``selection``: kind -> names; ``options``: name -> parsed options dataclass or ``None``)."""

    shape: ModelShape
    setup: TrainSetup
    selection: Mapping[str, tuple[str, ...]]
    options: Mapping[str, Any] = field(default_factory=dict)
    device: DeviceSpec = DEFAULT_DEVICE

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
            changed = _changed_options(o)
            parts.append(n + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else ""))
        return " + ".join(parts) or "(no plugin: the Trainer's defaults)"


def _changed_options(opts: Any) -> dict[str, Any]:
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


# ---- the replay of one training step ----------------------------------------------------------------
@dataclass
class _Step:
    """The tensor classes of one training step, in bytes (the input of :func:`_replay`)."""

    weights: float = 0.0  # resident on the GPU
    states: float = 0.0  # optimizer states on the GPU (allocated at the first step)
    states_paged: float = 0.0  # paged states: in managed memory, outside torch's allocated count
    grad_layer: list[float] = field(default_factory=list)
    grad_embed: float = 0.0
    grad_head: float = 0.0  # LM head (0 when tied: the embedding's gradient is allocated there)
    grad_other: float = 0.0
    grad_free_per_param: bool = False  # layer-wise optimizers: a gradient is freed as soon as it is used
    largest_grad: float = 0.0
    largest_grad_layer: float = 0.0  # the largest weight gradient of a decoder layer
    acts: list[float] = field(default_factory=list)  # saved activations per layer
    ckpt: list[float] = field(default_factory=list)  # per layer: checkpoint bytes if checkpointed, else 0
    recompute: list[bool] = field(default_factory=list)
    cache: list[float] = field(default_factory=list)  # autocast bf16 weight copies per layer
    head_acts: float = 0.0  # final norm + LM-head input cast + cos/sin + ids
    head_cache: float = 0.0
    logits_fwd: float = 0.0
    logits_bwd: float = 0.0
    bwd_ws: list[tuple[float, float]] = field(default_factory=list)  # (MLP stage, attention stage)
    mlp_frac: float = 0.5  # share of a layer's saved activations in its MLP half
    grad_mlp_frac: float = 0.5  # share of a layer's weight gradients in its MLP
    first_mlp_grad: float = 0.0
    first_attn_grad: float = 0.0
    fwd_ws: list[float] = field(default_factory=list)
    embed_bwd_ws: float = 0.0
    opt_ws: float = 0.0  # optimizer-step temporaries
    clip_ws: float = 0.0
    offload_acts: bool = False  # saved activations go to host memory
    offload_window: float = 0.0  # bytes of offloaded tensors on the GPU at a time (in flight / prefetched)
    offload_pending: float = 0.0  # in forward, at most this many bytes of GPU tensors wait for their copy out
    overhead: float = 0.0  # allocated framework memory (cuBLAS workspaces)
    transfer: float = 0.0
    host: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # what the speed model needs
    opt_bytes_per_param: float = 0.0  # optimizer memory traffic per parameter
    opt_kernel_factor: float = 1.0
    opt_extra_seconds: float = 0.0
    h2d_bytes: float = 0.0  # host->GPU bytes per optimizer step that compute must hide
    d2h_bytes: float = 0.0
    dequant_bytes: float = 0.0


def _layer_activation_parts(shape: ModelShape, setup: TrainSetup, tokens: int) -> tuple[float, float]:
    """Bytes autograd saves for one decoder layer over ``tokens`` tokens (one micro-batch), as
    (attention half, MLP half).

    Counted per operation of a Llama-style layer as transformers implements it (verified against
    ``torch.autograd.graph.saved_tensors_hooks`` byte counts in ``tests/test_planner.py``):
    each RMSNorm saves its input upcast to fp32 and its normalised output (residual dtype); the projections
    save their input (under autocast each projection casts it separately); attention saves q, k, v, the
    output and the fp32 log-sum-exp (eager attention: the fp32 softmax and its cast, S x S per head);
    the gated MLP saves gate, act(gate), up and their product."""
    H, I = shape.hidden, shape.intermediate
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    e, r, amp = setup.compute_bytes, (4 if setup.param_bytes == 4 else 2), setup.amp
    S = setup.seq_len
    norm = 4 * H + r * H + 4  # fp32 input, normalised output, rsqrt
    z_attn = 3 * 2 * H if amp else e * H
    z_mlp = 2 * 2 * H if amp else e * H
    if setup.attn_impl == "eager":
        attn = e * qd + 2 * e * qd + 4 * shape.n_heads * S + (e * shape.n_heads * S if e != 4 else 0) + e * qd
    else:
        attn = e * (2 * qd + 2 * kvd) + 4 * shape.n_heads
    mlp = (4 if shape.gated_mlp else 2) * I * e
    return (norm + z_attn + attn) * tokens, (norm + z_mlp + mlp) * tokens


def _layer_activation_bytes(shape: ModelShape, setup: TrainSetup, tokens: int) -> float:
    a, m = _layer_activation_parts(shape, setup, tokens)
    return a + m


def _layer_backward_workspace(shape: ModelShape, setup: TrainSetup, tokens: int) -> tuple[float, float]:
    """Temporaries of one layer's backward beyond its saved activations and weight gradients, as
    (MLP stage, attention stage). MLP: the gradients of both factors of the gated product while those
    factors are still saved, and the incoming gradient of the residual stream. Attention: the gradients
    of q, k, v (FlashAttention's backward on CUDA expands k, v to every head and accumulates dq in fp32)
    and of the output."""
    e = setup.compute_bytes
    r = 4 if setup.param_bytes == 4 else 2
    H, I = shape.hidden, shape.intermediate
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    mlp = 2 * I * e + H * r
    if setup.device == "cuda" and setup.attn_impl != "eager":
        attn = e * 3 * qd + 4 * qd + e * qd + H * r
    else:
        attn = e * (qd + 2 * kvd) + e * qd + H * r
    return mlp * tokens, attn * tokens


def _layer_forward_workspace(shape: ModelShape, setup: TrainSetup, tokens: int) -> float:
    """Temporaries of one layer's forward: the rotary-embedding products and the fp32 normalised input
    (under autocast, before its casts), or the MLP's intermediates of a layer whose activations are not
    kept (checkpointed)."""
    r = 4 if setup.param_bytes == 4 else 2
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return max(r * shape.hidden + 2 * r * (qd + kvd), 3 * shape.intermediate * setup.compute_bytes) * tokens


def _base_step(inp: PlanInput) -> _Step:
    """The Trainer's default step (no plugin): weights, gradients and AdamW states in the parameter dtype,
    every layer's activations kept for backward, the logits materialised by transformers' loss."""
    sh, su = inp.shape, inp.setup
    pb, T, L = su.param_bytes, su.tokens, sh.n_layers
    st = _Step()
    st.weights = sh.params_total * pb
    st.grad_layer = [p * pb for p in sh.layer_params]
    st.grad_embed = sh.embed_params * pb
    st.grad_head = sh.head_params * pb
    st.grad_other = sh.other_params * pb
    st.largest_grad = sh.largest_param * pb
    st.largest_grad_layer = max((r * c for _, (r, c) in sh.layer_matrices), default=0) * pb
    a = _layer_activation_bytes(sh, su, T)
    st.acts = [a] * L
    st.ckpt = [0.0] * L
    st.recompute = [False] * L
    st.cache = [2.0 * sh.linear_layer_params if su.amp else 0.0] * L
    r = 4 if pb == 4 else 2
    z_head = 2 * sh.hidden if su.amp else su.compute_bytes * sh.hidden
    st.head_acts = T * (4 * sh.hidden + r * sh.hidden + 4 + z_head + 16) + 2 * su.seq_len * sh.head_dim * r
    st.head_cache = 2.0 * sh.vocab * sh.hidden if su.amp else 0.0
    V = sh.vocab
    # loss forward: logits (compute dtype), their fp32 copy, the fp32 log-softmax;
    # loss backward: the saved log-softmax, its incoming gradient and the gradient of the logits (all fp32)
    st.logits_fwd = T * V * (4 + 4 + (su.compute_bytes if su.compute_bytes != 4 else 0))
    st.logits_bwd = T * V * 12
    st.bwd_ws = [_layer_backward_workspace(sh, su, T)] * L
    a_attn, a_mlp = _layer_activation_parts(sh, su, T)
    st.mlp_frac = a_mlp / max(1.0, a_attn + a_mlp)
    mlp_mats = [r * c for n, (r, c) in sh.layer_matrices if _is_mlp(n)]
    attn_mats = [r * c for n, (r, c) in sh.layer_matrices if not _is_mlp(n)]
    st.grad_mlp_frac = (sum(mlp_mats) * pb / max(1.0, st.grad_layer[0])) if st.grad_layer else 0.0
    st.first_mlp_grad = (mlp_mats[-1] if mlp_mats else 0) * pb  # down_proj: the first one backward meets
    st.first_attn_grad = (attn_mats[-1] if attn_mats else 0) * pb  # o_proj
    st.fwd_ws = [_layer_forward_workspace(sh, su, T)] * L
    st.embed_bwd_ws = T * sh.hidden * 4
    if su.gradient_checkpointing:
        _checkpoint_layers(inp, st, every_n=1)
    st.overhead = 64 * MiB if su.device == "cuda" else 0
    st.clip_ws = 0.0
    # host: the process itself, and the model while it is loaded and before the Trainer moves it
    st.host["framework (Python, PyTorch, CUDA libraries)"] = (3 * GiB) if su.device == "cuda" else 1 * GiB
    st.host["weights while loading (before the move to the GPU)"] = sh.params_total * pb if su.device == "cuda" else 0
    if su.device == "cpu":
        st.notes.append("device cpu: everything is host memory; 'GPU' figures are the training tensors")
    if not sh.llama_like:
        st.notes.append(f"{sh.model_type}: activations counted as for a Llama-style layer (q/k/v/o, gated MLP);"
                        " this architecture differs, so treat them as approximate")
    return st


def _is_mlp(param_name: str) -> bool:
    return bool(re.search(r"mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|w1|w2|w3", param_name))


def _checkpoint_layers(inp: PlanInput, st: _Step, every_n: int) -> None:
    sh, su = inp.shape, inp.setup
    r = 4 if su.param_bytes == 4 else 2
    for i in range(sh.n_layers):
        if i % every_n == 0:
            st.recompute[i] = True
            st.ckpt[i] = su.tokens * sh.hidden * r


# ---- first-party plugin memory models ----------------------------------------------------------------
def _m_checkpointing(inp: PlanInput, st: _Step, name: str) -> None:
    n = int(inp.option(name, "every_n", 1))
    _checkpoint_layers(inp, st, max(1, n))


def _m_activation_offload(inp: PlanInput, st: _Step, name: str) -> None:
    target = inp.option(name, "target", "cpu")
    prefetch = float(inp.option(name, "prefetch_bytes", 128 * MiB))
    keep = inp.option(name, "keep_bytes", None)
    st.offload_acts = True
    # on the GPU at a time: the layer being computed plus what backward prefetches, plus the forward's newest
    # tensors, which are never offloaded (keep_bytes, default prefetch_bytes: 128 + 128 MiB by default)
    st.offload_window = prefetch + (prefetch if keep is None else float(keep))
    # a forward can produce activations faster than PCIe copies them out: they wait on the GPU, up to the cap
    st.offload_pending = float(inp.option(name, "max_pending_bytes", 1 << 30)) or float("inf")
    stored = sum(c if r else a for a, c, r in zip(st.acts, st.ckpt, st.recompute))
    if target == "cpu":
        st.host["activations offloaded (pinned)"] = stored
    else:
        st.host["activation staging (pinned; the rest on disk)"] = min(stored, 2 * prefetch + 2 * max(st.acts or [0]))
        st.notes.append("activation-offload to disk: host RAM holds only staging buffers")
    st.d2h_bytes += stored * inp.setup.grad_accum
    st.h2d_bytes += stored * inp.setup.grad_accum


def _m_chunked_loss(inp: PlanInput, st: _Step, name: str) -> None:
    """The plugin's autograd function: forward keeps per-chunk loss sums (one chunk's logits, their fp32
    copy and log-softmax at a time); backward allocates the hidden-state gradient and an fp32 head-weight
    gradient, then per chunk recomputes the logits (compute dtype), their fp32 copy, the softmax gradient
    and its cast back."""
    su = inp.setup
    C = min(int(inp.option(name, "chunk_size", 1024)), su.tokens)
    V, H, T = inp.shape.vocab, inp.shape.hidden, su.tokens
    e = su.compute_bytes
    per_row_fwd = (e + 4 + 4) if e != 4 else 8
    per_row_bwd = (2 * e + 8) if e != 4 else 8
    cast = 2 * V * H if su.amp else 0  # autocast's bf16 copy of the head weight, while a chunk runs
    st.logits_fwd = C * V * per_row_fwd + cast
    st.logits_bwd = T * H * e + V * H * 4 + C * V * per_row_bwd + cast
    st.head_cache = 0.0


def _m_int8_weights(inp: PlanInput, st: _Step, name: str) -> None:
    sh, su = inp.shape, inp.setup
    block = int(inp.option(name, "block_size", 128))
    master = 2 if inp.option(name, "master_dtype", "float32") == "bfloat16" else 4
    lin = sh.linear_layer_params * sh.n_layers
    rows = sum(r for _, (r, _c) in sh.layer_matrices) * sh.n_layers
    scales = lin / block * 4 if block else rows * 4
    st.weights += lin * 1 + scales - lin * su.param_bytes
    if inp.option(name, "include_lm_head", False) and sh.head_params:
        st.weights += sh.head_params * (1 + 4 / max(block, 1) - su.param_bytes)
    st.cache = [0.0] * sh.n_layers  # the dequantised weights are not autocast-cached leaves
    big = max((r * c for _, (r, c) in sh.layer_matrices), default=0)
    st.fwd_ws = [w + big * (4 + su.compute_bytes) for w in st.fwd_ws]
    st.bwd_ws = [(a + big * (4 + su.compute_bytes), b + big * (4 + su.compute_bytes)) for a, b in st.bwd_ws]
    # the update runs one layer at a time on dequantised masters (and upcast gradients)
    st.opt_ws += sh.linear_layer_params * (master + 4)
    st.dequant_bytes += lin * (1 + su.compute_bytes) * 3  # forward, backward, write-back
    st.notes.append(f"int8-weights: decoder projections stored int8 + an fp32 scale per {block or 'row'} columns; "
                    "gradients in the model's dtype; one layer's masters exist during its update")


def _adamw_states(inp: PlanInput, st: _Step) -> None:
    pb = inp.setup.param_bytes
    st.states = 2 * inp.shape.params_total * pb
    st.opt_bytes_per_param = 3 * pb + 4 * pb  # read p, g, m, v; write p, m, v
    if inp.setup.device == "cpu":
        st.opt_ws = 2 * inp.shape.largest_param * pb  # single-tensor kernel: sqrt(v) and the update


def _m_adamw(inp: PlanInput, st: _Step, name: str) -> None:
    _adamw_states(inp, st)


def _bnb8_state_bytes(n: int, min_8bit: int = 4096, states: int = 2) -> float:
    """Bytes of ``states`` bitsandbytes optimizer states for a tensor of ``n`` elements: 1 byte each plus a
    fp32 absmax per 256-element block; tensors under ``min_8bit`` elements keep fp32 states."""
    if n < min_8bit:
        return 4.0 * states * n
    return states * (n + 4 * math.ceil(n / 256))


def _all_param_sizes(sh: ModelShape) -> Iterable[tuple[str, int]]:
    """(kind, numel) of every parameter tensor: kind is ``layer``, ``vector``, ``embed``, ``head`` or ``other``."""
    vec = sh.layer_params[0] - sh.linear_layer_params if sh.layer_params else 0
    for _ in range(sh.n_layers):
        for _, (r, c) in sh.layer_matrices:
            yield "layer", r * c
        if vec:
            yield "vector", vec
    yield "embed", sh.embed_params
    if sh.head_params:
        yield "head", sh.head_params
    if sh.other_params:
        yield "other", sh.other_params


#: bitsandbytes optimizers: name -> (number of states, bits per state)
_BNB = {"bnb-adamw8bit": (2, 8), "bnb-paged-adamw8bit": (2, 8), "bnb-paged-adamw32bit": (2, 32),
        "bnb-lamb8bit": (2, 8), "bnb-lion8bit": (1, 8)}


def _m_bnb(inp: PlanInput, st: _Step, name: str) -> None:
    n_states, bits = _BNB[name]
    min8 = int(inp.option(name, "min_8bit_size", 4096))
    emb32 = bool(inp.option(name, "embeddings_32bit", True))
    states = 0.0
    for kind, n in _all_param_sizes(inp.shape):
        if bits == 32 or (kind == "embed" and emb32):
            states += 4.0 * n_states * n
        else:
            states += _bnb8_state_bytes(n, min8, n_states)
    if bits == 8:
        states += 2 * 256 * 4  # the signed and unsigned quantization maps, shared by every parameter
    if "paged" in name:
        st.states_paged = states
        st.notes.append(f"{name}: states live in CUDA managed (paged) memory, outside torch's allocated count; they "
                        "page out to host RAM when the GPU runs short")
    else:
        st.states = states
    pb = inp.setup.param_bytes
    st.opt_bytes_per_param = 3 * pb + 2 * n_states * bits / 8
    # calibrated on the peers' run: 8-bit AdamW + checkpointing reached 66% of the ceiling on 7B (~0.1 s/step)
    st.opt_kernel_factor = 5.0 if bits == 8 else 1.5


def _m_adafactor(inp: PlanInput, st: _Step, name: str) -> None:
    sh = inp.shape
    factored = sh.n_layers * sum(r + c for _, (r, c) in sh.layer_matrices) + sh.vocab + sh.hidden
    vectors = sh.params_total - sh.n_layers * sh.linear_layer_params - sh.embed_params - sh.head_params
    heads = 2 if sh.head_params else 1
    st.states = 4 * (factored + (heads - 1) * (sh.vocab + sh.hidden) + vectors)
    # unfused per-parameter update: the fp32 gradient, fp32 weight copy (for bf16 weights) and the update
    pb = inp.setup.param_bytes
    st.opt_ws = sh.largest_param * 4 * (3 if pb == 2 else 1)
    st.opt_bytes_per_param = 4 * pb + 8
    st.opt_kernel_factor = 4.0


def _galore_parts(inp: PlanInput, name: str) -> tuple[float, float, float, float]:
    """(state bytes, projector bytes, SVD seconds per step amortised, low-rank grads bytes)."""
    sh, su = inp.shape, inp.setup
    rank = int(inp.option(name, "rank", 128))
    gap = int(inp.option(name, "update_proj_gap", 200))
    eight = "8bit" in name
    ada = "adafactor" in name
    states = proj = svd_s = low = 0.0
    for _ in range(sh.n_layers):
        for _n, (r, c) in sh.layer_matrices:
            if min(r, c) <= rank:  # not a target: full-rank state
                states += _bnb8_state_bytes(r * c) if eight else (4 * (r + c) if ada else 8 * r * c)
                continue
            n_low = rank * max(r, c)
            low += n_low * su.param_bytes
            proj += rank * min(r, c) * su.param_bytes
            states += _bnb8_state_bytes(n_low) if eight else (4 * (rank + max(r, c)) if ada else 8 * n_low)
            # one SVD-class refresh per matrix every `gap` steps (randomized: ~ m n k instead of m n min(m, n))
            svd_s += (r * c * (rank + 8) * 3.6e-12 * 40) / gap
    rest = sh.embed_params + sh.head_params + sh.other_params + sh.n_layers * (sh.layer_params[0] - sh.linear_layer_params)
    states += _bnb8_state_bytes(int(rest)) if eight else 8.0 * rest
    return states, proj, svd_s, low


def _m_galore(inp: PlanInput, st: _Step, name: str) -> None:
    states, proj, svd_s, low = _galore_parts(inp, name)
    st.states = states + proj
    pb = inp.setup.param_bytes
    big = max((r * c for _, (r, c) in inp.shape.layer_matrices), default=0)
    # the step of one matrix: its fp32 gradient copy, the projected gradient and the projected-back update
    st.opt_ws = big * 4 + big * pb
    st.opt_bytes_per_param = 3 * pb + 2
    st.opt_kernel_factor = 3.0
    st.opt_extra_seconds = svd_s
    if name.endswith("-layerwise"):
        if inp.setup.grad_accum == 1:
            st.grad_free_per_param = True
        else:
            st.notes.append(f"{name} with gradient accumulation keeps the window's full gradients until its last "
                            "micro-batch (the saving is in the last backward and the step)")
            st.grad_free_per_param = True  # in the last micro-batch; earlier ones are counted by the replay
        st.states += low  # projected gradients kept for the clipped step


def _m_nf4(inp: PlanInput, st: _Step, name: str) -> None:
    sh, su = inp.shape, inp.setup
    lin = sh.linear_layer_params * sh.n_layers
    st.weights -= lin * su.param_bytes
    st.weights += lin * (0.5 + 4 / 64) if name == "bnb-nf4" else lin * (1 + 4 / 4096) + sum(
        r for _, (r, _c) in sh.layer_matrices) * sh.n_layers * 4
    st.grad_layer = [0.0] * sh.n_layers
    st.notes.append(f"{name} freezes the quantized base weights (adapter training): their gradients are not "
                    "counted (optimizer states still are, as if they trained); add your adapters' own")


def _m_attention(impl: str) -> Callable[[PlanInput, _Step, str], None]:
    def model(inp: PlanInput, st: _Step, name: str) -> None:
        pass  # the attention implementation is part of the setup (see _setup_for)
    model.attn_impl = impl  # type: ignore[attr-defined]
    return model


#: plugin name -> its memory model (a function that edits the step replay's inputs)
BUILTIN_MODELS: dict[str, Callable[[PlanInput, _Step, str], None]] = {
    "adamw": _m_adamw,
    **{n: _m_bnb for n in _BNB},
    "adafactor": _m_adafactor,
    "galore-adamw": _m_galore, "galore-adamw8bit": _m_galore, "galore-adafactor": _m_galore,
    "galore-adamw-layerwise": _m_galore, "galore-adamw8bit-layerwise": _m_galore,
    "galore-adafactor-layerwise": _m_galore,
    "int8-weights": _m_int8_weights,
    "bnb-nf4": _m_nf4, "bnb-int8": _m_nf4,
    "sdpa": _m_attention("sdpa"), "auto-attention": _m_attention("sdpa"),
    "flash-attn": _m_attention("flash_attention_2"),
    "gradient-checkpointing": _m_checkpointing,
    "activation-offload": _m_activation_offload,
    "chunked-loss": _m_chunked_loss,
}
#: plugins the built-in planner never picks on its own (it still estimates them when you select them)
NOT_FOR_FULL_TRAINING = {"bnb-nf4": "freezes the base weights (for adapter training), not full-parameter training",
                         "bnb-int8": "freezes the base weights (for adapter training), not full-parameter training"}
#: plugins whose effect is not on memory (their speed effect is left to you)
MEMORY_NEUTRAL = {"sdpa", "flash-attn", "auto-attention"}


def infeasible(inp: PlanInput) -> str | None:
    """Why a plan cannot run at all on this model (a plugin would refuse it), or ``None``."""
    for name in inp.names():
        if name.startswith("galore-"):
            rank = int(inp.option(name, "rank", 128))
            if inp.option(name, "target_modules", None) is None and not any(
                    min(r, c) > rank for _, (r, c) in inp.shape.layer_matrices):
                return f"{name}: no projection has both sides larger than rank {rank}"
    return None


def _setup_for(inp: PlanInput) -> TrainSetup:
    att = inp.selected("attention")
    model = BUILTIN_MODELS.get(att or "")
    impl = getattr(model, "attn_impl", None)
    if impl and impl != inp.setup.attn_impl:
        return dataclasses.replace(inp.setup, attn_impl=impl)
    return inp.setup


def _replay(st: _Step, setup: TrainSetup) -> tuple[int, dict[str, float], str]:
    """Walk one optimizer step and return the GPU peak, its breakdown and where it happens.

    Covers the first micro-batch of a window (gradients absent: the Trainer zeroes them with
    ``set_to_none``), a later micro-batch (all gradients present, new ones added in place) and the
    optimizer step (optimizer states are counted throughout: from the second step on they exist)."""
    L = len(st.acts)
    G_total = sum(st.grad_layer) + st.grad_embed + st.grad_head + st.grad_other
    best: tuple[float, dict[str, float], str] = (-1.0, {}, "")

    def cand(phase: str, **c: float) -> None:
        nonlocal best
        parts = {"weights": st.weights, "gradients": 0.0, "optimizer states": st.states, "activations": 0.0,
                 "logits": 0.0, "temporaries": 0.0, "transfer buffers": st.transfer, "framework overhead": st.overhead}
        for k, v in c.items():
            parts[k.replace("_", " ")] += v
        total = sum(parts.values())
        if total > best[0]:
            best = (total, parts, phase)

    def stored(i: int) -> float:
        return st.ckpt[i] if st.recompute[i] else st.acts[i]

    def resident(a: float) -> float:  # saved activations on the GPU (offloading keeps a window there)
        return min(a, st.offload_window) if st.offload_acts else a

    def in_forward(a: float, fast: float) -> float:
        """Saved activations on the GPU during forward: the resident ones, plus copies out not finished yet.
        Those pile up (to the cap) only where layers save faster than PCIe drains: ``fast``, the bytes saved
        by layers that are not checkpointed (a checkpointed layer saves one hidden state per layer's compute)."""
        return resident(a) + (min(max(fast - st.offload_window, 0.0), st.offload_pending) if st.offload_acts else 0.0)

    G = setup.grad_accum
    for first in ([True, False] if G > 1 else [True]):
        label = "first micro-batch" if first else "later micro-batch"
        frees = st.grad_free_per_param and (G == 1 or not first)  # layer-wise updates on the window's last one
        Gd = 0.0 if first else G_total
        A = cache = fast = 0.0
        for i in range(L):  # forward
            cand(f"forward, layer {i} ({label})", gradients=Gd, activations=in_forward(A, fast),
                 temporaries=st.fwd_ws[i], weights=cache + st.cache[i])
            A += stored(i)
            fast += 0.0 if st.recompute[i] else stored(i)
            cache += st.cache[i]  # autocast keeps every cast weight until the forward's autocast region ends
        cache += st.head_cache
        cand(f"loss forward ({label})", gradients=Gd, activations=in_forward(A, fast) + st.head_acts,
             logits=st.logits_fwd, weights=cache)
        # backward runs outside autocast: only the casts that autograd saved are still alive
        cache = st.head_cache + sum(c for c, r in zip(st.cache, st.recompute) if not r)
        cand(f"loss backward ({label})", gradients=Gd, activations=resident(A) + st.head_acts,
             logits=st.logits_bwd, weights=cache)
        head_g = st.grad_head + (st.grad_embed if st.grad_head == 0 else 0.0)  # tied: the embedding's, here
        if first and not frees:
            Gd += head_g + st.grad_other
        cache -= st.head_cache
        for i in reversed(range(L)):  # backward: the MLP half first, then the attention half
            g_mlp = st.grad_layer[i] * st.grad_mlp_frac
            full = st.acts[i]  # the layer's activations, kept or recomputed from its checkpoint
            others = max(A - stored(i), 0.0)
            others = min(others, st.offload_window) if st.offload_acts else others
            ck = st.ckpt[i] if st.recompute[i] else 0.0
            rc_cache = st.cache[i] if st.recompute[i] else 0.0
            ws_mlp, ws_attn = st.bwd_ws[i]
            extra = st.opt_ws if frees else 0.0
            if first:
                g1, g2 = st.first_mlp_grad, g_mlp + st.first_attn_grad
            else:  # computed, then added in place
                g1, g2 = st.first_mlp_grad, st.largest_grad_layer
            cand(f"backward, layer {i} ({label})", gradients=Gd + g1, activations=others + ck + full,
                 temporaries=ws_mlp + extra, weights=cache + rc_cache)
            cand(f"backward, layer {i} attention ({label})", gradients=Gd + g2,
                 activations=others + ck + full * (1 - st.mlp_frac), temporaries=ws_attn + extra,
                 weights=cache + rc_cache)
            A -= stored(i)
            if not st.recompute[i]:
                cache -= st.cache[i]
            if first and not frees:
                Gd += st.grad_layer[i]
            elif frees and not first:
                Gd -= st.grad_layer[i]
        # the embedding's gradient: allocated here, or (tied to the head, or a later micro-batch) computed
        # densely and then added in place
        cand(f"backward, embedding ({label})", gradients=Gd + st.grad_embed, temporaries=st.embed_bwd_ws)
    cand("optimizer step", gradients=0.0 if st.grad_free_per_param else G_total, temporaries=st.opt_ws + st.clip_ws)
    total, parts, phase = best
    return int(total), {k: v for k, v in parts.items() if v}, phase


# ---- the weight-streaming engine ------------------------------------------------------------------
def _stream_estimate(inp: PlanInput) -> MemoryEstimate:
    """The ``stream`` engine's memory: the engine's own model (``hf_lowmem.engine.stream.
    estimate_stream_memory``) when it is importable, else the arithmetic of its design."""
    sh, su = inp.shape, inp.setup
    opt = inp.selected("optimizer")
    fmt = inp.option("stream", "states", "auto")
    if fmt == "auto":
        fmt = "8bit" if opt in ("bnb-adamw8bit", "adamw8bit") else "fp32"
    chunk = int(inp.option("stream", "loss_chunk_tokens", 2048))
    cb = 2 if su.precision != "fp32" else 4
    gpu: dict[str, float]
    host: dict[str, float]
    try:
        from hf_lowmem.engine.stream import estimate_stream_memory

        raw = estimate_stream_memory(
            block_params=sh.block_params(), hidden_size=sh.hidden, intermediate_size=sh.intermediate,
            vocab_size=sh.vocab, tokens_per_micro_batch=su.tokens, micro_batches=su.grad_accum, compute_bytes=cb,
            state_format=fmt, loss_chunk_tokens=chunk, masters_exist=False)
        g, h = raw["gpu"], raw["host"]
        gpu = {"weights": g.get("weights", 0), "gradients": g.get("gradients", 0),
               "optimizer states": g.get("update_staging", 0),
               "activations": g.get("activations", 0) + g.get("hidden_states", 0), "logits": g.get("logits", 0),
               "framework overhead": g.get("framework", 0)}
        for k, v in g.items():
            if k not in ("weights", "gradients", "update_staging", "activations", "hidden_states", "logits", "framework"):
                gpu[k.replace("_", " ")] = v
        host = {"master weights (fp32, pinned)": h.get("master_weights", 0),
                "optimizer states (pinned)": h.get("optimizer_states", 0),
                "activation stash (pinned)": h.get("activation_stash", 0),
                "gradients (pinned)": h.get("gradients", 0)}
        for k, v in h.items():
            if k not in ("master_weights", "optimizer_states", "activation_stash", "gradients"):
                host[k.replace("_", " ")] = v
        source = "the stream engine's own memory model"
        phase = f"{raw.get('gpu_peak_phase', 'backward')} phase of one block"
    except ImportError:
        big = max(sh.block_params())
        sb = 2.0 + 8 / 256 if fmt == "8bit" else 8.0
        gpu = {"weights": 2 * big * cb, "gradients": big * 4, "optimizer states": big * (4 + 2 + sb),
               "activations": _layer_activation_bytes(sh, su, su.tokens) + max(_layer_backward_workspace(sh, su, su.tokens)),
               "logits": min(chunk, su.tokens) * sh.vocab * (4 + cb) * 2, "framework overhead": 64 * MiB}
        host = {"master weights (fp32, pinned)": sh.params_total * 4, "optimizer states (pinned)": sh.params_total * sb,
                "activation stash (pinned)": sh.n_layers * su.window_tokens * sh.hidden * cb,
                "gradients (pinned)": sh.params_total * cb}
        source = "the design arithmetic (engine not importable)"
        phase = "backward of one block (recompute + backward of one micro-batch)"
    host["framework (Python, PyTorch, CUDA libraries)"] = 3 * GiB if su.device == "cuda" else 1 * GiB
    est = MemoryEstimate(gpu={k: int(v) for k, v in gpu.items() if v}, host={k: int(v) for k, v in host.items() if v},
                         peak_phase=phase)
    est.notes.append(f"stream: {fmt} optimizer states; memory from {source}")
    # speed: per block, copies overlap compute; the slower of the two sets the pace
    sb = 2.0 + 8 / 256 if fmt == "8bit" else 8.0
    dev = inp.device
    rate = dev.flops_rate(su)
    P = sh.params_total
    Tw = su.window_tokens
    fwd_flops = 2 * _matmul_params(sh) * Tw + _attn_flops(sh, su) * su.grad_accum / 3
    t_fwd_compute = fwd_flops / rate
    t_bwd_compute = 3 * fwd_flops / rate  # recompute + backward
    # forward streams masters (fp32) + states + bf16 gradients in, masters + states out; backward streams
    # bf16 weights in and bf16 gradients out
    t_fwd_copy = max(P * (4 + sb + cb) / (dev.h2d_gbps * 1e9), P * (4 + sb) / (dev.d2h_gbps * 1e9))
    t_bwd_copy = max(P * cb / (dev.h2d_gbps * 1e9), P * cb / (dev.d2h_gbps * 1e9))
    t_opt = P * (4 + 4 + 2 * sb + cb) / (dev.hbm_gbps * 1e9 * 0.7)
    step = max(t_fwd_compute, t_fwd_copy) + max(t_bwd_compute, t_bwd_copy) + t_opt
    ceiling = _ceiling_seconds(inp)
    est.seconds_per_step = step
    est.speed = min(1.0, ceiling / step)
    est.speed_notes.append(f"full recompute: {8}/{6} of the plain FLOPs")
    if t_fwd_copy > t_fwd_compute or t_bwd_copy > t_bwd_compute:
        est.speed_notes.append(f"copy-bound: {t_fwd_copy + t_bwd_copy:.2f} s of host<->GPU copies per step against "
                               f"{t_fwd_compute + t_bwd_compute:.2f} s of compute (more tokens per window hides them)")
    else:
        est.speed_notes.append(f"copies ({t_fwd_copy + t_bwd_copy:.2f} s/step) hidden behind compute "
                               f"({t_fwd_compute + t_bwd_compute:.2f} s/step)")
    return est


# ---- speed ---------------------------------------------------------------------------------------
def _matmul_params(sh: ModelShape) -> int:
    """Parameters that take part in matmuls (everything but the embedding lookup; a tied head counts)."""
    return sh.params_total - sh.embed_params + (sh.embed_params if sh.tied else 0)


def _attn_flops(sh: ModelShape, su: TrainSetup) -> float:
    """Attention score/value FLOPs of a micro-batch, forward + backward (causal: half of the square)."""
    return 6 * sh.n_layers * sh.n_heads * sh.head_dim * su.seq_len * su.tokens


def _ceiling_seconds(inp: PlanInput) -> float:
    sh, su, dev = inp.shape, inp.setup, inp.device
    flops = (6 * _matmul_params(sh) * su.tokens + _attn_flops(sh, su)) * su.grad_accum
    pb = su.param_bytes
    opt = sh.params_total * (7 * pb) / (dev.hbm_gbps * 1e9 * 0.7)
    return flops / dev.flops_rate(su) + opt


def _speed(inp: PlanInput, st: _Step, est: MemoryEstimate) -> None:
    sh, su, dev = inp.shape, inp.setup, inp.device
    rate = dev.flops_rate(su)
    G = su.grad_accum
    matmul = _matmul_params(sh)
    base_flops = (6 * matmul * su.tokens + _attn_flops(sh, su)) * G
    layer_fwd = (2 * (sum(sh.layer_params) / max(1, sh.n_layers)) * su.tokens
                 + _attn_flops(sh, su) / 3 / max(1, sh.n_layers))
    n_re = sum(st.recompute)
    re_flops = n_re * layer_fwd * G
    t_compute = (base_flops + re_flops) / rate
    t_opt = sh.params_total * st.opt_bytes_per_param * st.opt_kernel_factor / (dev.hbm_gbps * 1e9 * 0.7)
    t_opt += st.opt_extra_seconds
    t_clip = sh.params_total * su.param_bytes / (dev.hbm_gbps * 1e9 * 0.7) if su.max_grad_norm else 0.0
    t_deq = st.dequant_bytes * G / (dev.hbm_gbps * 1e9 * 0.5)
    # offloaded activations: forward copies out, backward copies in; each overlaps its pass's compute
    t_fwd, t_bwd = t_compute / 3, t_compute * 2 / 3
    t_copy_fwd = st.d2h_bytes / (dev.d2h_gbps * 1e9)
    t_copy_bwd = st.h2d_bytes / (dev.h2d_gbps * 1e9)
    exposed = max(0.0, t_copy_fwd - t_fwd) + max(0.0, t_copy_bwd - t_bwd)
    paged = 0.0
    step = t_compute + t_opt + t_clip + t_deq + exposed + paged
    ceiling = _ceiling_seconds(inp)
    est.seconds_per_step = step
    est.speed = min(1.0, ceiling / step)
    if n_re:
        est.speed_notes.append(f"recompute of {n_re}/{sh.n_layers} layers: +{re_flops / base_flops:.0%} FLOPs")
    if st.opt_kernel_factor > 1 or st.opt_extra_seconds:
        est.speed_notes.append(f"optimizer step ~{t_opt * 1e3:.0f} ms (fused AdamW: "
                               f"{sh.params_total * 7 * su.param_bytes / (dev.hbm_gbps * 1e9 * 0.7) * 1e3:.0f} ms)")
    if t_deq:
        est.speed_notes.append(f"int8 dequantise/requantise: ~{t_deq * 1e3:.0f} ms per step")
    if st.d2h_bytes:
        est.speed_notes.append(f"activation copies {gib(st.d2h_bytes):.1f} GiB each way per step; "
                               f"{exposed * 1e3:.0f} ms not hidden by compute")
    if not est.speed_notes:
        est.speed_notes.append("no recompute, no copies: the speed of unlimited memory")


# ---- the estimate ----------------------------------------------------------------------------------------
def estimate_memory(inp: PlanInput, host: Any = None) -> MemoryEstimate:
    """The memory (and speed) estimate of one plan. ``host``: a loaded
    :class:`~hf_lowmem.plugins.PluginHost` whose ``hf_lowmem_estimate_memory`` implementations may
    override the built-in models (``None``: built-in models only)."""
    setup = _setup_for(inp)
    if setup is not inp.setup:
        inp = dataclasses.replace(inp, setup=setup)
    unknown: list[str] = []
    if inp.has("stream"):
        est = _stream_estimate(inp)
        others = [n for n in inp.names() if n not in ("stream", "adamw", "bnb-adamw8bit") and n not in MEMORY_NEUTRAL]
        unknown.extend(n for n in others if n not in BUILTIN_MODELS)
    else:
        st = _base_step(inp)
        opt = inp.selected("optimizer")
        if opt is None:
            _adamw_states(inp, st)  # the Trainer's default: AdamW (fused on CUDA)
            if setup.device == "cpu":
                st.opt_ws = 0.0  # adamw_torch_fused runs a fused kernel on the CPU too
        for kind in KIND_ORDER:
            for name in inp.selection.get(kind, ()):
                model = BUILTIN_MODELS.get(name)
                if model is not None:
                    model(inp, st, name)
                else:
                    unknown.append(name)
        total, parts, phase = _replay(st, setup)
        est = MemoryEstimate(gpu={k: int(v) for k, v in parts.items()}, host={k: int(v) for k, v in st.host.items() if v},
                             peak_phase=phase, notes=list(st.notes))
        if st.states_paged:
            est.gpu_extra["optimizer states (paged)"] = int(st.states_paged)
        _speed(inp, st, est)
    if setup.device == "cuda":
        est.gpu_extra["allocator slack (reserved - allocated)"] = int(0.05 * est.gpu_peak_allocated + 128 * MiB)
        est.gpu_extra["CUDA context"] = int(inp.device.context_bytes)
    # plugins' own memory models override the built-in ones
    overridden = []
    if host is not None:
        for name in inp.names():
            result = host.estimate_memory(plan=inp, name=name, options=inp.options.get(name), estimate=est)
            if result is not None:
                if not isinstance(result, MemoryEstimate):
                    raise PluginError(f"the memory model of plugin {name!r} returned {type(result).__name__}, "
                                      "not a MemoryEstimate")
                est = result
                overridden.append(name)
    for name in unknown:
        if name not in overridden and name not in MEMORY_NEUTRAL:
            est.notes.append(f"plugin {name!r} has no memory model: its effect is not counted")
    return est


# =====================================================================================================
# planning
# =====================================================================================================
@dataclass
class Candidate:
    """One plan the planner considered."""

    inp: PlanInput
    estimate: MemoryEstimate
    lossless: bool
    fits_gpu: bool
    fits_host: bool
    unavailable: str | None = None  # why it cannot run here (missing package, needs CUDA)

    @property
    def label(self) -> str:
        return self.inp.label()

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def usable(self) -> bool:
        return self.fits and self.unavailable is None

    def why_not(self, gpu_budget: int, host_budget: int) -> str:
        e = self.estimate
        reasons = []
        if not self.fits_gpu:
            reasons.append(f"needs {fmt_gib(e.gpu_total)} GiB of GPU > {fmt_gib(gpu_budget)}")
        if not self.fits_host:
            reasons.append(f"needs {fmt_gib(e.host_total)} GiB of host RAM > {fmt_gib(host_budget)}")
        if self.unavailable:
            reasons.append(self.unavailable)
        return "; ".join(reasons) or "fits, but slower"

    def lowmem_arguments(self) -> dict[str, Any]:
        """The ``LowMemTrainingArguments`` fields that select this plan."""
        sel = self.inp.selection
        opts = {n: _changed_options(o) for n, o in self.inp.options.items()}
        return {
            "lowmem_optimizer": (sel.get("optimizer") or (None,))[0],
            "lowmem_quantization": (sel.get("quantization") or (None,))[0],
            "lowmem_attention": (sel.get("attention") or (None,))[0],
            "lowmem_offload": list(sel.get("offload") or ()),
            "lowmem_options": {n: o for n, o in opts.items() if o},
        }

    def to_dict(self, gpu_budget: int, host_budget: int) -> dict:
        return {"plugins": self.label, "arguments": self.lowmem_arguments(), "lossless": self.lossless,
                "fits": self.fits, "available": self.unavailable is None,
                "why_not": None if self.usable else self.why_not(gpu_budget, host_budget),
                **self.estimate.to_dict()}


@dataclass
class Plan:
    """The result of :func:`plan_training`."""

    shape: ModelShape
    setup: TrainSetup
    gpu_budget: int
    host_budget: int
    chosen: Candidate | None
    candidates: list[Candidate]
    #: the candidate with the smallest GPU need among those that fit the host budget and can run here
    smallest: Candidate | None
    constraints: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.chosen is not None

    @property
    def smallest_gpu_gib(self) -> float | None:
        """The smallest GPU budget any plan meets here, in GiB rounded up to 0.1."""
        if self.smallest is None:
            return None
        return gib_up(self.smallest.estimate.gpu_total)

    def rejected(self, limit: int | None = None, frontier: bool = True) -> list[Candidate]:
        """The alternatives at least as fast as the chosen plan, fastest first, with why each was not taken
        (all candidates when nothing fits). ``frontier``: only those no other alternative beats on both speed
        and GPU memory (a faster plan that needs less memory makes a slower, bigger one uninteresting)."""
        pool = [c for c in self.candidates if c is not self.chosen and (
            self.chosen is None or (c.estimate.speed or 0) >= (self.chosen.estimate.speed or 0) - 1e-9)]
        if frontier:
            keep, best_gpu = [], float("inf")
            for c in sorted(pool, key=lambda c: (-(c.estimate.speed or 0), c.estimate.gpu_total)):
                if c.estimate.gpu_total < best_gpu or c.unavailable:
                    keep.append(c)
                    best_gpu = min(best_gpu, c.estimate.gpu_total) if not c.unavailable else best_gpu
            pool = keep
            if self.chosen is not None and not self.chosen.lossless:  # what a lossless run would need
                lossless = next((c for c in self.candidates if c.lossless and c is not self.chosen), None)
                if lossless is not None and lossless not in pool:
                    pool.append(lossless)
        return pool[:limit] if limit else pool

    def budget_error(self) -> MemoryBudgetError:
        su, sh = self.setup, self.shape
        what = (f"{sh.name} ({fmt_count(sh.params_total)} params) at micro-batch {su.micro_batch} x seq {su.seq_len}"
                + (f" x {su.grad_accum} accumulation" if su.grad_accum > 1 else ""))
        fixed = {k: v for k, v in self.constraints.items() if v}
        with_sel = f" with your selection ({', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else ""
        if self.smallest is None:
            hosts = [c for c in self.candidates if c.unavailable is None]
            if not hosts:
                return MemoryBudgetError(f"no plan can run here for {what}{with_sel}: "
                                         + "; ".join(sorted({c.unavailable or "" for c in self.candidates}))[:500])
            low = min(hosts, key=lambda c: (c.estimate.host_total, c.estimate.gpu_total))
            return MemoryBudgetError(
                f"no plan fits {fmt_size(self.host_budget)} of host RAM for {what}{with_sel}: the smallest need is "
                f"{fmt_size(low.estimate.host_total)} of host RAM (lowmem_host_memory=\"{size_arg(low.estimate.host_total)}\"; "
                f"and {fmt_size(low.estimate.gpu_total)} of GPU) with {low.label}. Use fewer tokens per step, "
                f"a smaller model, or a machine with more RAM.")
        s = self.smallest
        need = size_arg(s.estimate.gpu_total)
        return MemoryBudgetError(
            f"no plan fits {fmt_size(self.gpu_budget)} of GPU memory for {what}{with_sel}. The smallest budget that "
            f"works is {fmt_size(s.estimate.gpu_total)} (lowmem_gpu_memory=\"{need}\"), with {s.label} (predicted "
            f"peak allocated {fmt_size(s.estimate.gpu_peak_allocated)}, plus CUDA context and allocator slack; host "
            f"{fmt_size(s.estimate.host_total)}). Otherwise lower per_device_train_batch_size or the sequence "
            f"length. `hf-lowmem plan` shows the breakdown.")

    def to_dict(self) -> dict:
        return {
            "model": self.shape.to_dict(), "setup": dataclasses.asdict(self.setup),
            "gpu_budget_gib": round(gib(self.gpu_budget), 3), "host_budget_gib": round(gib(self.host_budget), 3),
            "constraints": self.constraints,
            "chosen": self.chosen.to_dict(self.gpu_budget, self.host_budget) if self.chosen else None,
            "smallest_gpu_budget_gib": self.smallest_gpu_gib,
            "smallest": self.smallest.to_dict(self.gpu_budget, self.host_budget) if self.smallest else None,
            "rejected": [c.to_dict(self.gpu_budget, self.host_budget) for c in self.rejected()],
            "rejected_all": [{"plugins": c.label, "speed": round(c.estimate.speed or 0, 3),
                              "gpu_total_gib": round(gib(c.estimate.gpu_total), 3),
                              "host_total_gib": round(gib(c.estimate.host_total), 3),
                              "why_not": c.why_not(self.gpu_budget, self.host_budget)}
                             for c in self.rejected(frontier=False)],
            "candidates": len(self.candidates),
        }


def _registered(host: Any, name: str) -> bool:
    return host is not None and name in host.registry


def _options_for(host: Any, name: str, raw: Mapping[str, Any] | None) -> Any:
    if host is not None and name in host.registry:
        return host.registry[name].parse_options(raw or {})
    return None


#: first-party plugins that leave the results unchanged (used when planning without a plugin host)
LOSSLESS = {"adamw", "gradient-checkpointing", "activation-offload", "chunked-loss", "stream", "sdpa", "flash-attn",
            "auto-attention"}


def _is_lossless(host: Any, inp: PlanInput) -> bool:
    names = inp.names()
    ok = all(host.registry[n].lossless for n in names) if host is not None else all(n in LOSSLESS for n in names)
    if "stream" in names:  # the engine's own optimizer: 8-bit states are lossy
        fmt = inp.option("stream", "states", "auto")
        if fmt == "8bit" or (fmt == "auto" and inp.selected("optimizer") in ("bnb-adamw8bit", "adamw8bit")):
            ok = False
    return ok


def _has_model(host: Any, inp: PlanInput, name: str, probe: MemoryEstimate) -> bool:
    if name in BUILTIN_MODELS or name == "stream":
        return True
    if host is None:
        return False
    return host.estimate_memory(plan=inp, name=name, options=inp.options.get(name), estimate=probe) is not None


def candidate_selections(host: Any, require: Mapping[str, list[str]] | None = None,
                         raw_options: Mapping[str, dict] | None = None) -> list[tuple[dict[str, list[str]], dict[str, dict]]]:
    """Every combination of registered plugins the planner considers, as (names by kind, raw options),
    restricted to those containing the ``require``-d names (the user's own choices)."""
    require = {k: list(v) for k, v in (require or {}).items() if v}
    raw_options = dict(raw_options or {})
    names = set(host.registry.names()) if host is not None else set(BUILTIN_MODELS) | {"stream"}

    def kinds(kind: str) -> list[str]:
        if host is not None:
            return [n for n in host.registry.names(kind)]
        return sorted(n for n in names if _builtin_kind(n) == kind)

    if require.get("optimizer"):
        optimizers = [require["optimizer"][0]]
    else:
        optimizers = [n for n in kinds("optimizer") if n not in NOT_FOR_FULL_TRAINING]
    if require.get("quantization"):
        quants = [require["quantization"][0]]
    else:
        quants = [None] + [n for n in kinds("quantization") if n not in NOT_FOR_FULL_TRAINING]
    if require.get("attention"):
        attns = [require["attention"][0]]
    else:
        attns = [None]  # attention plugins change speed, not memory, in this model
    fixed_off = list(require.get("offload") or [])
    off_sets: list[tuple[list[str], dict[str, dict]]] = [([], {})]
    if "gradient-checkpointing" in names:
        for n in (1, 2, 4):
            off_sets.append((["gradient-checkpointing"], {"gradient-checkpointing": {"every_n": n}} if n != 1 else {}))
        if "activation-offload" in names:
            off_sets.append((["gradient-checkpointing", "activation-offload"], {}))
    if "activation-offload" in names:
        off_sets.append((["activation-offload"], {}))
    if "chunked-loss" in names:
        off_sets += [(o + ["chunked-loss"], dict(opt)) for o, opt in list(off_sets)]
    if "stream" in names:
        off_sets.append((["stream"], {}))
    out = []
    seen = set()
    for opt in optimizers:
        for q in quants:
            for a in attns:
                for off, offopts in off_sets:
                    if fixed_off:
                        # the user's offload plugins are fixed; the planner may add to them
                        merged = fixed_off + [x for x in off if x not in fixed_off]
                        if "stream" in merged and len(merged) > 1 and "stream" not in fixed_off:
                            continue
                        off = merged
                    sel = {"optimizer": [opt] if opt else [], "quantization": [q] if q else [],
                           "attention": [a] if a else [], "offload": list(off)}
                    raw = {**{k: v for k, v in offopts.items() if k in off}}
                    for n, o in raw_options.items():
                        raw[n] = {**raw.get(n, {}), **o}
                    raw = {n: o for n, o in raw.items() if n in [x for v in sel.values() for x in v]}
                    key = json.dumps([sel, raw], sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        out.append((sel, raw))
    return out


def _builtin_kind(name: str) -> str:
    if name in ("sdpa", "flash-attn", "auto-attention"):
        return "attention"
    if name in ("int8-weights", "bnb-nf4"):
        return "quantization"
    if name in ("gradient-checkpointing", "activation-offload", "chunked-loss", "stream"):
        return "offload"
    return "optimizer"


def _unavailable(host: Any, names: list[str], device: str, check_installed: bool) -> str | None:
    if host is None:
        return None
    for n in names:
        info = host.registry[n]
        if check_installed:
            missing = info.missing_requirements()
            if missing:
                hint = f"pip install 'hf-lowmem[{info.extra}]'" if info.extra else f"pip install {' '.join(missing)}"
                return f"{n} needs {', '.join(missing)} ({hint})"
        if info.needs_cuda and device != "cuda":
            return f"{n} needs a CUDA GPU"
    return None


def plan_training(shape: ModelShape, setup: TrainSetup, gpu_budget: int, host_budget: int, *, host: Any = None,
                  device: DeviceSpec = DEFAULT_DEVICE, require: Mapping[str, list[str]] | None = None,
                  raw_options: Mapping[str, dict] | None = None, lossless_only: bool = False,
                  check_installed: bool = True, mode: str = "single") -> Plan:
    """Choose the plugins that fit.

    :param shape: the model (:func:`load_model_shape`).
    :param setup: how it trains.
    :param gpu_budget: bytes of GPU memory the run may use in all (CUDA context included).
    :param host_budget: bytes of host RAM.
    :param host: the loaded plugins (:func:`hf_lowmem.plugins.get_plugin_host`); the planner plans over
        what is registered there, and respects each plugin's declared incompatibilities.
    :param require: plugin names by kind that every plan must contain (the user's own choices).
    :param raw_options: per-plugin options the user gave (applied to every plan containing that plugin).
    :param lossless_only: consider only plugins that do not change the results.
    :param check_installed: mark plans whose plugins' packages are missing here as unavailable.
    :param mode: distributed mode the plans must support.
    """
    from hf_lowmem.context import resolve_selection

    candidates: list[Candidate] = []
    probe = MemoryEstimate()
    for sel, raw in candidate_selections(host, require, raw_options):
        names = [n for k in KIND_ORDER for n in sel.get(k, [])]
        if host is not None:
            try:
                resolved = resolve_selection(host, sel, raw, mode)
            except PluginError:
                continue  # an impossible combination (declared by the plugins themselves)
            options = dict(resolved.options)
        else:
            options = {n: None for n in names}
        inp = PlanInput(shape=shape, setup=setup, device=device,
                        selection={k: tuple(v) for k, v in sel.items()}, options=options)
        if not all(_has_model(host, inp, n, probe) for n in names if n not in MEMORY_NEUTRAL) or infeasible(inp):
            continue
        lossless = _is_lossless(host, inp)
        if lossless_only and not lossless:
            continue
        est = estimate_memory(inp, host)
        c = Candidate(inp=inp, estimate=est, lossless=lossless, fits_gpu=est.gpu_total <= gpu_budget,
                      fits_host=est.host_total <= host_budget,
                      unavailable=_unavailable(host, names, setup.device, check_installed))
        candidates.append(c)
    candidates.sort(key=lambda c: (-(c.estimate.speed or 0.0), not c.lossless, c.estimate.gpu_total))
    usable = [c for c in candidates if c.usable]
    chosen = None
    if usable:
        fastest = max(c.estimate.speed or 0.0 for c in usable)
        near = [c for c in usable if (c.estimate.speed or 0.0) >= 0.95 * fastest]
        chosen = min(near, key=lambda c: (not c.lossless, -(c.estimate.speed or 0.0), len(c.inp.names()),
                                          c.estimate.gpu_total))
    runnable = [c for c in candidates if c.unavailable is None and c.fits_host]
    smallest = min(runnable, key=lambda c: (c.estimate.gpu_total, -(c.estimate.speed or 0))) if runnable else None
    return Plan(shape=shape, setup=setup, gpu_budget=gpu_budget, host_budget=host_budget, chosen=chosen,
                candidates=candidates, smallest=smallest,
                constraints={k: v for k, v in (require or {}).items() if v})


# =====================================================================================================
# the arguments' side: plan for a LowMemTrainingArguments
# =====================================================================================================
def setup_from_args(args: Any, seq_len: int, model: Any = None) -> TrainSetup:
    """The :class:`TrainSetup` a ``TrainingArguments`` implies, for sequences of ``seq_len`` tokens.
    With a model object, its parameter dtype and attention implementation are read from it."""
    import torch

    param_dtype = None
    attn = "sdpa"
    if model is not None:
        p = next(iter(model.parameters()), None)
        param_dtype = p.dtype if p is not None else None
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    bf16, fp16 = bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False))
    if param_dtype in (torch.bfloat16, torch.float16):
        precision = "bf16"
    elif bf16 or fp16:
        precision = "bf16-mixed"
    else:
        precision = "fp32"
    if attn not in ATTN_IMPLS:
        attn = "flash_attention_2" if "flash" in str(attn) else "sdpa"
    use_cpu = bool(getattr(args, "use_cpu", False))
    cuda = torch.cuda.is_available() and not use_cpu
    return TrainSetup(micro_batch=int(args.per_device_train_batch_size), seq_len=int(seq_len),
                      grad_accum=int(args.gradient_accumulation_steps), precision=precision, attn_impl=attn,
                      device="cuda" if cuda else "cpu", max_grad_norm=float(args.max_grad_norm or 0.0),
                      gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))


def dataset_seq_len(dataset: Any) -> int | None:
    """Tokens per example of a dataset, from its first example (``input_ids``), or ``None``."""
    if dataset is None:
        return None
    try:
        first = dataset[0] if hasattr(dataset, "__getitem__") else next(iter(dataset))
        ids = first.get("input_ids") if isinstance(first, Mapping) else None
        return int(len(ids)) if ids is not None else None
    except Exception:
        return None


def host_memory_bytes() -> int:
    """Total RAM of this machine (or its cgroup limit, when lower)."""
    import psutil

    from hf_lowmem.engine.device import cgroup_memory_limit

    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit()
    return int(min(total, limit) if limit is not None else total)


def plan_for_args(args: Any, model_or_config: Any, *, host: Any = None, seq_len: int | None = None,
                  train_dataset: Any = None, param_dtype: Any = None) -> Plan | None:
    """Plan for ``LowMemTrainingArguments`` whose ``lowmem_gpu_memory`` is set, and fill their plugin
    selection with the plan (what ``LowMemTrainer`` and ``hf-lowmem train`` call before the model goes to
    the GPU). The user's own selections (``lowmem_optimizer`` etc., ``lowmem_options``) are kept: the plan
    only adds to them. Raises :class:`MemoryBudgetError` stating the smallest budget that works when no
    plan fits. Returns ``None`` when ``lowmem_gpu_memory`` is not set.

    :param model_or_config: a model object, a ``PretrainedConfig``, a config path or a preset name.
    :param seq_len: tokens per sequence; default: the first example of ``train_dataset``, else the model's
        maximum position embeddings capped at 2048 (with a warning).
    :param param_dtype: the dtype the weights will be loaded in (``torch.bfloat16`` / ``"bfloat16"``) when
        planning from a config; a model object tells it itself.
    """
    import logging

    import torch

    from hf_lowmem.context import distributed_mode

    if not getattr(args, "lowmem_gpu_memory", None):
        return None
    logger = logging.getLogger("hf_lowmem")
    gpu = parse_size(args.lowmem_gpu_memory, "lowmem_gpu_memory")
    host_b = parse_size(args.lowmem_host_memory, "lowmem_host_memory") if args.lowmem_host_memory else host_memory_bytes()
    # what the user chose (remembered across calls, so a second plan starts from the same choices)
    user = getattr(args, "_lowmem_user_choice", None)
    if user is None:
        user = (args.lowmem_request(), {k: dict(v) for k, v in (args.lowmem_options or {}).items()})
        args._lowmem_user_choice = user
    request, raw_options = user
    shape = load_model_shape(model_or_config)
    is_model = hasattr(model_or_config, "parameters") and hasattr(model_or_config, "config")
    if seq_len is None:
        seq_len = dataset_seq_len(train_dataset)
    if seq_len is None:
        seq_len = min(shape.max_positions or 2048, 2048)
        logger.warning("hf-lowmem planner: the sequence length is unknown (no indexable train_dataset); planning for "
                       "%d tokens per sequence", seq_len)
    setup = setup_from_args(args, seq_len, model_or_config if is_model else None)
    if not is_model and param_dtype is not None:
        if isinstance(param_dtype, str):
            param_dtype = getattr(torch, param_dtype)
        if param_dtype in (torch.bfloat16, torch.float16):
            setup = dataclasses.replace(setup, precision="bf16")
    if host is None:
        from hf_lowmem.plugins import get_plugin_host

        host = get_plugin_host()
    mode = distributed_mode(args)
    plan = plan_training(shape, setup, gpu, host_b, host=host, require=request, raw_options=raw_options, mode=mode)
    if not plan.ok:
        err = plan.budget_error()
        if any(request.values()):
            free = plan_training(shape, setup, gpu, host_b, host=host, mode=mode)
            if free.ok:
                err = MemoryBudgetError(f"{err} Without your own plugin choices a plan fits: {free.chosen.label}.")
            elif free.smallest is not None and free.smallest_gpu_gib is not None:
                err = MemoryBudgetError(f"{err} Without your own plugin choices the smallest budget is "
                                        f"{fmt_size(free.smallest.estimate.gpu_total)} ({free.smallest.label}).")
        raise err
    chosen = plan.chosen.lowmem_arguments()
    args.lowmem_optimizer = chosen["lowmem_optimizer"]
    args.lowmem_quantization = chosen["lowmem_quantization"]
    args.lowmem_attention = chosen["lowmem_attention"]
    args.lowmem_offload = chosen["lowmem_offload"]
    options = {k: dict(v) for k, v in raw_options.items()}
    for name, opts in chosen["lowmem_options"].items():
        options[name] = {**opts, **options.get(name, {})}
    if "stream" in args.lowmem_offload and "stream" in host.registry:
        fields = {f.name for f in dataclasses.fields(host.registry["stream"].options or object)} \
            if dataclasses.is_dataclass(host.registry["stream"].options) else set()
        if "gpu_memory" in fields:  # the engine checks its own estimate against the same budget
            options.setdefault("stream", {}).setdefault("gpu_memory", str(args.lowmem_gpu_memory))
    args.lowmem_options = options
    e = plan.chosen.estimate
    args._lowmem_plan_summary = {
        "plugins": plan.chosen.label, "speed": e.speed, "gpu_peak_allocated": e.gpu_peak_allocated,
        "gpu_total": e.gpu_total, "host_total": e.host_total, "gpu_budget": gpu, "host_budget": host_b,
        "seq_len": seq_len, "setup": setup.describe(),
    }
    logger.info("hf-lowmem planner: %s fits %s of GPU (predicted peak allocated %s, total %s; host %s; "
                "speed %.2f of unlimited memory)", plan.chosen.label, fmt_size(gpu), fmt_size(e.gpu_peak_allocated),
                fmt_size(e.gpu_total), fmt_size(e.host_total), e.speed or 0)
    return plan
