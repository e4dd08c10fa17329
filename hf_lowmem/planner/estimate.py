"""The estimate of one plan: the Trainer's step, changed by each selected plugin's own memory model, replayed."""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_lowmem.errors import PluginError
from hf_lowmem.planner.inputs import MemoryEstimate, PlanInput
from hf_lowmem.planner.replay import replay
from hf_lowmem.planner.speed import speed
from hf_lowmem.planner.step import base_step, trainer_default_optimizer
from hf_lowmem.sizes import MiB


def selected_plugins(inp: PlanInput, host: Any) -> list:
    """The plugin objects a plan selects, in kind order."""
    out = []
    for name in inp.names():
        if name not in host.registry:
            raise PluginError(f"the plan selects {name!r}, which is not a registered plugin; registered: "
                              f"{', '.join(host.registry.names())}")
        out.append(host.registry[name])
    return out


def estimate_memory(inp: PlanInput, host: Any = None) -> MemoryEstimate:
    """The memory (and speed) estimate of one plan.

    The Trainer's own step (:func:`~hf_lowmem.planner.step.base_step`, AdamW when no optimizer plugin is
    selected) is changed by each selected plugin's :meth:`~hf_lowmem.spec.Plugin.memory_model`, in kind
    order, then replayed to find the GPU peak; a model that returns a whole estimate (an engine) replaces the
    replay, and the plugins after it are not asked. A selected plugin without a memory model is named in the
    notes as not counted. Raises :class:`~hf_lowmem.planner.PlanRefused` when a plugin would refuse the plan.

    :param host: the loaded plugins (:class:`~hf_lowmem.plugins.PluginHost`); default: the process-wide one.
    """
    if host is None:
        from hf_lowmem.plugins import get_plugin_host

        host = get_plugin_host()
    plugins = selected_plugins(inp, host)
    for plugin in plugins:
        setup = plugin.plan_setup(inp)
        if setup is not None:
            inp = dataclasses.replace(inp, setup=setup)
    st = base_step(inp)
    if inp.selected("optimizer") is None:
        trainer_default_optimizer(inp, st)
    est = None
    for plugin in plugins:
        result = plugin.memory_model(inp, st)
        if result is not None:
            if not isinstance(result, MemoryEstimate):
                raise PluginError(f"the memory model of plugin {plugin.name!r} returned {type(result).__name__}; it "
                                  "changes the step in place and returns None, or returns a MemoryEstimate")
            est = result
            break
    if est is None:
        _, parts, phase = replay(st, inp.setup)
        est = MemoryEstimate(gpu={k: int(v) for k, v in parts.items()}, host={k: int(v) for k, v in st.host.items() if v},
                             peak_phase=phase, notes=list(st.notes))
        if st.states_paged:
            est.gpu_extra["optimizer states (paged)"] = int(st.states_paged)
        speed(inp, st, est)
    if inp.setup.device == "cuda":
        est.gpu_extra["allocator slack (reserved - allocated)"] = int(0.05 * est.gpu_peak_allocated + 128 * MiB)
        est.gpu_extra["CUDA context"] = int(inp.device.context_bytes)
    for plugin in plugins:
        if not plugin.has_memory_model():
            est.notes.append(f"plugin {plugin.name!r} has no memory model: its effect is not counted")
    return est
