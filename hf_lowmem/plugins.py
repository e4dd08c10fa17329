"""Loading plugins, and the typed facade the core calls hooks through.

Plugins are the modules named by entry points in the ``hf_lowmem`` group; hf-lowmem's own plugins
register through the same group. Loading is lazy (never at ``import hf_lowmem``), happens once per
:class:`PluginHost`, and imports entry points one at a time: one that fails to import, or that
implements a hook the spec does not have, is reported by entry-point and distribution name with its
traceback and left out, while the others keep working.

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
from hf_lowmem.errors import PluginLoadError
from hf_lowmem.registry import Registry

logger = logging.getLogger("hf_lowmem")

FIRST_PARTY_DIST = "hf-lowmem"
#: entry points that cannot be blocked
ESSENTIAL = frozenset({"core"})
HOOK_PREFIX = "hf_lowmem_"


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


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


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
    """The loaded plugins: the pluggy manager, the registry of plugin names, and one typed method per
    hook so that core call sites always pass keyword arguments."""

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
        strict = _truthy(os.environ.get("HF_LOWMEM_STRICT_PLUGINS")) if strict is None else strict
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
            plugin = source.load() if isinstance(source, metadata.EntryPoint) else source
        except BaseException as e:  # noqa: BLE001 - any failure of a plugin's import is isolated,
            if isinstance(e, KeyboardInterrupt):  # sys.exit() at import included; only Ctrl-C goes through
                raise
            return self._fail(name, dist, e, strict)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as e:  # a misspelled hook or a bad hookimpl signature
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return self._fail(name, dist, e, strict)
        register_impl = self.pm.hook.hf_lowmem_register.get_hookimpls()
        impl = next((i for i in register_impl if i.plugin is plugin), None)
        if impl is not None:
            before = set(self.registry.names())
            try:
                impl.function(register=self.registry.register_from(name, dist, version))
            except Exception as e:
                # roll back what this plugin registered before failing
                for pname in set(self.registry.names()) - before:
                    self.registry._plugins.pop(pname, None)
                    self.registry._owner.pop(pname, None)
                self.pm.unregister(plugin)
                return self._fail(name, dist, e, strict)
        self.loaded[name] = dist

    def _fail(self, name: str, dist: str, exc: BaseException, strict: bool) -> None:
        failure = LoadFailure(name, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if strict:
            raise PluginLoadError(f"{failure} (strict mode: HF_LOWMEM_STRICT_PLUGINS=1)") from exc
        logger.warning("%s; the other plugins keep working. Set HF_LOWMEM_DISABLE_PLUGINS=%s to silence this.\n%s",
                       failure, name, failure.traceback)
        self.failures.append(failure)

    # ---- the typed facade: one method per hook ----------------------------------------------------
    def validate(self, *, ctx) -> None:
        self.pm.hook.hf_lowmem_validate(ctx=ctx)

    def prepare_model(self, *, ctx, model):
        for stage in spec.PREPARE_STAGES:
            for result in self.pm.hook.hf_lowmem_prepare_model(ctx=ctx, model=model, stage=stage):
                if result is not None:
                    model = result
        return model

    def create_engine(self, *, ctx, model, trainer):
        return self.pm.hook.hf_lowmem_create_engine(ctx=ctx, model=model, trainer=trainer)

    def create_optimizer(self, *, ctx, model, trainer):
        return self.pm.hook.hf_lowmem_create_optimizer(ctx=ctx, model=model, trainer=trainer)

    def compute_loss(self, *, ctx, model, inputs, num_items_in_batch):
        return self.pm.hook.hf_lowmem_compute_loss(ctx=ctx, model=model, inputs=inputs, num_items_in_batch=num_items_in_batch)

    def callbacks(self, *, ctx) -> list:
        out: list = []
        for result in self.pm.hook.hf_lowmem_callbacks(ctx=ctx):
            out.extend(result or [])
        return out

    def before_save(self, *, ctx, model, state_dict) -> None:
        self.pm.hook.hf_lowmem_before_save(ctx=ctx, model=model, state_dict=state_dict)

    def estimate_memory(self, *, plan, name, options, estimate):
        return self.pm.hook.hf_lowmem_estimate_memory(plan=plan, name=name, options=options, estimate=estimate)


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
