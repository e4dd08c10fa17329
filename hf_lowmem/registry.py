"""The registry that owns plugin names: registered :class:`~hf_lowmem.spec.Plugin` objects by name."""

from __future__ import annotations

from typing import Callable

from hf_lowmem.errors import PluginError
from hf_lowmem.spec import KINDS, MODES, Plugin, PluginInfo  # noqa: F401  (re-exported)


class Registry:
    """Plugin names to :class:`Plugin` objects; the core, not the plugins, owns names and collisions."""

    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._owner: dict[str, str] = {}

    def register_from(self, module_name: str, distribution: str, version: str) -> Callable[[Plugin], None]:
        """The ``register`` callable handed to the module ``module_name``'s ``hf_lowmem_register``."""

        def register(plugin: Plugin) -> None:
            if not isinstance(plugin, Plugin):
                raise PluginError(f"{module_name}: register() takes a hf_lowmem.Plugin object, got "
                                  f"{type(plugin).__name__}")
            plugin.check()
            if plugin.name in self._plugins:
                raise PluginError(f"plugin name {plugin.name!r} is registered twice: by {self._owner[plugin.name]} "
                                  f"and by {module_name}")
            plugin.distribution, plugin.version = distribution, version
            self._plugins[plugin.name] = plugin
            self._owner[plugin.name] = module_name

        return register

    def forget_module(self, module_name: str) -> None:
        """Remove every plugin the module ``module_name`` registered (a module that failed half-way)."""
        for name in [n for n, owner in self._owner.items() if owner == module_name]:
            del self._plugins[name], self._owner[name]

    def __contains__(self, name: str) -> bool:
        return name in self._plugins

    def __getitem__(self, name: str) -> Plugin:
        return self._plugins[name]

    def __iter__(self):
        return iter(sorted(self._plugins.values(), key=lambda p: (KINDS.index(p.kind), p.name)))

    def __len__(self) -> int:
        return len(self._plugins)

    def owner(self, name: str) -> str:
        return self._owner[name]

    def names(self, kind: str | None = None) -> list[str]:
        return [p.name for p in self if kind is None or p.kind == kind]

    def get(self, name: str, kind: str | None = None) -> Plugin:
        """Look a plugin up by name, with an error that lists what is available."""
        plugin = self._plugins.get(name)
        if plugin is None or (kind is not None and plugin.kind != kind):
            avail = self.names(kind)
            what = f"{kind} plugin" if kind else "plugin"
            extra = ""
            if plugin is not None:
                article = "an" if plugin.kind[0] in "aeiou" else "a"
                extra = f" ({name!r} is {article} {plugin.kind} plugin: select it with lowmem_{plugin.kind})"
            raise PluginError(
                f"unknown {what} {name!r}{extra}. Available: {', '.join(avail) or 'none'}."
                " Run `hf-lowmem plugins` to see every plugin and whether its dependencies are installed."
            )
        return plugin
