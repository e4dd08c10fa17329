"""The search: every combination of the installed plugins' variants, estimated, and the fastest that fits
the GPU and host budgets (among plans within 5% of the fastest, lossless ones first, then the best measured
quality: :func:`quality_gap`), with the rejected alternatives and the smallest budget any plan meets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from hf_lowmem.errors import MemoryBudgetError, PluginError
from hf_lowmem.planner.estimate import estimate_memory, selected_plugins
from hf_lowmem.planner.inputs import (DEFAULT_DEVICE, DeviceSpec, MemoryEstimate, PlanInput, PlanRefused, TrainSetup,
                                      changed_options)
from hf_lowmem.planner.shapes import ModelShape
from hf_lowmem.sizes import fmt_count, fmt_gib, fmt_size, gib, gib_up, size_arg


@dataclass
class Candidate:
    """One plan the planner considered."""

    inp: PlanInput
    estimate: MemoryEstimate
    lossless: bool
    fits_gpu: bool
    fits_host: bool
    unavailable: str | None = None  # why it cannot run here (missing package, needs CUDA)
    quality_gap: float | None = 0.0  # measured eval-loss gap vs AdamW at the user's lr, % (see quality_gap())

    @property
    def label(self) -> str:
        return self.inp.label()

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def usable(self) -> bool:
        return self.fits and self.unavailable is None

    def why_not(self, gpu_budget: int, host_budget: int) -> str:
        e = self.estimate
        reasons = []
        if not self.fits_gpu:
            reasons.append(f"needs {fmt_gib(e.gpu_total)} GiB of GPU > {fmt_gib(gpu_budget)}")
        if not self.fits_host:
            reasons.append(f"needs {fmt_gib(e.host_total)} GiB of host RAM > {fmt_gib(host_budget)}")
        if self.unavailable:
            reasons.append(self.unavailable)
        return "; ".join(reasons) or "fits, but slower"

    def lowmem_arguments(self) -> dict[str, Any]:
        """The ``LowMemTrainingArguments`` fields that select this plan."""
        sel = self.inp.selection
        opts = {n: changed_options(o) for n, o in self.inp.options.items()}
        return {
            "lowmem_optimizer": (sel.get("optimizer") or (None,))[0],
            "lowmem_quantization": (sel.get("quantization") or (None,))[0],
            "lowmem_attention": (sel.get("attention") or (None,))[0],
            "lowmem_offload": list(sel.get("offload") or ()),
            "lowmem_options": {n: o for n, o in opts.items() if o},
        }

    def to_dict(self, gpu_budget: int, host_budget: int) -> dict:
        return {"plugins": self.label, "arguments": self.lowmem_arguments(), "lossless": self.lossless,
                "quality_gap_pct": self.quality_gap,
                "fits": self.fits, "available": self.unavailable is None,
                "why_not": None if self.usable else self.why_not(gpu_budget, host_budget),
                **self.estimate.to_dict()}


@dataclass
class Plan:
    """The result of :func:`plan_training`."""

    shape: ModelShape
    setup: TrainSetup
    gpu_budget: int
    host_budget: int
    chosen: Candidate | None
    candidates: list[Candidate]
    #: the candidate with the smallest GPU need among those that fit the host budget and can run here
    smallest: Candidate | None
    constraints: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.chosen is not None

    @property
    def smallest_gpu_gib(self) -> float | None:
        """The smallest GPU budget any plan meets here, in GiB rounded up to 0.1."""
        if self.smallest is None:
            return None
        return gib_up(self.smallest.estimate.gpu_total)

    def rejected(self, limit: int | None = None, frontier: bool = True) -> list[Candidate]:
        """The alternatives at least as fast as the chosen plan, fastest first, with why each was not taken
        (all candidates when nothing fits). ``frontier``: only those no other alternative beats on both speed
        and GPU memory (a faster plan that needs less memory makes a slower, bigger one uninteresting)."""
        pool = [c for c in self.candidates if c is not self.chosen and (
            self.chosen is None or (c.estimate.speed or 0) >= (self.chosen.estimate.speed or 0) - 1e-9)]
        if frontier:
            keep, best_gpu = [], float("inf")
            for c in sorted(pool, key=lambda c: (-(c.estimate.speed or 0), c.estimate.gpu_total)):
                if c.estimate.gpu_total < best_gpu or c.unavailable:
                    keep.append(c)
                    best_gpu = min(best_gpu, c.estimate.gpu_total) if not c.unavailable else best_gpu
            pool = keep
            if self.chosen is not None and not self.chosen.lossless:  # what a lossless run would need
                lossless = next((c for c in self.candidates if c.lossless and c is not self.chosen), None)
                if lossless is not None and lossless not in pool:
                    pool.append(lossless)
        return pool[:limit] if limit else pool

    def budget_error(self) -> MemoryBudgetError:
        su, sh = self.setup, self.shape
        what = (f"{sh.name} ({fmt_count(sh.params_total)} params) at micro-batch {su.micro_batch} x seq {su.seq_len}"
                + (f" x {su.grad_accum} accumulation" if su.grad_accum > 1 else ""))
        fixed = {k: v for k, v in self.constraints.items() if v}
        with_sel = f" with your selection ({', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else ""
        if self.smallest is None:
            hosts = [c for c in self.candidates if c.unavailable is None]
            if not hosts:
                return MemoryBudgetError(f"no plan can run here for {what}{with_sel}: "
                                         + "; ".join(sorted({c.unavailable or "" for c in self.candidates}))[:500])
            low = min(hosts, key=lambda c: (c.estimate.host_total, c.estimate.gpu_total))
            return MemoryBudgetError(
                f"no plan fits {fmt_size(self.host_budget)} of host RAM for {what}{with_sel}: the smallest need is "
                f"{fmt_size(low.estimate.host_total)} of host RAM (lowmem_host_memory=\"{size_arg(low.estimate.host_total)}\"; "
                f"and {fmt_size(low.estimate.gpu_total)} of GPU) with {low.label}. Use fewer tokens per step, "
                f"a smaller model, or a machine with more RAM.")
        s = self.smallest
        need = size_arg(s.estimate.gpu_total)
        return MemoryBudgetError(
            f"no plan fits {fmt_size(self.gpu_budget)} of GPU memory for {what}{with_sel}. The smallest budget that "
            f"works is {fmt_size(s.estimate.gpu_total)} (lowmem_gpu_memory=\"{need}\"), with {s.label} (predicted "
            f"peak allocated {fmt_size(s.estimate.gpu_peak_allocated)}, plus CUDA context and allocator slack; host "
            f"{fmt_size(s.estimate.host_total)}). Otherwise lower per_device_train_batch_size or the sequence "
            f"length. `hf-lowmem plan` shows the breakdown.")

    def to_dict(self) -> dict:
        return {
            "model": self.shape.to_dict(), "setup": dataclasses.asdict(self.setup),
            "gpu_budget_gib": round(gib(self.gpu_budget), 3), "host_budget_gib": round(gib(self.host_budget), 3),
            "constraints": self.constraints,
            "chosen": self.chosen.to_dict(self.gpu_budget, self.host_budget) if self.chosen else None,
            "smallest_gpu_budget_gib": self.smallest_gpu_gib,
            "smallest": self.smallest.to_dict(self.gpu_budget, self.host_budget) if self.smallest else None,
            "rejected": [c.to_dict(self.gpu_budget, self.host_budget) for c in self.rejected()],
            "rejected_all": [{"plugins": c.label, "speed": round(c.estimate.speed or 0, 3),
                              "gpu_total_gib": round(gib(c.estimate.gpu_total), 3),
                              "host_total_gib": round(gib(c.estimate.host_total), 3),
                              "why_not": c.why_not(self.gpu_budget, self.host_budget)}
                             for c in self.rejected(frontier=False)],
            "candidates": len(self.candidates),
        }


def _choices(host: Any, kind: str, require: Mapping[str, list[str]], optional: bool = True) -> list[tuple[str | None, dict]]:
    """(name, options) pairs the search tries for one kind: the user's choice, or every plugin's variants
    (and none of that kind, when ``optional``, or when no plugin of the kind has a variant)."""
    if require.get(kind):
        return [(require[kind][0], {})]
    found: list[tuple[str | None, dict]] = [(p.name, dict(v)) for p in host.registry if p.kind == kind
                                            for v in p.plan_variants()]
    return ([(None, {})] if optional or not found else []) + found


def _offload_sets(host: Any, fixed: list[str]) -> list[list[tuple[str, dict]]]:
    """The offload plugins of the search: the user's own (``fixed``), in each of their variants, plus every
    combination of the other plugins' variants; an engine, which runs the whole step itself, only alone and
    only when the user chose none."""
    sets: list[list[tuple[str, dict]]] = [[]]
    for name in fixed:
        variants = host.registry[name].plan_variants() if name in host.registry else []
        sets = [s + [(name, dict(v))] for s in sets for v in variants or [{}]]
    if any(host.registry[n].engine for n in fixed if n in host.registry):
        return sets
    autos = [p for p in host.registry if p.kind == "offload" and p.name not in fixed and p.plan_variants()]
    for p in (p for p in autos if not p.engine):
        sets = sets + [s + [(p.name, dict(v))] for s in sets for v in p.plan_variants()]
    if not fixed:
        sets += [[(p.name, dict(v))] for p in autos if p.engine for v in p.plan_variants()]
    return sets


def candidate_selections(host: Any, require: Mapping[str, list[str]] | None = None,
                         raw_options: Mapping[str, dict] | None = None) -> list[tuple[dict[str, list[str]], dict[str, dict]]]:
    """Every combination of registered plugins the planner considers, as (names by kind, raw options): each
    plugin's :meth:`~hf_lowmem.spec.Plugin.plan_variants`, restricted to the ``require``-d names (the user's own
    choices, which the plan only adds to; their ``raw_options`` win over a variant's)."""
    require = {k: list(v) for k, v in (require or {}).items() if v}
    raw_options = dict(raw_options or {})
    optimizers = _choices(host, "optimizer", require, optional=False)
    quants, attns = _choices(host, "quantization", require), _choices(host, "attention", require)
    fixed = list(require.get("offload") or [])
    out, seen = [], set()
    for opt, opt_raw in optimizers:
        for q, q_raw in quants:
            for a, a_raw in attns:
                for off_set in _offload_sets(host, fixed):
                    sel = {"optimizer": [opt] if opt else [], "quantization": [q] if q else [],
                           "attention": [a] if a else [], "offload": [n for n, _ in off_set]}
                    raw = {n: o for n, o in [(opt, opt_raw), (q, q_raw), (a, a_raw), *off_set] if n and o}
                    for n, o in raw_options.items():
                        raw[n] = {**raw.get(n, {}), **o}
                    names = [x for v in sel.values() for x in v]
                    raw = {n: o for n, o in raw.items() if n in names}
                    key = json.dumps([sel, raw], sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        out.append((sel, raw))
    return out


def _unavailable(plugins: list, device: str, check_installed: bool) -> str | None:
    for info in plugins:
        n = info.name
        if check_installed:
            missing = info.missing_requirements()
            if missing:
                hint = f"pip install 'hf-lowmem[{info.extra}]'" if info.extra else f"pip install {' '.join(missing)}"
                return f"{n} needs {', '.join(missing)} ({hint})"
        if info.needs_cuda and device != "cuda":
            return f"{n} needs a CUDA GPU"
    return None


def quality_gap(inp: PlanInput, plugins: list) -> float | None:
    """The measured eval-loss gap of a plan against AdamW when both run at the user's learning rate, in percent:
    the sum of its lossy plugins' :meth:`~hf_lowmem.spec.Plugin.quality_gap_in` (0 for a lossless plan; a sum, since
    gaps of independent losses roughly add up), or ``None`` when one of them has no measurement."""
    total = 0.0
    for plugin in plugins:
        if plugin.lossless_in(inp):
            continue
        gap = plugin.quality_gap_in(inp)
        if gap is None:
            return None
        total += gap
    return total


def _quality_rank(c: Candidate) -> tuple[bool, float]:
    """Measured plans before unmeasured ones, then the smaller gap."""
    return c.quality_gap is None, c.quality_gap or 0.0


def plan_training(shape: ModelShape, setup: TrainSetup, gpu_budget: int, host_budget: int, *, host: Any = None,
                  device: DeviceSpec = DEFAULT_DEVICE, require: Mapping[str, list[str]] | None = None,
                  raw_options: Mapping[str, dict] | None = None, lossless_only: bool = False,
                  check_installed: bool = True, mode: str = "single") -> Plan:
    """Choose the plugins that fit.

    :param shape: the model (:func:`load_model_shape`).
    :param setup: how it trains.
    :param gpu_budget: bytes of GPU memory the run may use in all (CUDA context included).
    :param host_budget: bytes of host RAM.
    :param host: the loaded plugins (default: :func:`hf_lowmem.plugins.get_plugin_host`); the planner plans
        over what is registered there, with each plugin's own memory model, and respects each plugin's
        declared incompatibilities.
    :param require: plugin names by kind that every plan must contain (the user's own choices).
    :param raw_options: per-plugin options the user gave (applied to every plan containing that plugin).
    :param lossless_only: consider only plugins that do not change the results.
    :param check_installed: mark plans whose plugins' packages are missing here as unavailable.
    :param mode: distributed mode the plans must support.
    """
    from hf_lowmem.context import resolve_selection

    if host is None:
        from hf_lowmem.plugins import get_plugin_host

        host = get_plugin_host()
    candidates: list[Candidate] = []
    for sel, raw in candidate_selections(host, require, raw_options):
        try:
            resolved = resolve_selection(host, sel, raw, mode)
        except PluginError:
            continue  # an impossible combination (declared by the plugins themselves)
        inp = PlanInput(shape=shape, setup=setup, device=device, options=dict(resolved.options),
                        selection={k: tuple(v) for k, v in sel.items()}, mode=mode)
        plugins = selected_plugins(inp, host)
        lossless = all(p.lossless_in(inp) for p in plugins)
        if lossless_only and not lossless:
            continue
        try:
            est = estimate_memory(inp, host)
        except PlanRefused:
            continue  # a plugin would refuse this plan on this model
        c = Candidate(inp=inp, estimate=est, lossless=lossless, fits_gpu=est.gpu_total <= gpu_budget,
                      fits_host=est.host_total <= host_budget,
                      unavailable=_unavailable(plugins, setup.device, check_installed),
                      quality_gap=quality_gap(inp, plugins))
        candidates.append(c)
    candidates.sort(key=lambda c: (-(c.estimate.speed or 0.0), not c.lossless, c.estimate.gpu_total))
    usable = [c for c in candidates if c.usable]
    chosen = None
    if usable:
        fastest = max(c.estimate.speed or 0.0 for c in usable)
        near = [c for c in usable if (c.estimate.speed or 0.0) >= 0.95 * fastest]
        chosen = min(near, key=lambda c: (not c.lossless, _quality_rank(c), -(c.estimate.speed or 0.0),
                                          len(c.inp.names()), c.estimate.gpu_total))
    runnable = [c for c in candidates if c.unavailable is None and c.fits_host]
    smallest = (min(runnable, key=lambda c: (c.estimate.gpu_total, _quality_rank(c), -(c.estimate.speed or 0)))
                if runnable else None)
    return Plan(shape=shape, setup=setup, gpu_budget=gpu_budget, host_budget=host_budget, chosen=chosen,
                candidates=candidates, smallest=smallest,
                constraints={k: v for k, v in (require or {}).items() if v})
