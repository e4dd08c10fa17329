"""The hook specification: every hook a hf-lowmem plugin can implement.

A plugin is a module (or object) that an entry point in the ``hf_lowmem`` group names. It implements
some of the hooks below, marked with :data:`hookimpl`::

    from hf_lowmem import hookimpl, PluginInfo

    @hookimpl
    def hf_lowmem_register(register):
        register(PluginInfo(name="my-adam", kind="optimizer", help="Adam with a twist"))

    @hookimpl
    def hf_lowmem_create_optimizer(ctx, model):
        if ctx.selected("optimizer") == "my-adam":
            return MyAdam(model.parameters(), lr=ctx.args.learning_rate)

Every hook is called with keyword arguments, so an implementation may accept any subset of the
parameters documented here (pluggy passes only those it names). Implementations that are not about
the selected plugin return ``None`` and are skipped.

**Call order.** At ``LowMemTrainer`` construction: :func:`hf_lowmem_validate` (all plugins, before the
model is touched), then :func:`hf_lowmem_prepare_model` once per stage in the order
``quantization``, ``attention``, ``offload``, ``optimizer``, then :func:`hf_lowmem_callbacks`. When training
starts: :func:`hf_lowmem_create_engine` (first non-``None`` wins), then :func:`hf_lowmem_create_optimizer`
(unless an engine brought its own). During training: :func:`hf_lowmem_compute_loss` for each
micro-batch (first non-``None`` wins; ``None`` everywhere means the Trainer's own loss). When the
model is saved: :func:`hf_lowmem_before_save` on the state dict that will be written. Whenever the
memory planner runs (``hf-lowmem plan``, ``lowmem_gpu_memory``): :func:`hf_lowmem_estimate_memory` for
each plugin of each candidate plan, with no model loaded.

Within one hook, pluggy calls implementations in reverse registration order; hf-lowmem registers
first-party plugins first, so a third-party implementation runs before a first-party one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import TrainerCallback

    from hf_lowmem.context import LowMemContext
    from hf_lowmem.engine.interface import TrainingEngine
    from hf_lowmem.registry import PluginInfo

PROJECT = "hf_lowmem"
#: the entry-point group plugins register under (``[project.entry-points.hf_lowmem]``)
ENTRY_POINT_GROUP = "hf_lowmem"

hookspec = pluggy.HookspecMarker(PROJECT)
#: decorator for hook implementations in plugins
hookimpl = pluggy.HookimplMarker(PROJECT)

#: the stages of :func:`hf_lowmem_prepare_model`, in the order they run
PREPARE_STAGES = ("quantization", "attention", "offload", "optimizer")


@hookspec
def hf_lowmem_register(register: Callable[[PluginInfo], None]) -> None:
    """Declare the named plugins this module provides.

    Called once when plugins are loaded, before any other hook. Call ``register(PluginInfo(...))`` for
    each selectable plugin (a module may provide several, e.g. one per optimizer variant). The core owns
    names: registering a name that another module already registered is an error naming both.

    :param register: callable taking one :class:`hf_lowmem.registry.PluginInfo`.
    :return: nothing.
    """


@hookspec
def hf_lowmem_validate(ctx: LowMemContext) -> None:
    """Check that the selected plugins can run here, before anything heavy is loaded.

    Called at ``LowMemTrainer`` construction, for every loaded plugin, before the model is prepared.
    Import optional dependencies here (not at module import) and check the hardware. Raise
    :class:`hf_lowmem.errors.PluginError` (or :class:`~hf_lowmem.errors.MissingExtraError`) with a
    message that says how to fix the problem. Implementations must decide from ``ctx`` alone so every
    rank of a distributed run reaches the same verdict.

    :param ctx: the run's context (arguments, selected plugins, their options).
    :return: nothing; raise to refuse.
    """


@hookspec
def hf_lowmem_prepare_model(ctx: LowMemContext, model: torch.nn.Module, stage: str) -> torch.nn.Module | None:
    """Prepare or patch the model for one stage.

    Called once per stage, in the order of :data:`PREPARE_STAGES`, at ``LowMemTrainer`` construction.
    Patch the model *instance* (never its class). Act only when ``ctx.selected(stage)`` names your
    plugin (for ``offload``, when ``ctx.is_selected(name)``).

    :param ctx: the run's context.
    :param model: the model as prepared by earlier stages.
    :param stage: one of ``"quantization"``, ``"attention"``, ``"offload"``, ``"optimizer"``.
    :return: a replacement model, or ``None`` to keep ``model`` (modified in place or not).
    """


@hookspec(firstresult=True)
def hf_lowmem_create_engine(ctx: LowMemContext, model: torch.nn.Module, trainer: Any) -> TrainingEngine | None:
    """Return an engine that takes over forward, backward and the optimizer step.

    Called once when training starts, before the optimizer is created. An engine (see
    :class:`hf_lowmem.engine.interface.TrainingEngine`) owns where weights live and how a step runs; the
    Trainer keeps data loading, the LR schedule, logging, callbacks and checkpointing. ``firstresult``:
    the first non-``None`` result wins.

    :param ctx: the run's context.
    :param model: the prepared model (still where the user put it: the engine decides placement).
    :param trainer: the ``LowMemTrainer``.
    :return: an engine, or ``None``.
    """


@hookspec(firstresult=True)
def hf_lowmem_create_optimizer(ctx: LowMemContext, model: torch.nn.Module, trainer: Any) -> torch.optim.Optimizer | None:
    """Create the optimizer.

    Called once when the Trainer asks for its optimizer, unless the user passed one in ``optimizers=``
    or an engine provides its own. ``firstresult``: the first non-``None`` result wins; ``None``
    everywhere means the Trainer's own ``args.optim``.

    :param ctx: the run's context (``ctx.args.learning_rate``, ``weight_decay``, betas, ...).
    :param model: the prepared model.
    :param trainer: the ``LowMemTrainer`` (for ``get_decay_parameter_names``).
    :return: an optimizer, or ``None``.
    """


@hookspec(firstresult=True)
def hf_lowmem_compute_loss(
    ctx: LowMemContext, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any
) -> torch.Tensor | None:
    """Compute the training loss of one micro-batch.

    Called for each micro-batch in place of ``Trainer.compute_loss``. Return the loss scaled as the
    Trainer's own would be: the sum over tokens divided by ``num_items_in_batch`` when that is given,
    else the mean. ``firstresult``.

    :param ctx: the run's context.
    :param model: the (possibly wrapped) model.
    :param inputs: the micro-batch, already on the device.
    :param num_items_in_batch: tokens with a label in the whole accumulation window, or ``None``.
    :return: a scalar loss tensor, or ``None`` to leave it to the Trainer.
    """


@hookspec
def hf_lowmem_callbacks(ctx: LowMemContext) -> list[TrainerCallback] | None:
    """Return Trainer callbacks to add to the run.

    Called once at ``LowMemTrainer`` construction. The results of all plugins are concatenated.

    :param ctx: the run's context.
    :return: a list of ``transformers.TrainerCallback`` instances, or ``None``.
    """


@hookspec
def hf_lowmem_before_save(ctx: LowMemContext, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Rewrite the state dict about to be saved, in place.

    Called by ``LowMemTrainer.save_model`` and at each checkpoint, for every plugin. Use it to restore
    the original precision (dequantize), drop plugin-only keys, or gather offloaded tensors, so that the
    saved folder is a standard transformers checkpoint.

    :param ctx: the run's context.
    :param model: the model being saved.
    :param state_dict: name to tensor; modify it in place.
    :return: nothing.
    """


@hookspec(firstresult=True)
def hf_lowmem_estimate_memory(plan: Any, name: str, options: Any, estimate: Any) -> Any:
    """Return the memory estimate of a plan that selects your plugin ``name``: your plugin's memory model.

    Called by the memory planner (:mod:`hf_lowmem.planner`: ``hf-lowmem plan``, and
    ``LowMemTrainingArguments(lowmem_gpu_memory=...)``) for each plugin name in a plan, in the order
    ``quantization``, ``attention``, ``offload``, ``optimizer``, after the planner's built-in models
    (first-party plugins) have produced ``estimate``. Answer only when ``name`` is one of yours; the
    planner never loads a model or touches a GPU here, and neither should you. Plugins without a memory
    model (no built-in one, ``None`` here) are never chosen by the planner automatically; when a user
    selects one, the estimate says it is not counted. ``firstresult``: the first non-``None`` result wins,
    so a third-party implementation overrides a first-party one.

    :param plan: a :class:`hf_lowmem.planner.PlanInput`: ``plan.shape`` (parameter counts per block, hidden
        size, heads, vocabulary), ``plan.setup`` (micro-batch, sequence length, accumulation, precision,
        device), ``plan.selection`` / ``plan.names()`` (every plugin of the plan), ``plan.device`` (rates).
    :param name: the plugin being asked about.
    :param options: its parsed options dataclass (``None`` if it takes none).
    :param estimate: the :class:`hf_lowmem.planner.MemoryEstimate` so far. Its ``gpu`` dict maps
        components (``weights``, ``gradients``, ``optimizer states``, ``activations``, ``logits``,
        ``temporaries``, ``transfer buffers``, ``framework overhead``) to bytes at the GPU peak, and sums
        to the predicted ``torch.cuda.max_memory_allocated``; ``gpu_extra`` is GPU memory outside torch's
        allocator; ``host`` is host RAM; ``speed`` is throughput relative to unlimited GPU memory.
    :return: a new :class:`~hf_lowmem.planner.MemoryEstimate` (e.g. ``estimate.replace(...)`` with your
        components changed), or ``None`` when ``name`` is not yours.
    """
