"""Errors hf-lowmem raises. Each message says what went wrong and how to fix it."""

from __future__ import annotations


class LowMemError(Exception):
    """Base class of every hf-lowmem error."""


class PluginError(LowMemError, ValueError):
    """A plugin name, option or combination that cannot work."""


class PluginLoadError(LowMemError, ImportError):
    """A plugin's entry point failed to import (raised only in strict mode; otherwise reported)."""


class MissingExtraError(LowMemError, ImportError):
    """An optional dependency of a selected plugin is not installed or does not import."""

    def __init__(self, plugin: str, package: str, extra: str | None, cause: BaseException | None = None):
        hint = f"pip install 'hf-lowmem[{extra}]'" if extra else f"pip install {package}"
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(f"plugin {plugin!r} needs the package {package!r}, which does not import{why}. Install it with: {hint}")
        self.plugin, self.package, self.extra = plugin, package, extra


class MemoryBudgetError(LowMemError, MemoryError):
    """A memory budget that no available plan meets."""


class CheckpointError(LowMemError, ValueError):
    """A checkpoint that cannot be resumed as asked (incomplete, damaged, or saved with other plugins), or
    one that could not be written."""
