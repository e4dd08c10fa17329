"""The per-run context every plugin method receives: the arguments, which plugins are selected, their
options, the memory plan; and the two ways the Trainer builds an optimizer for a plugin."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hf_lowmem.errors import PluginError
from hf_lowmem.spec import KINDS, Plugin

if TYPE_CHECKING:  # pragma: no cover
    from hf_lowmem.planner import Plan
    from hf_lowmem.plugins import PluginHost


def distributed_mode(args: Any = None) -> str:
    """``single``, ``dp``, ``ddp``, ``fsdp`` or ``deepspeed``, from the arguments and what ``accelerate launch``
    / ``torchrun`` put in the environment. Pure function of those, so every rank decides the same.

    ``dp`` is a plain ``python script.py`` on a machine where the process sees several GPUs: the Trainer
    then wraps the model in ``torch.nn.DataParallel`` (``args.n_gpu > 1``), one thread per GPU."""
    env = os.environ
    if (args is not None and getattr(args, "deepspeed", None)) or truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return "deepspeed"
    if (args is not None and getattr(args, "fsdp", None)) or truthy(env.get("ACCELERATE_USE_FSDP")):
        return "fsdp"
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return "ddp"
    if args is not None and (getattr(args, "n_gpu", 1) or 1) > 1:  # TrainingArguments computed it already
        return "dp"
    return "single"


#: what to do when a plugin refuses torch.nn.DataParallel (one process, several GPUs)
DP_HINT = ("This process sees several GPUs, so the Trainer would run torch.nn.DataParallel over them. Launch one "
           "process per GPU instead (`accelerate launch --multi_gpu script.py` or `torchrun`), or use one GPU "
           "(`CUDA_VISIBLE_DEVICES=0 python script.py`).")


def mixed_precision_dtype(args: Any):
    """The dtype the Trainer's mixed precision computes in for these arguments (``bf16=True``:
    ``torch.bfloat16``, ``fp16=True``: ``torch.float16``), or ``None`` for full precision. Plugins that
    run model code outside ``model.forward`` (which accelerate wraps in ``torch.autocast``) use it."""
    import torch

    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def truthy(value: str | None) -> bool:
    """An environment variable read as a flag: ``1``, ``true``, ``yes``, ``on`` (any case) are true."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def trainer_optimizer(trainer: Any, model: Any, cls: type, kwargs: dict) -> Any:
    """``cls`` built by ``transformers.Trainer.create_optimizer`` itself, with the Trainer's own parameter
    groups (weight-decay split, one group per device mesh) and ``kwargs``: what the Trainer does with its
    ``optimizer_cls_and_kwargs``. ``cls`` must subclass ``torch.optim.Optimizer``."""
    from transformers import Trainer

    saved = trainer.optimizer, trainer.optimizer_cls_and_kwargs
    trainer.optimizer, trainer.optimizer_cls_and_kwargs = None, (cls, dict(kwargs))
    try:
        return Trainer.create_optimizer(trainer, model)
    finally:
        trainer.optimizer, trainer.optimizer_cls_and_kwargs = saved


def trainer_param_groups(trainer: Any, model: Any) -> list[dict]:
    """The Trainer's own parameter groups for ``model``, exactly as ``Trainer.create_optimizer`` makes them
    (for a plugin that builds its optimizer elsewhere, e.g. an engine)."""
    import torch

    class Capture(torch.optim.Optimizer):
        def __init__(self, groups, **kwargs):  # records the groups; never steps
            self.groups = groups

    return trainer_optimizer(trainer, model, Capture, {}).groups


@dataclass
class Selection:
    """Plugins chosen for a run: one name per kind (several for ``offload``) and their parsed options."""

    by_kind: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    options: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [n for k in KINDS for n in self.by_kind[k]]


def resolve_selection(host: PluginHost, requested: dict[str, list[str]], raw_options: dict[str, dict], mode: str) -> Selection:
    """Check a request against the registry: names exist and have the right kind, options are valid,
    no two selected plugins are incompatible, and each supports the distributed ``mode``.
    Raises :class:`PluginError` with what is available and why a combination cannot work."""
    reg = host.registry
    sel = Selection()
    for kind in KINDS:
        names = requested.get(kind) or []
        if kind != "offload" and len(names) > 1:
            raise PluginError(f"only one {kind} plugin can be selected, got {names}")
        for name in names:
            try:
                info = reg.get(name, kind)
            except PluginError as e:
                if name in reg or not getattr(host, "blocked", None):
                    raise
                raise PluginError(f"{e} {_blocked_hint(host)}") from None
            sel.by_kind[kind].append(info.name)
    unknown_opts = sorted(set(raw_options) - set(sel.names()))
    if unknown_opts:
        raise PluginError(
            f"options given for plugin(s) {unknown_opts} that are not selected; selected: {sel.names() or 'none'}"
        )
    for name in sel.names():
        sel.options[name] = reg[name].parse_options(raw_options.get(name))
    chosen = [reg[n] for n in sel.names()]
    for a in chosen:
        for b in chosen:
            if a is b:
                continue
            reason = a.incompatible.get(b.name) or a.incompatible.get(b.kind)
            if reason:
                raise PluginError(f"plugins {a.name!r} and {b.name!r} cannot be combined: {reason}")
        reason = a.check_selection(sel.by_kind)
        if reason:
            raise PluginError(f"plugin {a.name!r} cannot be used with this selection: {reason}")
        if mode not in a.modes:
            raise PluginError(
                f"plugin {a.name!r} does not support {mode} runs (it supports: {', '.join(a.modes)}). "
                + (DP_HINT if mode == "dp" else "Choose another plugin or launch without that mode.")
            )
    return sel


def _blocked_hint(host: PluginHost) -> str:
    """Which plugin modules the loader left out, and the variable that did it (the name may be in one)."""
    env = [f"{v}={os.environ[v]!r}" for v in ("HF_LOWMEM_PLUGINS", "HF_LOWMEM_DISABLE_PLUGINS") if os.environ.get(v)]
    why = " and ".join(env) if env else "the allow/block lists given to load_plugins()"
    return (f"Note: {why} left out the plugin module(s) {', '.join(sorted(host.blocked))}; unset it, or add the "
            "module that provides this plugin.")


@dataclass
class LowMemContext:
    """What every plugin method gets: ``args`` (the :class:`~hf_lowmem.args.LowMemTrainingArguments`), the
    loaded ``host``, the ``selection``, the distributed ``mode``, the memory ``plan`` that chose the plugins
    (when ``lowmem_gpu_memory`` is set; a :class:`hf_lowmem.planner.Plan`), and ``state``, scratch space
    plugins may share for the run (keyed by plugin name)."""

    args: Any
    host: PluginHost
    selection: Selection
    mode: str = "single"
    state: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None

    def selected(self, kind: str) -> str | None:
        """The selected plugin of ``kind`` (the first, for ``offload``), or ``None``."""
        names = self.selection.by_kind.get(kind) or []
        return names[0] if names else None

    def is_selected(self, name: str) -> bool:
        return name in self.selection.names()

    def options(self, name: str) -> Any:
        """The parsed options dataclass of a selected plugin (``None`` if it takes none)."""
        if not self.is_selected(name):
            raise PluginError(f"plugin {name!r} is not selected")
        return self.selection.options.get(name)

    def info(self, name: str) -> Plugin:
        """The registered plugin object ``name``."""
        return self.host.registry[name]

    def plugin(self, kind: str) -> Plugin | None:
        """The selected plugin object of ``kind`` (the first, for ``offload``), or ``None``."""
        name = self.selected(kind)
        return None if name is None else self.host.registry[name]

    @property
    def plugins(self) -> list[Plugin]:
        """The selected plugin objects, in kind order (offload plugins in the order given)."""
        return [self.host.registry[n] for n in self.selection.names()]

    def provides(self, capability: str) -> bool:
        """Whether a selected plugin declares ``capability`` in its :attr:`~hf_lowmem.spec.Plugin.provides`."""
        return any(capability in p.provides for p in self.plugins)
