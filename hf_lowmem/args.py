"""``LowMemTrainingArguments``: ``TrainingArguments`` plus the choice of plugins and their options."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from transformers import TrainingArguments

from hf_lowmem.errors import PluginError

LOWMEM_PREFIX = "lowmem_"


@dataclass
class LowMemFields:
    """The hf-lowmem fields, as a mixin so any ``TrainingArguments`` subclass (e.g. TRL's ``SFTConfig``)
    can carry them: see :func:`lowmem_args_class`."""

    lowmem_optimizer: str | None = field(
        default=None,
        metadata={"help": "Optimizer plugin by name (e.g. bnb-adamw8bit, galore-adamw). `hf-lowmem plugins` lists them. "
                          "Unset: the Trainer's own --optim."},
    )
    lowmem_quantization: str | None = field(
        default=None, metadata={"help": "Quantization plugin by name (e.g. int8-weights, bnb-nf4)."}
    )
    lowmem_attention: str | None = field(
        default=None, metadata={"help": "Attention plugin by name (e.g. sdpa, flash-attn, auto-attention)."}
    )
    lowmem_offload: list[str] | None = field(
        default=None,
        metadata={"help": "Offload plugins by name, several allowed (e.g. gradient-checkpointing activation-offload "
                          "chunked-loss, or stream for the weight-streaming engine). Comma-separated also accepted."},
    )
    lowmem_options: dict | str | None = field(
        default=None,
        metadata={"help": 'Per-plugin options as JSON: {"plugin-name": {"option": value}}. '
                          "An unknown option is an error that lists the valid ones."},
    )
    lowmem_gpu_memory: str | None = field(
        default=None,
        metadata={"help": "GPU memory budget (e.g. 8GiB). When set, the memory planner picks the plugins that fit."},
    )
    lowmem_host_memory: str | None = field(
        default=None, metadata={"help": "Host RAM budget for the planner (e.g. 64GiB). Default: what this machine has."}
    )
    lowmem_telemetry: bool = field(
        default=True,
        metadata={"help": "Log peak GPU/host memory, tokens/s and MFU each logging step, and a summary at the end."},
    )
    lowmem_strict_plugins: bool = field(
        default=False, metadata={"help": "Make a plugin that fails to load an error instead of a warning."}
    )
    lowmem_plot: str | None = field(
        default=None,
        metadata={"help": "Write a PNG of memory and throughput over the run (telemetry) to this path; 'auto': "
                          "OUTPUT_DIR/lowmem_telemetry.png. Needs hf-lowmem[plot] (matplotlib)."},
    )

    def __post_init__(self):
        super().__post_init__()  # type: ignore[misc]
        self.lowmem_offload = _as_list(self.lowmem_offload)
        for name in ("lowmem_optimizer", "lowmem_quantization", "lowmem_attention"):
            value = getattr(self, name)
            if isinstance(value, str) and (not value.strip() or value.strip().lower() == "none"):
                setattr(self, name, None)
        self.lowmem_options = _parse_options(self.lowmem_options)
        _check_budgets_and_plot(self)
        # Validate names, options and combinations now, so a bad argument fails before any model is loaded.
        self.lowmem_selection()

    def __reduce__(self):
        # A class made by lowmem_args_class (e.g. LowMemSFTConfig) is not a module attribute, so pickle
        # (the Trainer's torch.save of training_args.bin, deepcopy) rebuilds it from its base instead.
        base = type(self).__dict__.get("_lowmem_base")
        if base is None:
            return super().__reduce__()
        return (_rebuild_args, (base, self.__dict__.copy()))

    # ---- helpers ----------------------------------------------------------------------------------
    def lowmem_request(self) -> dict[str, list[str]]:
        return {
            "optimizer": [self.lowmem_optimizer] if self.lowmem_optimizer else [],
            "quantization": [self.lowmem_quantization] if self.lowmem_quantization else [],
            "attention": [self.lowmem_attention] if self.lowmem_attention else [],
            "offload": list(self.lowmem_offload or []),
        }

    def lowmem_plan(self, model_or_config, *, host=None, seq_len=None, train_dataset=None, param_dtype=None):
        """With ``lowmem_gpu_memory`` set: choose the plugins that fit (keeping the ones you selected) and fill
        the selection, or raise :class:`~hf_lowmem.errors.MemoryBudgetError` with the smallest budget that works.
        ``model_or_config``: a model, a config, a config path or a preset name; call it with a config before
        loading a big model to fail early. ``LowMemTrainer`` calls it for you and keeps the returned
        :class:`~hf_lowmem.planner.Plan` as ``ctx.plan``. See :func:`hf_lowmem.planner.plan_for_args`."""
        from hf_lowmem.planner import plan_for_args

        return plan_for_args(self, model_or_config, host=host, seq_len=seq_len, train_dataset=train_dataset,
                             param_dtype=param_dtype)

    def lowmem_selection(self, host=None):
        """Resolve the selected plugins against the loaded registry (raises :class:`PluginError`)."""
        from hf_lowmem.context import distributed_mode, resolve_selection
        from hf_lowmem.plugins import get_plugin_host, load_plugins

        if host is None:
            host = load_plugins(strict=True) if self.lowmem_strict_plugins else get_plugin_host()
        return resolve_selection(host, self.lowmem_request(), dict(self.lowmem_options or {}), distributed_mode(self))


def _check_budgets_and_plot(args: Any) -> None:
    from hf_lowmem.sizes import parse_size

    if args.lowmem_gpu_memory is not None:
        parse_size(args.lowmem_gpu_memory, "lowmem_gpu_memory")
    if args.lowmem_host_memory is not None:
        parse_size(args.lowmem_host_memory, "lowmem_host_memory")
    if args.lowmem_plot:
        import importlib.util

        from hf_lowmem.errors import MissingExtraError

        if importlib.util.find_spec("matplotlib") is None:
            raise MissingExtraError("lowmem_plot", "matplotlib", "plot")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out: list[str] = []
    for v in value:
        out.extend(x.strip() for x in str(v).split(",") if x.strip() and x.strip().lower() != "none")
    return out


def _parse_options(value: Any) -> dict[str, dict]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise PluginError(f'lowmem_options must be JSON like {{"plugin-name": {{"option": 1}}}}: {e}') from e
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise PluginError(f'lowmem_options must map plugin names to option dicts, got {value!r}')
    return {str(k): dict(v) for k, v in value.items()}


@dataclass
class LowMemTrainingArguments(LowMemFields, TrainingArguments):
    """``TrainingArguments`` with hf-lowmem's plugin selection. Every field has help text, so
    ``HfArgumentParser((LowMemTrainingArguments,))`` exposes them on the command line."""


@lru_cache(maxsize=None)
def lowmem_args_class(base: type) -> type:
    """A dataclass that is ``base`` (a ``TrainingArguments`` subclass, e.g. TRL's ``SFTConfig``) plus the
    hf-lowmem fields. Returns ``base`` itself if it already has them."""
    if issubclass(base, LowMemFields):
        return base
    if base is TrainingArguments:
        return LowMemTrainingArguments
    return dataclass(type(f"LowMem{base.__name__}", (LowMemFields, base), {"__module__": __name__, "_lowmem_base": base}))


def _rebuild_args(base: type, state: dict) -> Any:
    cls = lowmem_args_class(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def upgrade_args(args: Any, **lowmem: Any) -> Any:
    """Return ``args`` as arguments that carry the hf-lowmem fields.

    A plain ``TrainingArguments`` (or subclass) becomes the matching :func:`lowmem_args_class` with the
    same values; ``lowmem`` keyword arguments (``lowmem_optimizer=...``) override fields."""
    if args is None:
        from transformers import TrainingArguments as _TA  # noqa: F401

        args = LowMemTrainingArguments(output_dir="tmp_trainer", **lowmem)
        return args
    if isinstance(args, LowMemFields) and not lowmem:
        return args
    cls = lowmem_args_class(type(args))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    # TrainingArguments.__post_init__ normalises some fields into forms it does not accept back.
    if values.get("report_to") == []:
        values["report_to"] = "none"
    values.update(lowmem)
    return cls(**values)
