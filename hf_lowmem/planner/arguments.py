"""The planner's side of a run: the setup that training arguments imply, and :func:`plan_for_args`, which
fills ``LowMemTrainingArguments``' plugin selection from a plan (``lowmem_gpu_memory``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from hf_lowmem.errors import MemoryBudgetError, PluginError
from hf_lowmem.planner.inputs import ATTN_IMPLS, TrainSetup
from hf_lowmem.planner.search import Plan, plan_training
from hf_lowmem.planner.shapes import load_model_shape
from hf_lowmem.sizes import fmt_size, parse_size


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
    return TrainSetup(micro_batch=int(args.per_device_train_batch_size), seq_len=int(seq_len),
                      grad_accum=int(args.gradient_accumulation_steps), precision=precision, attn_impl=attn,
                      device=training_device(args), max_grad_norm=float(args.max_grad_norm or 0.0),
                      gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))


def training_device(args: Any) -> str:
    """``"cuda"`` when these arguments train on a CUDA GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() and not getattr(args, "use_cpu", False) else "cpu"


def refuse_without_gpu(args: Any) -> None:
    """``lowmem_gpu_memory`` budgets a GPU: on a run that trains on the CPU it would choose plugins for a
    device that is not there (offloading to host memory that is the same memory), so it is refused, as
    ``hf-lowmem plan`` without a GPU asks for the budget of the GPU to plan for."""
    if training_device(args) == "cuda":
        return
    why = "use_cpu=True" if getattr(args, "use_cpu", False) else "no CUDA GPU is visible here"
    raise PluginError(f"lowmem_gpu_memory={args.lowmem_gpu_memory!r} is a GPU memory budget, but this run trains on "
                      f"the CPU ({why}); drop lowmem_gpu_memory, or plan for a GPU machine with `hf-lowmem plan "
                      f"--model MODEL --gpu_memory {args.lowmem_gpu_memory}` and set the lowmem_* arguments it prints")


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
    only adds to them (so planning again from the filled arguments finds the same plan). Raises
    :class:`MemoryBudgetError` stating the smallest budget that works when no plan fits. Returns the
    :class:`Plan` (``LowMemTrainer`` keeps it as ``ctx.plan``), or ``None`` when ``lowmem_gpu_memory`` is not set.

    :param model_or_config: a model object, a ``PretrainedConfig``, a config path or a preset name.
    :param seq_len: tokens per sequence; default: the first example of ``train_dataset``, else the model's
        maximum position embeddings capped at 2048 (with a warning).
    :param param_dtype: the dtype the weights will be loaded in (``torch.bfloat16`` / ``"bfloat16"``) when
        planning from a config; a model object tells it itself.

    A run that trains on the CPU (``use_cpu=True``, or no CUDA GPU) is refused (:func:`refuse_without_gpu`).
    """
    import logging

    import torch

    from hf_lowmem.context import distributed_mode

    if not getattr(args, "lowmem_gpu_memory", None):
        return None
    logger = logging.getLogger("hf_lowmem")
    gpu = parse_size(args.lowmem_gpu_memory, "lowmem_gpu_memory")
    refuse_without_gpu(args)
    host_b = parse_size(args.lowmem_host_memory, "lowmem_host_memory") if args.lowmem_host_memory else host_memory_bytes()
    request, raw_options = args.lowmem_request(), {k: dict(v) for k, v in (args.lowmem_options or {}).items()}
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
    args.lowmem_options = options
    e = plan.chosen.estimate
    logger.info("hf-lowmem planner: %s fits %s of GPU (predicted peak allocated %s, total %s; host %s; "
                "speed %.2f of unlimited memory)", plan.chosen.label, fmt_size(gpu), fmt_size(e.gpu_peak_allocated),
                fmt_size(e.gpu_total), fmt_size(e.host_total), e.speed or 0)
    return plan
