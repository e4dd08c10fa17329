"""The essential plugin: PyTorch's AdamW as a named optimizer plugin (what the Trainer uses by default).

It cannot be blocked, so ``hf-lowmem plugins`` always lists at least one optimizer, and it is the
reference the lossy optimizers are compared with.
"""

from __future__ import annotations

from hf_lowmem import Plugin, hookimpl


class AdamWPlugin(Plugin):
    name, kind, essential = "adamw", "optimizer", True
    help = "torch.optim.AdamW (fused on CUDA), with the Trainer's weight-decay groups: the lossless reference"

    def optimizer_cls_and_kwargs(self, ctx, model):
        import torch

        args = ctx.args
        on_cuda = any(p.is_cuda for p in model.parameters())
        return torch.optim.AdamW, dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                       eps=args.adam_epsilon, fused=True if on_cuda else None)

    def memory_model(self, plan, step):
        from hf_lowmem.planner import adamw_states

        adamw_states(plan, step)  # the Trainer's default optimizer, which the planner counts without a plugin too


@hookimpl
def hf_lowmem_register(register):
    register(AdamWPlugin())
