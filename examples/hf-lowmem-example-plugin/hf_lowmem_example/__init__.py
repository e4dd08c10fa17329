"""An example third-party hf-lowmem plugin: ``example-sgd``, SGD with momentum as an optimizer plugin.

It shows the whole plugin surface a small plugin needs:

* ``hf_lowmem_register`` declares the plugin: its name, kind, options (a dataclass, so a misspelled
  option is an error listing the valid ones), and the distributed modes it supports;
* ``hf_lowmem_create_optimizer`` builds the optimizer when the plugin is selected;
* ``hf_lowmem_callbacks`` adds a Trainer callback (here: it counts optimizer steps in ``ctx.state``).

Nothing heavy is imported at module level: torch and transformers are imported inside the hooks.
Select it with ``LowMemTrainingArguments(lowmem_optimizer="example-sgd",
lowmem_options={"example-sgd": {"momentum": 0.8}})`` or ``--lowmem_optimizer example-sgd`` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_lowmem import PluginInfo, hookimpl

NAME = "example-sgd"


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


@hookimpl
def hf_lowmem_register(register):
    register(PluginInfo(
        name=NAME, kind="optimizer", help="SGD with momentum (example third-party plugin)",
        options=ExampleSGDOptions, lossless=False,
        # only what has been tried: DeepSpeed brings its own optimizer handling, so it is not declared
        modes=("single", "ddp", "fsdp"),
    ))


@hookimpl
def hf_lowmem_create_optimizer(ctx, model, trainer):
    if ctx.selected("optimizer") != NAME:
        return None  # not ours: let the other plugins (or the Trainer) answer
    import torch

    opts = ctx.options(NAME)
    decay = set(trainer.get_decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": ctx.args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=ctx.args.learning_rate, momentum=opts.momentum, nesterov=opts.nesterov)


@hookimpl
def hf_lowmem_callbacks(ctx):
    if not ctx.is_selected(NAME):
        return None
    from transformers import TrainerCallback

    # ctx.state is scratch space for the run, keyed by plugin name: here, what the optimizer did
    record = ctx.state.setdefault(NAME, {"steps": 0, "momentum": ctx.options(NAME).momentum})

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["steps"] += 1

    return [CountSteps()]
