"""Loading plugins, and the facade through which the core asks the selected plugins (and tells every
module of the events).

Plugin modules are named by entry points in the ``hf_lowmem`` group; hf-lowmem's own plugins register
through the same group. Loading is lazy (never at ``import hf_lowmem``), happens once per
:class:`PluginHost`, and imports entry points one at a time: one that fails to import, that implements an
event the spec does not have, or whose registration fails, is reported by entry-point and distribution
name with its traceback and left out, while the others keep working.

Environment variables (read at load time):

``HF_LOWMEM_PLUGINS``
    comma-separated allow-list of entry-point or distribution names; when set, only these load
    (plus the essential ``core``).
``HF_LOWMEM_DISABLE_PLUGINS``
    comma-separated block-list of entry-point or distribution names.
``HF_LOWMEM_STRICT_PLUGINS``
    ``1`` turns a plugin that fails to load into an error instead of a warning.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable

import pluggy

from hf_lowmem import spec
from hf_lowmem.context import truthy
from hf_lowmem.errors import PluginError, PluginLoadError
from hf_lowmem.registry import Registry

logger = logging.getLogger("hf_lowmem")

FIRST_PARTY_DIST = "hf-lowmem"
#: entry points that cannot be blocked
ESSENTIAL = frozenset({"core"})
HOOK_PREFIX = "hf_lowmem_"
#: module-level hooks of the 0.1 API that became methods of the selected plugin object
MOVED_TO_PLUGIN = {"hf_lowmem_create_optimizer": "optimizer_cls_and_kwargs or create_optimizer",
                   "hf_lowmem_create_engine": "create_engine", "hf_lowmem_compute_loss": "compute_loss",
                   "hf_lowmem_estimate_memory": "memory_model"}


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be loaded: which one, from which distribution, and why."""

    entry_point: str
    distribution: str
    error: str
    traceback: str

    def __str__(self) -> str:
        return f"plugin {self.entry_point!r} from distribution {self.distribution!r} failed to load: {self.error}"


class _Manager(pluggy.PluginManager):
    """A pluggy manager that treats every ``hf_lowmem_*`` function as a hook implementation, marked or
    not, so that a misspelled hook name is caught by :meth:`check_pending` instead of being ignored."""

    def parse_hookimpl_opts(self, plugin: Any, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(HOOK_PREFIX) and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=spec.ENTRY_POINT_GROUP))
    # hf-lowmem's own first, so third-party implementations run before them (pluggy calls LIFO);
    # then by name, so the order is the same on every rank and every run.
    def key(ep: metadata.EntryPoint):
        dist = ep.dist.name if ep.dist is not None else ""
        return (dist != FIRST_PARTY_DIST, dist, ep.name)

    seen, unique = set(), []
    for ep in sorted(eps, key=key):  # an editable + regular install can list one twice
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            unique.append(ep)
    return unique


class PluginHost:
    """The loaded plugins: the pluggy manager (modules and their events), the registry of plugin objects,
    and one method per step of a run (see the call order in :mod:`hf_lowmem.spec`), so that core call
    sites never ask an unselected plugin anything."""

    def __init__(self) -> None:
        self.pm = _Manager(spec.PROJECT)
        self.pm.add_hookspecs(spec)
        self.registry = Registry()
        self.failures: list[LoadFailure] = []
        self.loaded: dict[str, str] = {}  # entry-point name -> distribution
        self.blocked: list[str] = []

    # ---- loading -------------------------------------------------------------------------------
    def load(
        self,
        *,
        strict: bool | None = None,
        allow: Iterable[str] | None = None,
        block: Iterable[str] | None = None,
        extra_plugins: Iterable[tuple[str, Any]] = (),
        entry_points: bool = True,
    ) -> "PluginHost":
        strict = truthy(os.environ.get("HF_LOWMEM_STRICT_PLUGINS")) if strict is None else strict
        allow = set(allow) if allow is not None else _env_list("HF_LOWMEM_PLUGINS")
        block = set(block) if block is not None else (_env_list("HF_LOWMEM_DISABLE_PLUGINS") or set())
        candidates: list[tuple[str, str, str, Any]] = []
        if entry_points:
            for ep in _entry_points():
                dist = ep.dist.name if ep.dist is not None else "?"
                version = ep.dist.version if ep.dist is not None else ""
                candidates.append((ep.name, dist, version, ep))
        for name, obj in extra_plugins:
            candidates.append((name, getattr(obj, "__name__", name), "", obj))

        for name, dist, version, source in candidates:
            if name not in ESSENTIAL:
                if (name in block or dist in block) or (allow is not None and name not in allow and dist not in allow):
                    self.blocked.append(name)
                    continue
            self._load_one(name, dist, version, source, strict)
        return self

    def _load_one(self, name: str, dist: str, version: str, source: Any, strict: bool) -> None:
        try:
            module = source.load() if isinstance(source, metadata.EntryPoint) else source
        except BaseException as e:  # noqa: BLE001 - any failure of a plugin's import is isolated,
            if isinstance(e, KeyboardInterrupt):  # sys.exit() at import included; only Ctrl-C goes through
                raise
            return self._fail(name, dist, e, strict)
        try:
            moved = [h for h in MOVED_TO_PLUGIN if callable(getattr(module, h, None))]
            if moved:
                raise PluginError(f"{moved[0]} is not an event any more: only the selected plugin is asked for that, "
                                  f"through the method {MOVED_TO_PLUGIN[moved[0]]!r} of its hf_lowmem.Plugin object "
                                  "(see hf_lowmem.spec)")
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as e:  # a misspelled hook or a bad hookimpl signature
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            return self._fail(name, dist, e, strict)
        register_impl = self.pm.hook.hf_lowmem_register.get_hookimpls()
        impl = next((i for i in register_impl if i.plugin is module), None)
        if impl is not None:
            try:
                impl.function(register=self.registry.register_from(name, dist, version))
            except Exception as e:
                self.registry.forget_module(name)  # roll back what it registered before failing
                self.pm.unregister(module)
                return self._fail(name, dist, e, strict)
        self.loaded[name] = dist

    def _fail(self, name: str, dist: str, exc: BaseException, strict: bool) -> None:
        failure = LoadFailure(name, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if strict:
            raise PluginLoadError(f"{failure} (strict mode: HF_LOWMEM_STRICT_PLUGINS=1)") from exc
        logger.warning("%s; the other plugins keep working. Set HF_LOWMEM_DISABLE_PLUGINS=%s to silence this.\n%s",
                       failure, name, failure.traceback)
        self.failures.append(failure)

    # ---- a run: the selected plugins, then the event for every module ---------------------------------
    def validate(self, *, ctx) -> None:
        for plugin in ctx.plugins:
            plugin.import_requirements()
            if plugin.needs_cuda:
                import torch

                if not torch.cuda.is_available() or getattr(ctx.args, "use_cpu", False):
                    raise PluginError(f"plugin {plugin.name!r} needs a CUDA GPU and this run has none"
                                      " (choose another plugin, or run on a machine with a GPU)")
            plugin.validate(ctx)
        self.pm.hook.hf_lowmem_validate(ctx=ctx)

    def prepare_model(self, *, ctx, model):
        for stage in spec.PREPARE_STAGES:
            for plugin in ctx.plugins:
                if plugin.kind == stage:
                    model = _keep_or_replace(model, plugin.prepare_model(ctx, model))
            for result in self.pm.hook.hf_lowmem_prepare_model(ctx=ctx, model=model, stage=stage):
                model = _keep_or_replace(model, result)
        return model

    def callbacks(self, *, ctx) -> list:
        out: list = [cb for plugin in ctx.plugins for cb in (plugin.callbacks(ctx) or [])]
        for result in self.pm.hook.hf_lowmem_callbacks(ctx=ctx):
            out.extend(result or [])
        return out

    def create_engine(self, *, ctx, model, trainer):
        """The engine of the selected engine plugin, or ``None`` when no engine plugin is selected."""
        plugin = next((p for p in ctx.plugins if p.engine), None)
        if plugin is None:
            return None
        engine = plugin.create_engine(ctx, model, trainer)
        if engine is None:
            raise PluginError(f"plugin {plugin.name!r} declares an engine but created none")
        return engine

    def create_optimizer(self, *, ctx, model, trainer):
        """The selected optimizer plugin's optimizer, or ``None`` (the Trainer's own ``args.optim``)."""
        plugin = ctx.plugin("optimizer")
        if plugin is None:
            return None
        optimizer = plugin.create_optimizer(ctx, model, trainer)
        if optimizer is None:  # a selected optimizer plugin that yields nothing must not fall back to AdamW silently
            raise PluginError(f"optimizer plugin {plugin.name!r} (module {self.registry.owner(plugin.name)!r}) created "
                              "no optimizer: it must define optimizer_cls_and_kwargs or create_optimizer")
        return optimizer

    def compute_loss(self, *, ctx, model, inputs, num_items_in_batch):
        for plugin in ctx.plugins:
            loss = plugin.compute_loss(ctx, model, inputs, num_items_in_batch)
            if loss is not None:
                return loss
        return None

    def before_save(self, *, ctx, model, state_dict) -> None:
        for plugin in ctx.plugins:
            plugin.before_save(ctx, model, state_dict)
        self.pm.hook.hf_lowmem_before_save(ctx=ctx, model=model, state_dict=state_dict)


def _keep_or_replace(model, result):
    return model if result is None else result


def load_plugins(**kwargs: Any) -> PluginHost:
    """Load plugins into a fresh :class:`PluginHost` (safe to call twice; tests get a clean state).

    Keyword arguments go to :meth:`PluginHost.load`: ``strict``, ``allow``, ``block``,
    ``extra_plugins`` (``(name, module_or_object)`` pairs registered after the entry points) and
    ``entry_points`` (``False`` to skip discovery).
    """
    return PluginHost().load(**kwargs)


_default_host: PluginHost | None = None


def get_plugin_host() -> PluginHost:
    """The process-wide host, loaded on first use (never at import)."""
    global _default_host
    if _default_host is None:
        _default_host = load_plugins()
    return _default_host


def reset_plugin_host() -> None:
    """Forget the process-wide host, so the next :func:`get_plugin_host` loads plugins again."""
    global _default_host
    _default_host = None
