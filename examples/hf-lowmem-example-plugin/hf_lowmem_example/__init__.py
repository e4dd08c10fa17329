"""An example third-party hf-lowmem plugin: ``example-sgd``, SGD with momentum as an optimizer plugin.

It shows the whole surface a small plugin needs, as one :class:`hf_lowmem.Plugin` object:

* attributes declare it: its name, kind, options (a dataclass, so a misspelled option is an error listing
  the valid ones), and the distributed modes it supports;
* ``optimizer_cls_and_kwargs`` says which optimizer to build; the Trainer builds it with its own
  parameter groups (weight decay split);
* ``callbacks`` adds a Trainer callback (here: it counts optimizer steps in ``ctx.state``);
* ``memory_model`` tells the memory planner what it costs (one momentum buffer per parameter), so
  ``hf-lowmem plan --require example-sgd`` and ``lowmem_gpu_memory`` plan it like a built-in optimizer.

The module registers the object from ``hf_lowmem_register``, the hook its entry point names. Nothing heavy
is imported at module level: torch and transformers are imported inside the methods. Select it with
``LowMemTrainingArguments(lowmem_optimizer="example-sgd", lowmem_options={"example-sgd": {"momentum": 0.8}})``
or ``--lowmem_optimizer example-sgd`` on the command line. Its tests (``tests/``) use ``hf_lowmem.testing``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_lowmem import Plugin, hookimpl


@dataclass
class ExampleSGDOptions:
    """Options of ``example-sgd`` (given as ``{"example-sgd": {...}}`` in ``lowmem_options``)."""

    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov needs a momentum above 0")


class ExampleSGD(Plugin):
    name, kind, options, lossless = "example-sgd", "optimizer", ExampleSGDOptions, False
    help = "SGD with momentum (example third-party plugin)"
    # only what has been tried: DeepSpeed brings its own optimizer handling, so it is not declared
    modes = ("single", "ddp", "fsdp")

    def optimizer_cls_and_kwargs(self, ctx, model):
        import torch

        opts = ctx.options(self.name)
        return torch.optim.SGD, {"lr": ctx.args.learning_rate, "momentum": opts.momentum, "nesterov": opts.nesterov}

    def callbacks(self, ctx):
        from transformers import TrainerCallback

        # ctx.state is scratch space for the run, keyed by plugin name: here, what the optimizer did
        record = ctx.state.setdefault(self.name, {"steps": 0, "momentum": ctx.options(self.name).momentum})

        class CountSteps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                record["steps"] += 1

        return [CountSteps()]

    def memory_model(self, plan, step):
        """SGD keeps one momentum buffer per parameter, in the parameter's dtype (none without momentum); its
        update reads the weight, gradient and buffer and writes the weight and buffer."""
        momentum = self.options_for(plan).momentum > 0
        step.states = plan.shape.params_total * plan.setup.param_bytes if momentum else 0
        step.opt_bytes_per_param = (5 if momentum else 3) * plan.setup.param_bytes


@hookimpl
def hf_lowmem_register(register):
    register(ExampleSGD())
