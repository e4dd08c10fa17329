"""hf-lowmem: full-parameter training of large language models on small GPUs, as a drop-in for the
Hugging Face Trainer.

Importing this package is cheap: it loads no plugin, initialises no CUDA and imports neither torch
nor transformers until one of the names below is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from hf_lowmem.spec import Plugin, PluginInfo, hookimpl  # noqa: E402  (pluggy only)

_LAZY = {
    "LowMemTrainer": "hf_lowmem.trainer",
    "LowMemTrainerMixin": "hf_lowmem.trainer",
    "lowmem_trainer_class": "hf_lowmem.trainer",
    "LowMemTrainingArguments": "hf_lowmem.args",
    "lowmem_args_class": "hf_lowmem.args",
    "upgrade_args": "hf_lowmem.args",
    "LowMemContext": "hf_lowmem.context",
    "load_plugins": "hf_lowmem.plugins",
    "get_plugin_host": "hf_lowmem.plugins",
    "PluginError": "hf_lowmem.errors",
    "MissingExtraError": "hf_lowmem.errors",
    "MemoryBudgetError": "hf_lowmem.errors",
}

__all__ = ["__version__", "Plugin", "PluginInfo", "hookimpl", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from hf_lowmem.args import LowMemTrainingArguments, lowmem_args_class, upgrade_args
    from hf_lowmem.context import LowMemContext
    from hf_lowmem.errors import MemoryBudgetError, MissingExtraError, PluginError
    from hf_lowmem.plugins import get_plugin_host, load_plugins
    from hf_lowmem.trainer import LowMemTrainer, LowMemTrainerMixin, lowmem_trainer_class


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_lowmem' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
