"""The memory planner: where GPU and host memory go when a model trains, and which plugins make it fit.

A package of small modules, each usable on its own:

* :mod:`~hf_lowmem.planner.shapes` reads a model's configuration (a preset name such as ``llama2-7b``, a
  ``config.json``, a model folder, a cached hub id, a ``PretrainedConfig`` or a model object) and counts
  its parameters block by block on the ``meta`` device (:func:`load_model_shape`), without allocating or
  loading a single weight.
* :mod:`~hf_lowmem.planner.inputs`: how it trains (:class:`TrainSetup`), the device's rates
  (:class:`DeviceSpec`), a plan (:class:`PlanInput`) and what is predicted for it (:class:`MemoryEstimate`):
  the peak GPU memory *as ``torch.cuda.max_memory_allocated`` counts it*, split into weights, gradients,
  optimizer states, activations, logits, temporaries, transfer buffers and framework overhead; what the
  allocator does not count (CUDA context, allocator slack, paged memory); the host memory; a speed.
* :mod:`~hf_lowmem.planner.step` and :mod:`~hf_lowmem.planner.replay`: one training step as tensor
  classes (:class:`Step`, filled with what the Trainer does by default), and its replay: forward stores
  each layer's saved activations (counted per operation of a Llama-style decoder layer: the bytes
  autograd's saved-tensor hooks see), the loss materialises the logits, backward releases activations while
  gradients appear, the optimizer step adds its temporaries; the second micro-batch of an accumulation
  window starts with all gradients present. The peak is the largest of those moments, and the breakdown
  is taken at that moment.
* :mod:`~hf_lowmem.planner.estimate`: :func:`estimate_memory` of one plan. Each plugin's effect is its own
  memory model (:meth:`hf_lowmem.spec.Plugin.memory_model`), which lives with the plugin and changes the
  step before the replay; the planner knows no plugin by name. A selected plugin without one is named in
  the estimate's notes as not counted.
* :mod:`~hf_lowmem.planner.speed`: a step-time model (FLOPs at the device's rate, recompute, optimizer
  memory traffic, host<->GPU copies that compute cannot hide), relative to unlimited GPU memory.
* :mod:`~hf_lowmem.planner.search`: :func:`plan_training` tries every combination of the installed plugins'
  variants (:meth:`~hf_lowmem.spec.Plugin.plan_variants`), and picks the fastest that fits the GPU and host
  budgets; among plans within 5% of the fastest, lossless ones come first, then the one whose plugins
  measured the smallest quality gap against AdamW (:attr:`~hf_lowmem.spec.Plugin.quality_gap`). It keeps the
  rejected alternatives with the reason, and the smallest budget that any plan meets.
* :mod:`~hf_lowmem.planner.arguments`: :func:`plan_for_args`, what ``lowmem_gpu_memory`` runs.

Sizes are read by :func:`hf_lowmem.sizes.parse_size`: ``"8GiB"`` is 8 x 2^30 bytes, ``"8GB"`` 8 x 10^9, as
written. Every reported number is in GiB.
"""

from hf_lowmem.planner.arguments import dataset_seq_len, host_memory_bytes, plan_for_args, setup_from_args
from hf_lowmem.planner.estimate import estimate_memory
from hf_lowmem.planner.inputs import (ATTN_IMPLS, DEFAULT_DEVICE, GPU_COMPONENTS, KIND_ORDER, PRECISIONS, DeviceSpec,
                                      MemoryEstimate, PlanInput, PlanRefused, TrainSetup)
from hf_lowmem.planner.replay import replay
from hf_lowmem.planner.search import Candidate, Plan, candidate_selections, plan_training
from hf_lowmem.planner.shapes import (PRESETS, ModelShape, load_model_shape, preset_config, preset_names,
                                      shape_from_config, shape_from_model)
from hf_lowmem.planner.speed import attn_flops, ceiling_seconds, matmul_params
from hf_lowmem.planner.step import (Step, adamw_states, base_step, bnb8_state_bytes, checkpoint_layers,
                                    layer_activation_bytes, layer_activation_parts, layer_backward_workspace,
                                    layer_forward_workspace)
from hf_lowmem.sizes import GiB, MiB, fmt_gib, fmt_size, gib, gib_up, parse_size, size_arg

__all__ = [
    "ATTN_IMPLS", "DEFAULT_DEVICE", "GPU_COMPONENTS", "KIND_ORDER", "PRECISIONS", "PRESETS", "Candidate", "DeviceSpec",
    "GiB", "MemoryEstimate", "MiB", "ModelShape", "Plan", "PlanInput", "PlanRefused", "Step", "TrainSetup",
    "adamw_states", "attn_flops", "base_step", "bnb8_state_bytes", "candidate_selections", "ceiling_seconds",
    "checkpoint_layers", "dataset_seq_len", "estimate_memory", "fmt_gib", "fmt_size", "gib", "gib_up",
    "host_memory_bytes", "layer_activation_bytes", "layer_activation_parts", "layer_backward_workspace",
    "layer_forward_workspace", "load_model_shape", "matmul_params", "parse_size", "plan_for_args", "plan_training",
    "preset_config", "preset_names", "replay", "setup_from_args", "shape_from_config", "shape_from_model", "size_arg",
]
