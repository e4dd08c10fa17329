"""The essential plugin: PyTorch's AdamW as a named optimizer plugin (what the Trainer uses by default).

It cannot be blocked, so ``hf-lowmem plugins`` always lists at least one optimizer, and it is the
reference the lossy optimizers are compared with.
"""

from __future__ import annotations

from hf_lowmem import hookimpl
from hf_lowmem.registry import PluginInfo


@hookimpl
def hf_lowmem_register(register):
    register(PluginInfo(
        name="adamw", kind="optimizer", essential=True,
        help="torch.optim.AdamW (fused on CUDA), with the Trainer's weight-decay groups: the lossless reference",
    ))


def trainer_param_groups(trainer, model):
    """The Trainer's two parameter groups: with and without weight decay."""
    decay = set(trainer.get_decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if n in decay], "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]


@hookimpl
def hf_lowmem_create_optimizer(ctx, model, trainer):
    if ctx.selected("optimizer") != "adamw":
        return None
    import torch

    args = ctx.args
    on_cuda = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        trainer_param_groups(trainer, model), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, fused=True if on_cuda else None,
    )


@hookimpl
def hf_lowmem_validate(ctx):
    """For every selected plugin: its required packages really import (else the error names the extra to
    install), and a CUDA-only plugin has a GPU to run on."""
    from hf_lowmem.errors import PluginError

    for info in ctx.plugins:
        info.import_requirements()
        if info.needs_cuda:
            import torch

            if not torch.cuda.is_available() or getattr(ctx.args, "use_cpu", False):
                raise PluginError(f"plugin {info.name!r} needs a CUDA GPU and this run has none"
                                  " (choose another plugin, or run on a machine with a GPU)")
