"""What a plugin declares about itself, and the registry that owns plugin names."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hf_lowmem.errors import MissingExtraError, PluginError

KINDS = ("optimizer", "quantization", "attention", "offload")
#: distributed modes a plugin can declare support for (see :attr:`PluginInfo.modes`)
MODES = ("single", "dp", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class PluginInfo:
    """One selectable plugin, as registered through ``hf_lowmem_register``.

    :param name: the name users select it by (lower case, ``-`` separated), unique across plugins.
    :param kind: one of ``optimizer``, ``quantization``, ``attention``, ``offload``.
    :param help: one line for ``hf-lowmem plugins`` and error messages.
    :param requires: importable module names the plugin needs (checked by importing them).
    :param extra: the ``hf-lowmem[extra]`` that installs ``requires``.
    :param options: a dataclass type; the user's per-plugin options are validated against its fields.
    :param modes: distributed modes it supports (``single``, ``dp`` [one process, ``torch.nn.DataParallel``],
        ``ddp``, ``fsdp``, ``deepspeed``).
    :param incompatible: other plugin names (or kinds) mapped to the reason they cannot be combined.
    :param lossless: whether results equal plain training (offload, checkpointing) or not (8-bit, low rank).
    :param needs_cuda: whether it only runs on a CUDA GPU.
    :param essential: an essential plugin cannot be blocked.
    :param check_selection: called with the selected names by kind (``{"optimizer": [...], ...}``) when this
        plugin is selected; returns why the combination cannot work, or ``None``. For rules a static
        ``incompatible`` map cannot express (e.g. "only these optimizers").
    :param engine: it provides a training engine (``hf_lowmem_create_engine``) that decides where the
        weights live; the Trainer then does not move the model to the GPU.
    """

    name: str
    kind: str
    help: str = ""
    requires: tuple[str, ...] = ()
    extra: str | None = None
    options: type | None = None
    modes: tuple[str, ...] = MODES
    incompatible: Mapping[str, str] = field(default_factory=dict)
    lossless: bool = True
    needs_cuda: bool = False
    essential: bool = False
    engine: bool = False
    check_selection: Callable[[Mapping[str, list[str]]], str | None] | None = None
    # filled by the registry
    distribution: str = ""
    version: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PluginError(f"plugin {self.name!r} declares kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise PluginError(f"plugin {self.name!r} declares unknown modes {bad}; modes are {', '.join(MODES)}")

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
            raise PluginError(
                f"plugin {self.name!r} has no option(s) {unknown}; its options are: "
                + ", ".join(f"{n} (default {_default(f)!r})" for n, f in fields.items())
            )
        try:
            return self.options(**raw)
        except (TypeError, ValueError) as e:
            raise PluginError(f"bad options for plugin {self.name!r}: {e}") from e


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"


class Registry:
    """Plugin names to :class:`PluginInfo`; the core, not the plugins, owns names and collisions."""

    def __init__(self) -> None:
        self._plugins: dict[str, PluginInfo] = {}
        self._owner: dict[str, str] = {}

    def register_from(self, module_name: str, distribution: str, version: str) -> Callable[[PluginInfo], None]:
        def register(info: PluginInfo) -> None:
            if not isinstance(info, PluginInfo):
                raise PluginError(f"{module_name}: register() takes a PluginInfo, got {type(info).__name__}")
            if info.name in self._plugins:
                raise PluginError(
                    f"plugin name {info.name!r} is registered twice: by {self._owner[info.name]} and by {module_name}"
                )
            info = dataclasses.replace(info, distribution=distribution, version=version)
            self._plugins[info.name] = info
            self._owner[info.name] = module_name

        return register

    def __contains__(self, name: str) -> bool:
        return name in self._plugins

    def __getitem__(self, name: str) -> PluginInfo:
        return self._plugins[name]

    def __iter__(self):
        return iter(sorted(self._plugins.values(), key=lambda p: (KINDS.index(p.kind), p.name)))

    def __len__(self) -> int:
        return len(self._plugins)

    def owner(self, name: str) -> str:
        return self._owner[name]

    def names(self, kind: str | None = None) -> list[str]:
        return [p.name for p in self if kind is None or p.kind == kind]

    def get(self, name: str, kind: str | None = None) -> PluginInfo:
        """Look a plugin up by name, with an error that lists what is available."""
        info = self._plugins.get(name)
        if info is None or (kind is not None and info.kind != kind):
            avail = self.names(kind)
            what = f"{kind} plugin" if kind else "plugin"
            extra = ""
            if info is not None:
                article = "an" if info.kind[0] in "aeiou" else "a"
                extra = f" ({name!r} is {article} {info.kind} plugin: select it with lowmem_{info.kind})"
            raise PluginError(
                f"unknown {what} {name!r}{extra}. Available: {', '.join(avail) or 'none'}."
                " Run `hf-lowmem plugins` to see every plugin and whether its dependencies are installed."
            )
        return info
