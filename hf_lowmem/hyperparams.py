"""The one check of optimizer hyperparameters, before any work: a learning rate, weight decay, Adam beta or
epsilon that no optimizer can use is refused in one line naming the training argument (torch's AdamW refuses
some of them only once training starts; an engine's own optimizer would train to NaN)."""

from __future__ import annotations

import math
from typing import Any

_RULES = {
    "learning_rate": (lambda v: v >= 0, "a finite number >= 0, e.g. 1e-5"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0, e.g. 0.0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.999"),
    "adam_epsilon": (lambda v: v >= 0, "a finite number >= 0, e.g. 1e-8"),
}


def check_hyperparameters(values: dict[str, Any]) -> None:
    """Raise :class:`~hf_lowmem.errors.PluginError` for the first value of ``values`` (training-argument name ->
    value; ``None`` is skipped) that cannot train."""
    from hf_lowmem.errors import PluginError

    for name, value in values.items():
        if value is None:
            continue
        ok, want = _RULES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise PluginError(f"{name}={value!r} cannot train: it must be {want} (--{name})")


def check_training_arguments(args: Any) -> None:
    """:func:`check_hyperparameters` on a ``TrainingArguments``."""
    check_hyperparameters({name: getattr(args, name, None) for name in _RULES})


def check_adam_group(*, lr: float, betas, eps: float, weight_decay: float) -> None:
    """:func:`check_hyperparameters` on an Adam-style parameter group."""
    from hf_lowmem.errors import PluginError

    betas = tuple(betas)
    if len(betas) != 2:
        raise PluginError(f"Adam betas must be two numbers, got {betas!r}; set adam_beta1 and adam_beta2")
    check_hyperparameters({"learning_rate": lr, "adam_beta1": betas[0], "adam_beta2": betas[1],
                           "adam_epsilon": eps, "weight_decay": weight_decay})
