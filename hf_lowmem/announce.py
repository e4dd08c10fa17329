"""The one line a run prints when its trainer is built: which plugins are active and what each replaced,
so that nothing a plugin changes happens silently (e.g. ``lowmem_optimizer`` taking the place of
``optim=``)."""

from __future__ import annotations

from typing import Any


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def plugins_line(ctx: Any, args: Any) -> str:
    """``hf-lowmem: optimizer bnb-adamw8bit (instead of optim=adamw_torch), offload gradient-checkpointing``."""
    by_kind = ctx.selection.by_kind
    parts = []
    for kind, names in by_kind.items():
        for name in names:
            info = ctx.host.registry.get(name)
            what = f"{kind} {name}"
            if kind == "optimizer":
                what += f" (instead of optim={_value(getattr(args, 'optim', '?'))})"
            elif kind == "attention":
                what += " (the model's attention implementation)"
            elif getattr(info, "engine", False):
                what += " (runs the training step: weights streamed layer by layer)"
            parts.append(what)
    if not parts:
        return "hf-lowmem: no plugin selected: the plain Trainer (`hf-lowmem plugins` lists them)"
    planned = getattr(args, "_lowmem_plan_summary", None)
    how = f"; chosen by the planner for lowmem_gpu_memory={args.lowmem_gpu_memory}" if planned else ""
    return "hf-lowmem: " + ", ".join(parts) + how


def announce(ctx: Any, args: Any) -> None:
    """Print :func:`plugins_line` once, on the process that logs."""
    if getattr(args, "should_log", True):
        print(plugins_line(ctx, args), flush=True)
