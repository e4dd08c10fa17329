"""The plugin interface: what a plugin is (:class:`Plugin`), and the events every loaded module hears.

A plugin is an object that carries its own behaviour. A module named by an entry point in the
``hf_lowmem`` group registers its plugins, as ``llm`` registers models::

    from dataclasses import dataclass
    from hf_lowmem import Plugin, hookimpl

    @dataclass
    class SGDOptions:
        momentum: float = 0.9

    class MySGD(Plugin):
        name, kind, help = "my-sgd", "optimizer", "SGD with momentum"
        options = SGDOptions

        def optimizer_cls_and_kwargs(self, ctx, model):
            import torch  # nothing heavy at module import
            return torch.optim.SGD, {"lr": ctx.args.learning_rate, "momentum": ctx.options(self.name).momentum}

    @hookimpl
    def hf_lowmem_register(register):
        register(MySGD())

The attributes say what the plugin is (name, kind, options, the modes it supports, ...); the methods say
what it does. Every method has a default that does nothing, so a plugin overrides only what it needs.
Only the *selected* plugins are asked anything, and what a kind provides (the optimizer, the engine) is
asked of the selected plugin of that kind alone: a plugin never checks whether it is the selected one.

**Call order.** ``LowMemTrainer`` construction: the memory planner when ``lowmem_gpu_memory`` is set (it
tries every plugin's :meth:`Plugin.plan_variants` and, for each candidate plan, calls :meth:`Plugin.plan_setup`
then :meth:`Plugin.memory_model` of the plugins it selects; ``hf-lowmem plan`` does the same), then, for every selected
plugin in kind order (``quantization``, ``attention``, ``offload`` in the order given, ``optimizer``),
its required packages are imported, a CUDA-only plugin is checked to have a GPU, and
:meth:`Plugin.validate` runs; then the event :func:`hf_lowmem_validate`. Then, stage by stage in the
order of :data:`PREPARE_STAGES`, :meth:`Plugin.prepare_model` of the selected plugins of that kind, then
the event :func:`hf_lowmem_prepare_model`. Then :meth:`Plugin.callbacks` of the selected plugins and
the event :func:`hf_lowmem_callbacks`. At the end of construction, after the Trainer's own ``__init__``
and before it would move the model: :meth:`Plugin.create_engine` of the selected plugin that declares
``engine=True``. When training starts (``Trainer.create_optimizer``), unless an engine brought its own
or the user passed ``optimizers=``: :meth:`Plugin.create_optimizer` of the selected optimizer plugin
(by default the Trainer builds what :meth:`Plugin.optimizer_cls_and_kwargs` returns, with its own
parameter groups). For each micro-batch: :meth:`Plugin.compute_loss` of the selected plugins (the first
that returns a loss wins; none: the Trainer's own loss). When the model is saved (``save_model`` and
checkpoints): :meth:`Plugin.before_save` of the selected plugins, then the event
:func:`hf_lowmem_before_save`.

The events below are pluggy hooks: every loaded module that implements one hears it, selected or not
(a module may implement them without registering any plugin, as the telemetry module does). They run
in reverse load order: hf-lowmem's own modules load first, so a third-party module hears an event first.

Plugin objects are shared by every run of the process: keep per-run state in ``ctx.state``.

**From the 0.1 API** (``register(PluginInfo(...))`` and module-level hooks that check ``ctx.selected``):
make a ``Plugin`` subclass whose class attributes are the ``PluginInfo`` keywords (``check_selection=``
becomes the method); drop every "is it me?" guard; ``hf_lowmem_validate`` / ``hf_lowmem_callbacks`` /
``hf_lowmem_compute_loss`` / ``hf_lowmem_create_engine`` / ``hf_lowmem_before_save`` become the methods of
the same name without the prefix (``create_optimizer`` too); ``hf_lowmem_prepare_model(ctx, model, stage)``
becomes ``prepare_model(ctx, model)``, called in its kind's stage; an optimizer built over
``trainer_param_groups(trainer, model)`` returns ``(cls, kwargs)`` from ``optimizer_cls_and_kwargs`` instead
(or builds over :func:`hf_lowmem.context.trainer_param_groups` in ``create_optimizer`` if it needs its own
construction); ``hf_lowmem_estimate_memory`` becomes ``memory_model(plan, step)``. ``PluginInfo`` is still
accepted: it is ``Plugin``, for a plugin with no behaviour of its own.

(Over 400 lines: this module is the plugin interface's reference documentation, one docstring per method
and event; splitting it would split the reference.)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import types
from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

from hf_lowmem.errors import MissingExtraError, PluginError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import TrainerCallback

    from hf_lowmem.context import LowMemContext
    from hf_lowmem.engine.interface import TrainingEngine
    from hf_lowmem.planner import MemoryEstimate, PlanInput, Step, TrainSetup

PROJECT = "hf_lowmem"
#: the entry-point group plugins register under (``[project.entry-points.hf_lowmem]``)
ENTRY_POINT_GROUP = "hf_lowmem"

hookspec = pluggy.HookspecMarker(PROJECT)
#: decorator for event implementations (and ``hf_lowmem_register``) in plugin modules
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("optimizer", "quantization", "attention", "offload")
#: distributed modes a plugin can declare support for (see :attr:`Plugin.modes`)
MODES = ("single", "dp", "ddp", "fsdp", "deepspeed")
#: the stages of model preparation, in the order they run (a plugin prepares in its kind's stage)
PREPARE_STAGES = ("quantization", "attention", "offload", "optimizer")


class Plugin:
    """A selectable plugin. Subclass it, set the attributes, override the methods you need, and register
    an instance from ``hf_lowmem_register``. ``Plugin(name=..., kind=..., ...)`` (or a subclass with
    keyword arguments) sets attributes per instance, e.g. one class registered once per variant.

    Attributes (class attributes, or keyword arguments):

    :ivar name: the name users select it by (lower case, ``-`` separated), unique across plugins.
    :ivar kind: ``optimizer``, ``quantization``, ``attention`` or ``offload``.
    :ivar help: one line for ``hf-lowmem plugins`` and error messages.
    :ivar requires: importable module names it needs, imported before :meth:`validate`.
    :ivar extra: the ``hf-lowmem[extra]`` that installs ``requires`` (named in the error when one is missing).
    :ivar options: a dataclass; the user's ``lowmem_options[name]`` are validated against its fields and
        reach the plugin as ``ctx.options(name)`` (an instance, defaults filled in).
    :ivar modes: distributed modes it supports (``single``, ``dp`` [one process, ``torch.nn.DataParallel``],
        ``ddp``, ``fsdp``, ``deepspeed``); any other is refused before training, identically on every rank.
    :ivar incompatible: other plugin names (or kinds) mapped to why they cannot be combined with it.
    :ivar lossless: whether results equal plain training (offload, checkpointing) or not (8-bit, low rank).
    :ivar needs_cuda: it only runs on a CUDA GPU.
    :ivar essential: it cannot be blocked (``HF_LOWMEM_DISABLE_PLUGINS``).
    :ivar engine: it provides a training engine (:meth:`create_engine`) that decides where the weights live;
        the Trainer then does not move the model to the GPU.
    :ivar provides: capabilities other plugins may look for with ``ctx.provides(...)`` instead of naming
        this plugin (e.g. ``"saved-tensor-hooks"``: it moves tensors saved for backward).
    :ivar quality_gap: for a lossy optimizer (or quantization), its measured eval-loss gap against AdamW when
        both run at AdamW's learning rate, in percent of AdamW's eval loss (``None``: not measured). At equal
        speed the planner prefers the plan whose plugins' gaps add up to the least.
    :ivar lr_advice: one line on the learning rate it needs against the user's AdamW one, with the numbers
        (``hf-lowmem plugins`` and the README table show it); empty when there is nothing to say.
    :ivar distribution: filled in at registration: the distribution that registered it.
    :ivar version: filled in at registration: that distribution's version.
    """

    name: str = ""
    kind: str = ""
    help: str = ""
    requires: tuple[str, ...] = ()
    extra: str | None = None
    options: type | None = None
    modes: tuple[str, ...] = MODES
    incompatible: Mapping[str, str] = types.MappingProxyType({})
    lossless: bool = True
    needs_cuda: bool = False
    essential: bool = False
    engine: bool = False
    provides: tuple[str, ...] = ()
    quality_gap: float | None = None
    lr_advice: str = ""
    distribution: str = ""
    version: str = ""

    def __init__(self, **attributes: Any) -> None:
        for key, value in attributes.items():
            if key.startswith("_") or not hasattr(type(self), key):
                raise PluginError(f"{type(self).__name__}() got an unknown attribute {key!r}")
            setattr(self, key, value)
        self.check()

    def check(self) -> None:
        """Raise :class:`PluginError` when the declaration itself is wrong (called at construction and
        at registration)."""
        if not self.name or self.name != self.name.strip():
            raise PluginError(f"{type(self).__name__} has no name; set `name = \"my-plugin\"`")
        if self.kind not in KINDS:
            raise PluginError(f"plugin {self.name!r} declares kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise PluginError(f"plugin {self.name!r} declares unknown modes {bad}; modes are {', '.join(MODES)}")

    def __repr__(self) -> str:
        origin = f" from {self.distribution} {self.version}".rstrip() if self.distribution else ""
        return f"<{type(self).__name__} {self.name!r} ({self.kind}){origin}>"

    # ---- declarations -------------------------------------------------------------------------------
    def check_selection(self, by_kind: Mapping[str, list[str]]) -> str | None:
        """Why the selection (names by kind) cannot work with this plugin, or ``None``: for rules a static
        :attr:`incompatible` map cannot express (e.g. "only these optimizers"). Called when it is selected."""
        return None

    def default_options(self) -> Any:
        """Its options with every default (``None`` when it takes none)."""
        return self.options() if self.options is not None else None

    def parse_options(self, raw: Mapping[str, Any] | None) -> Any:
        """Build the options dataclass from the user's mapping; unknown keys are an error listing valid ones."""
        raw = dict(raw or {})
        if self.options is None:
            if raw:
                raise PluginError(f"plugin {self.name!r} takes no options, got {sorted(raw)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise PluginError(f"plugin {self.name!r} has no option(s) {unknown}; its options are: "
                              + ", ".join(f"{n} (default {_default(f)!r})" for n, f in fields.items()))
        try:
            return self.options(**raw)
        except (TypeError, ValueError) as e:
            raise PluginError(f"bad options for plugin {self.name!r}: {e}") from e

    def missing_requirements(self) -> list[str]:
        """The required modules that are not installed (cheap: does not import them)."""
        return [m for m in self.requires if importlib.util.find_spec(m.split(".")[0]) is None]

    def import_requirements(self) -> None:
        """Import every required module; raise :class:`MissingExtraError` naming the extra if one fails."""
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:  # an ImportError, or a broken install raising anything at import
                raise MissingExtraError(self.name, mod.split(".")[0], self.extra, e) from e

    # ---- the run (called only while this plugin is selected) ---------------------------------------------
    def validate(self, ctx: LowMemContext) -> None:
        """Check that it can run here, before the model is touched (its ``requires`` are imported already).
        Raise :class:`~hf_lowmem.errors.PluginError` saying how to fix the problem. Decide from ``ctx``
        alone, so that every rank of a distributed run reaches the same verdict.

        :param ctx: the run's context (``ctx.args``, ``ctx.options(self.name)``, the selection).
        :return: nothing; raise to refuse.
        """

    def prepare_model(self, ctx: LowMemContext, model: torch.nn.Module) -> torch.nn.Module | None:
        """Prepare or patch the model, once, in the stage of its kind (see :data:`PREPARE_STAGES`). Patch the
        model *instance*, never its class.

        :param ctx: the run's context.
        :param model: the model as prepared by earlier stages.
        :return: a replacement model, or ``None`` to keep ``model`` (changed in place or not).
        """
        return None

    def callbacks(self, ctx: LowMemContext) -> list[TrainerCallback]:
        """Trainer callbacks to add to the run (they run before the Trainer's own ones, so keys they add to
        ``logs`` reach every ``report_to`` integration).

        :param ctx: the run's context.
        :return: a list of ``transformers.TrainerCallback`` instances (empty by default).
        """
        return []

    def create_engine(self, ctx: LowMemContext, model: torch.nn.Module, trainer: Any) -> TrainingEngine | None:
        """The engine that takes over forward, backward and the optimizer step (only for ``engine = True``).
        Called at the end of ``LowMemTrainer`` construction, after the Trainer's own ``__init__`` and before
        the model would be moved to the GPU; the Trainer keeps data, the LR schedule, logging, callbacks and
        checkpoints (see :class:`hf_lowmem.engine.interface.TrainingEngine`).

        :param ctx: the run's context.
        :param model: the prepared model, still where the user put it: the engine decides placement.
        :param trainer: the ``LowMemTrainer``.
        :return: the engine (``None`` is an error for an engine plugin).
        """
        return None

    def optimizer_cls_and_kwargs(self, ctx: LowMemContext, model: torch.nn.Module) -> tuple[type, dict] | None:
        """What the Trainer needs to build this optimizer: a ``torch.optim.Optimizer`` subclass and its
        keyword arguments (the ``optimizer_cls_and_kwargs`` of ``transformers.Trainer``). The Trainer builds
        it with its own parameter groups (weight decay split, device meshes), as for ``args.optim``.

        :param ctx: the run's context (``ctx.args.learning_rate``, ``adam_beta1``, ...).
        :param model: the prepared model.
        :return: ``(optimizer class, kwargs)``, or ``None`` for the Trainer's own ``args.optim``.
        """
        return None

    def create_optimizer(self, ctx: LowMemContext, model: torch.nn.Module, trainer: Any) -> torch.optim.Optimizer | None:
        """Build the optimizer. Called once, when the Trainer asks for its optimizer, unless the user passed
        one (``optimizers=``) or an engine brought its own. The default builds what
        :meth:`optimizer_cls_and_kwargs` returns, through ``Trainer.create_optimizer`` itself; override it
        only for an optimizer that needs its own construction (layer-wise updates, its own parameter
        groups), or call ``super()`` and adjust what it returns.

        :param ctx: the run's context.
        :param model: the prepared model.
        :param trainer: the ``LowMemTrainer`` (``trainer.get_decay_parameter_names(model)``).
        :return: an optimizer, or ``None`` for the Trainer's own ``args.optim``.
        """
        made = self.optimizer_cls_and_kwargs(ctx, model)
        if made is None:
            return None
        from hf_lowmem.context import trainer_optimizer

        return trainer_optimizer(trainer, model, *made)

    def compute_loss(self, ctx: LowMemContext, model: torch.nn.Module, inputs: dict,
                     num_items_in_batch: Any) -> torch.Tensor | None:
        """The training loss of one micro-batch, in place of ``Trainer.compute_loss``: the sum over tokens
        divided by ``num_items_in_batch`` when that is given, else the mean, as the Trainer scales it.

        :param ctx: the run's context.
        :param model: the (possibly wrapped) model.
        :param inputs: the micro-batch, on the device.
        :param num_items_in_batch: tokens with a label in the whole accumulation window, or ``None``.
        :return: a scalar loss tensor, or ``None`` to leave it to the next plugin or the Trainer.
        """
        return None

    def before_save(self, ctx: LowMemContext, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        """Rewrite the state dict about to be saved, in place (restore the original precision, drop
        plugin-only keys, gather offloaded tensors), so that the folder is a standard transformers checkpoint.

        :param ctx: the run's context.
        :param model: the model being saved.
        :param state_dict: name to tensor; change it in place.
        :return: nothing.
        """

    # ---- the memory planner (no model is loaded and no GPU touched here) ----------------------------------
    def plan_variants(self) -> list[dict]:
        """The option sets the planner tries when it chooses plugins on its own (``lowmem_gpu_memory``,
        ``hf-lowmem plan``): ``[{}]`` (the defaults) unless overridden; ``[]`` keeps the planner from picking
        it on its own (it is still planned when the user selects it). A plugin without a memory model is
        never picked on its own.

        :return: a list of option dicts (each as in ``lowmem_options[name]``).
        """
        return [{}] if self.has_memory_model() else []

    def plan_setup(self, plan: PlanInput) -> TrainSetup | None:
        """How selecting it changes the way the model trains, before any memory is counted (e.g. the
        attention implementation).

        :param plan: the plan (:class:`hf_lowmem.planner.PlanInput`).
        :return: a changed ``plan.setup`` (``dataclasses.replace(plan.setup, ...)``), or ``None``.
        """
        return None

    def lossless_in(self, plan: PlanInput) -> bool:
        """Whether it leaves the results unchanged with this plan's options (default: :attr:`lossless`)."""
        return self.lossless

    def quality_gap_in(self, plan: PlanInput) -> float | None:
        """Its measured eval-loss gap with this plan's options, in percent (default: :attr:`quality_gap`); asked
        by the planner only when :meth:`lossless_in` is false."""
        return self.quality_gap

    def memory_model(self, plan: PlanInput, step: Step) -> MemoryEstimate | None:
        """Its memory model: change ``step``, the tensor classes of one training step that the planner then
        replays to find the GPU peak (weights, gradients, optimizer states, saved activations per layer,
        logits, temporaries, host memory, speed terms; see :class:`hf_lowmem.planner.Step`). Called in kind
        order, after the Trainer's defaults and the plugins of earlier kinds have filled ``step``.
        ``plan.shape`` (parameter counts, hidden size, heads, vocabulary), ``plan.setup`` (micro-batch,
        sequence length, accumulation, precision, device) and ``self.options_for(plan)`` are what it reads.
        An engine that runs the whole step itself returns a :class:`~hf_lowmem.planner.MemoryEstimate`
        instead, which replaces the replay. Raise :class:`~hf_lowmem.planner.PlanRefused` when the plugin
        would refuse this plan (the planner then drops it). A plugin that does not override this has no
        memory model: the planner never picks it on its own and says that it is not counted.

        :param plan: the plan (:class:`hf_lowmem.planner.PlanInput`).
        :param step: the step to change in place.
        :return: ``None``, or a whole estimate (engines).
        """
        return None

    def has_memory_model(self) -> bool:
        return type(self).memory_model is not Plugin.memory_model

    def options_for(self, plan: PlanInput) -> Any:
        """Its options in ``plan`` (the defaults when the plan gives none)."""
        opts = plan.options.get(self.name)
        return opts if opts is not None else self.default_options()


#: the plugin object of the 0.1 API: declares a plugin with keyword arguments and no behaviour of its own
PluginInfo = Plugin


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"


# ---- the events ------------------------------------------------------------------------------------------
@hookspec
def hf_lowmem_register(register: Callable[[Plugin], None]) -> None:
    """Declare the plugins this module provides: call ``register(plugin)`` with each :class:`Plugin`
    object (a module may provide several, e.g. one per optimizer variant).

    Called once per module when plugins are loaded, before anything else. The core owns names:
    registering a name that another module already registered is an error naming both, and the module
    that failed is left out (with everything it registered).

    :param register: callable taking one :class:`Plugin`.
    :return: nothing.
    """


@hookspec
def hf_lowmem_validate(ctx: LowMemContext) -> None:
    """Event: the run's selection is about to be used. Called at ``LowMemTrainer`` construction, after the
    selected plugins' own :meth:`Plugin.validate`, before the model is touched, in every loaded module.
    For checks that are not about one plugin (a site policy, a combination rule). Decide from ``ctx``
    alone, so that every rank reaches the same verdict.

    :param ctx: the run's context (arguments, selected plugins, their options).
    :return: nothing; raise :class:`~hf_lowmem.errors.PluginError` to refuse.
    """


@hookspec
def hf_lowmem_prepare_model(ctx: LowMemContext, model: torch.nn.Module, stage: str) -> torch.nn.Module | None:
    """Event: one stage of model preparation is done. Called once per stage, in the order of
    :data:`PREPARE_STAGES`, after the selected plugins of that kind prepared the model, in every loaded
    module. Patch the model *instance* only.

    :param ctx: the run's context.
    :param model: the model as prepared so far.
    :param stage: one of ``"quantization"``, ``"attention"``, ``"offload"``, ``"optimizer"``.
    :return: a replacement model, or ``None`` to keep ``model``.
    """


@hookspec
def hf_lowmem_callbacks(ctx: LowMemContext) -> list[TrainerCallback] | None:
    """Event: callbacks are collected. Called once at ``LowMemTrainer`` construction, after the selected
    plugins' :meth:`Plugin.callbacks`, in every loaded module; all results are concatenated (the telemetry
    module adds its callback to every run this way).

    :param ctx: the run's context.
    :return: a list of ``transformers.TrainerCallback`` instances, or ``None``.
    """


@hookspec
def hf_lowmem_before_save(ctx: LowMemContext, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Event: a state dict is about to be written. Called by ``save_model`` and at each checkpoint, after
    the selected plugins' :meth:`Plugin.before_save`, in every loaded module; change it in place.

    :param ctx: the run's context.
    :param model: the model being saved.
    :param state_dict: name to tensor.
    :return: nothing.
    """
