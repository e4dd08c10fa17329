"""The typed description of a stream-engine run (:class:`EngineSpec`): what the engine needs from a training
setup, instead of the Trainer's ``args``, the trainer object and an optimizer name. Built from a
Trainer run by :meth:`EngineSpec.from_training` (what the ``stream`` plugin does), or by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_lowmem.engine.stream_options import StreamOptions

#: optimizers the engine implements itself (AdamW with fp32, 8-bit or 4-bit states)
ENGINE_OPTIMIZERS = ("adamw", "bnb-adamw8bit")


@dataclass
class OptimizerSpec:
    """AdamW as the engine runs it.

    :param name: the selected optimizer plugin (``adamw`` or ``bnb-adamw8bit``); ``bnb-adamw8bit`` makes 8-bit
        states the default.
    :param param_groups: torch-style groups (``{"params": [...], "weight_decay": ...}``), e.g. the Trainer's
        decay / no-decay split; ``None``: one group of every trainable parameter.
    :param min_quant_size: tensors with fewer values keep fp32 states (bitsandbytes' ``min_8bit_size``).
    :param embeddings_fp32: keep the input embedding's states in fp32 (bitsandbytes' ``embeddings_32bit``).
    """

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    param_groups: list[dict] | None = None
    min_quant_size: int = 4096
    embeddings_fp32: bool = False


@dataclass
class EngineSpec:
    """Everything :class:`~hf_lowmem.engine.stream.StreamEngine` reads about the run.

    :param device: the compute device.
    :param compute_dtype: ``torch.bfloat16`` or ``torch.float32`` (fp16 needs loss scaling the engine lacks).
    :param optimizer: the AdamW it runs.
    :param stream: the ``stream`` plugin's options (tier, formats, budgets, ...).
    :param host_memory: the run's declared host budget for the whole process tree (``lowmem_host_memory``),
        used when ``stream.host_memory`` is unset.
    :param loss_over_window_items: the loss is summed over the window and divided by its number of labelled
        tokens (the Trainer's behaviour when the model accepts ``num_items_in_batch``); else each micro-batch's
        mean, divided by the number of micro-batches.
    :param average_tokens_across_devices: under several ranks, the window's labelled tokens are counted over all
        of them (the Trainer's default), so each rank's loss is multiplied by the number of ranks before the
        gradients are averaged, as the Trainer's ``compute_loss`` does.
    :param seed: seeds the stochastic-rounding generator of bf16 masters.
    """

    device: torch.device | str = "cpu"
    compute_dtype: torch.dtype = torch.float32
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    stream: StreamOptions = field(default_factory=StreamOptions)
    host_memory: str | int | None = None
    loss_over_window_items: bool = True
    average_tokens_across_devices: bool = True
    seed: int = 0

    @classmethod
    def from_training(cls, args: Any, *, trainer: Any = None, options: StreamOptions | None = None,
                      optimizer_name: str | None = None, optimizer_options: Any = None,
                      param_groups: list[dict] | None = None) -> EngineSpec:
        """The spec of a Trainer run: ``args`` (``TrainingArguments``), the selected optimizer plugin's name and
        options dataclass (``bnb-adamw8bit``'s ``min_8bit_size``, ``embeddings_32bit`` and ``betas`` are read)."""
        from hf_lowmem.errors import PluginError

        if getattr(args, "fp16", False):
            raise PluginError("the stream engine computes in bf16 or fp32; fp16 needs loss scaling it does not do. "
                              "Use --bf16 instead of --fp16")
        betas = (args.adam_beta1, args.adam_beta2)
        opt = OptimizerSpec(name=optimizer_name or "adamw", lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                            weight_decay=args.weight_decay, param_groups=param_groups)
        if optimizer_options is not None:
            if getattr(optimizer_options, "betas", None):
                opt.betas = tuple(float(b) for b in optimizer_options.betas)
            if getattr(optimizer_options, "min_8bit_size", None) is not None:
                opt.min_quant_size = int(optimizer_options.min_8bit_size)
            opt.embeddings_fp32 = bool(getattr(optimizer_options, "embeddings_32bit", False))
        return cls(device=args.device, compute_dtype=torch.bfloat16 if getattr(args, "bf16", False) else torch.float32,
                   optimizer=opt, stream=options or StreamOptions(),
                   host_memory=getattr(args, "lowmem_host_memory", None),
                   loss_over_window_items=bool(getattr(trainer, "model_accepts_loss_kwargs", True)),
                   average_tokens_across_devices=bool(getattr(args, "average_tokens_across_devices", True)),
                   seed=int(getattr(args, "seed", 0) or 0))
