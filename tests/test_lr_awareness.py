"""Learning-rate awareness of the lossy optimizer plugins (issue 16): every one says once, at construction, what
was measured at the user's learning rate, with numbers; GaLore's scale="auto" makes AdamW's step size; Lion's
betas; the planner prefers the better measured quality; ``hf-lowmem plugins`` and the README table show it."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from hf_lowmem.testing import RandomTokens, make_context, tiny_model, train_args
from tests.tiny import bench_module

#: every lossy optimizer plugin of hf-lowmem (and int8-weights, whose loss is in the optimizer step's rounding)
LOSSY = ["adafactor", "adam-mini", "apollo", "apollo-layerwise", "apollo-mini", "apollo-mini-layerwise",
         "bnb-adamw8bit", "bnb-lamb8bit", "bnb-lion8bit", "bnb-paged-adamw8bit", "galore-adafactor",
         "galore-adafactor-layerwise", "galore-adamw", "galore-adamw-layerwise", "galore-adamw8bit",
         "galore-adamw8bit-layerwise", "int8-weights"]
#: lossy by declaration but with AdamW's own step: nothing to say about the learning rate
SILENT = {"bnb-paged-adamw32bit": "32-bit AdamW states (bitsandbytes' kernel): AdamW's step"}
LR = 3e-4


@pytest.fixture(scope="module")
def host():
    from hf_lowmem.plugins import load_plugins

    return load_plugins()


def test_the_list_is_every_lossy_optimizer_plugin(host):
    found = {p.name for p in host.registry if p.distribution == "hf-lowmem" and not p.lossless
             and p.kind == "optimizer"}
    assert found == (set(LOSSY) - {"int8-weights"}) | set(SILENT)
    for name in SILENT:
        assert host.registry[name].quality_gap is None and not host.registry[name].lr_advice


def _selection(name: str, host) -> dict:
    kind = host.registry[name].kind
    return {"lowmem_optimizer": name} if kind == "optimizer" else {"lowmem_quantization": name}


@pytest.mark.parametrize("name", LOSSY)
def test_construction_says_the_measured_numbers_once(tmp_path, caplog, host, name):
    from hf_lowmem_plugins.lr_evidence import LOSSY_PCT, forget_said

    from hf_lowmem import LowMemTrainer

    plugin = host.registry[name]
    if plugin.missing_requirements():
        pytest.skip(f"{name} needs {plugin.missing_requirements()}")
    forget_said()
    kw = dict(_selection(name, host), learning_rate=LR, max_grad_norm=0.0)
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        caplog.clear()
        if plugin.needs_cuda and not torch.cuda.is_available():  # what construction calls, without the GPU check
            ctx = make_context(host, **kw)
            plugin.validate(ctx)
            plugin.validate(ctx)
        else:
            for _ in range(2):  # a second trainer with the same settings says nothing new
                LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, **kw), train_dataset=RandomTokens(n=4, seq=8))
    said = [r for r in caplog.records if r.getMessage().startswith(f"{name}: ") and "AdamW" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    msg = said[0].getMessage()
    gaps = _regime_gaps(msg)  # both regimes, each with what ran and its file
    gap = plugin.quality_gap
    assert gap is not None and gap == max(gaps.values())  # the planner gets the worse regime
    assert re.search(r"bench/results/quality_\w+\.json", msg) and f"{LR:g}" in msg
    assert said[0].levelno == (logging.WARNING if gap > LOSSY_PCT else logging.INFO)
    if gap > LOSSY_PCT:  # lossy at your lr: it names the learning rate to use, or says that none of the grid did
        assert (re.search(r"use about [0-9.e-]+ \(\d+x\)", msg) or "no multiple of it among" in msg
                or "only x1 was run there" in msg)
        assert "keeps quality at your learning rate" in msg or min(gaps.values()) > LOSSY_PCT
    for label, g in gaps.items():  # the advice line names both regimes' gaps too
        assert f"{g:+.2f}% in {label}" in plugin.lr_advice or f"{g:+.2f}% vs AdamW" in plugin.lr_advice


def test_the_message_gives_the_fix_or_the_closest_multiple_of_the_grid():
    """Per lossy regime: the multiple that came within 2%, or (none did) the closest one, named as the grid's edge
    when it is, and the planned multiples that were not run."""
    from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, lr_message

    fixable = Evidence((Measured(5.0, 4, 1.0, PRETRAIN), Measured(0.1, 1, 0.1, FINETUNE)), "x")
    level, msg = lr_message("x", fixable, 1e-3, "why")
    assert level == logging.WARNING and "use about 0.004 (4x)" in msg and "closest" not in msg
    edge = Evidence((Measured(7.0, 0.5, 3.0, PRETRAIN), Measured(3.0, 2, 2.5, FINETUNE, mults=(1.0, 2.0, 4.0))), "x")
    _, msg = lr_message("x", edge, 1e-3, "why")
    assert "the closest was 0.5x (0.0005) at +3.00%, the smallest multiple run, so" in msg
    assert "among x1, x2, x4 came within 2% of AdamW (x0.5, x8 not run); the closest was 2x (0.002) at +2.50%, so" in msg
    stuck = Evidence((Measured(4.0, 1, 4.0, PRETRAIN), Measured(0.1, 1, 0.1, FINETUNE)), "x")
    _, msg = lr_message("x", stuck, 1e-3, "why")
    assert "among x0.5, x1, x2, x4, x8 came within 2% of AdamW, so where" in msg and "closest" not in msg


def _regime_gaps(msg: str) -> dict:
    """label -> the gap at your lr that the message gives for each run of lr_evidence.RUNS (all must be there)."""
    from hf_lowmem_plugins.lr_evidence import RUNS

    out = {}
    for run in RUNS.values():
        m = re.search(rf"in {re.escape(run.label)} \({re.escape(run.what)}\) ([+-]\d+\.\d\d)%", msg)
        assert m, f"the message does not give the gap in {run.label}: {msg}"
        out[run.label] = float(m.group(1))
    return out


def _evidence_in(obj):
    """Every Evidence in a plugin module's EVIDENCE constant (a value, or dicts of them)."""
    from hf_lowmem_plugins.lr_evidence import Evidence

    if isinstance(obj, Evidence):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _evidence_in(v)


@pytest.mark.parametrize("module", ["adafactor", "adam_mini", "apollo", "bnb_optim", "galore", "int8_weights"])
def test_evidence_is_what_the_committed_runs_measured(module):
    """Each EVIDENCE number equals bench/quality_gpu_tables.py's reading of the runs' JSON files: per regime the
    gap at x1, the best multiplier among those run, its gap, and which multipliers ran."""
    import importlib

    from hf_lowmem_plugins.lr_evidence import RUNS

    tables = bench_module("quality_gpu_tables")
    runs = {key: tables.merged(list(run.files)) for key, run in RUNS.items()}
    evidence = list(_evidence_in(importlib.import_module(f"hf_lowmem_plugins.{module}").EVIDENCE))
    assert evidence
    for ev in evidence:
        assert sorted(m.run for m in ev.regimes) == sorted(RUNS), ev.recipe  # both regimes, once each
        for m in ev.regimes:
            s = runs[m.run][ev.recipe]
            assert (m.gap_pct, m.best_mult, m.best_gap_pct, m.ran) == \
                (s["gap_pct"], s["best_mult"], s["best_gap_pct"], s["mults"]), (ev.recipe, m.run)


def test_a_fixed_galore_scale_gives_the_step_ratio_and_its_measurement(caplog):
    from hf_lowmem_plugins.galore import EVIDENCE, GaLoreOptions, lr_message

    for name in ("galore-adamw", "galore-adamw8bit-layerwise"):  # 0.25 was measured with galore-adamw only
        level, msg = lr_message(name, GaLoreOptions(scale=0.25), 1e-3)
        assert level == logging.WARNING
        assert f"{0.25 * math.sqrt(128 / 576):.2f}x for n=576" in msg and f"{0.25 * math.sqrt(128 / 4096):.2f}x for n=4096" in msg
        assert _regime_gaps(msg) == {m.label: m.gap_pct for m in EVIDENCE["galore-adamw"][0.25].regimes}
        assert "scale=\"auto\"" in msg and "measured as galore-adamw with rank 128" in msg
    level, msg = lr_message("galore-adamw", GaLoreOptions(scale=1.0), 1e-3)  # not measured: the ratio alone
    assert level == logging.WARNING and "0.47x for n=576" in msg and "measured" not in msg
    level, msg = lr_message("galore-adamw", GaLoreOptions(scale=0.25, rank=32), 1e-3)  # measured at rank 128 only
    assert level == logging.WARNING and "measured" not in msg


def test_adafactor_with_relative_step_says_its_own_step_replaces_your_lr(caplog):
    from hf_lowmem_plugins.lr_evidence import forget_said

    forget_said()
    ctx = make_context(lowmem_optimizer="adafactor", lowmem_options={"adafactor": {"relative_step": True}})
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        ctx.plugin("optimizer").validate(ctx)
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("adafactor: ")]
    assert "min(1e-2, 1/sqrt(step))" in rec.getMessage() and "replaces your learning rate" in rec.getMessage()
    from hf_lowmem_plugins.adafactor import EVIDENCE
    from hf_lowmem_plugins.lr_evidence import gaps

    assert f"was {gaps(EVIDENCE)} at AdamW's learning rate" in rec.getMessage()  # what the default measured


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_says_which_regime_its_defaults_lose_in_and_what_is_not_measured(caplog, beta1):
    from hf_lowmem_plugins.adafactor import EVIDENCE, UNMEASURED
    from hf_lowmem_plugins.lr_evidence import forget_said

    forget_said()
    ctx = make_context(lowmem_optimizer="adafactor", learning_rate=LR, lowmem_options={"adafactor": {"beta1": beta1}})
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        ctx.plugin("optimizer").validate(ctx)
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("adafactor: ")]
    msg = rec.getMessage()
    assert _regime_gaps(msg) == {m.label: m.gap_pct for m in EVIDENCE.regimes}
    assert rec.levelno == (logging.WARNING if EVIDENCE.lossy else logging.INFO) and msg.endswith(UNMEASURED)
    for m in EVIDENCE.regimes:  # per regime: the gap to expect at your lr, or that it keeps quality there
        assert (f"In {m.label} expect that gap at your learning rate ({LR:g})" in msg) == (m.lossy and not m.fixable)
        assert (f"In {m.label} it keeps quality" in msg) == (EVIDENCE.lossy and not m.lossy)
    if beta1 is None:
        assert "no first moment (beta1=None)" in msg and "the defaults'" not in msg
    else:  # not what was measured: it says the numbers are the defaults'
        assert "a first moment (beta1=0.9); the numbers below are the defaults' (no first moment)" in msg


# ---- GaLore's scale="auto" -------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type,expect", [("std", lambda m, n: math.sqrt(min(m, n) / 4)),
                                              ("reverse_std", lambda m, n: math.sqrt(max(m, n) / 4)),
                                              ("left", lambda m, n: math.sqrt(m / 4)),
                                              ("full", lambda m, n: math.sqrt(m * n) / 4)])
def test_galore_auto_scale_is_sqrt_of_the_projected_side_over_rank(proj_type, expect):
    from hf_lowmem_plugins.galore import GaLoreOptions, make_projectors, select_targets

    opts = GaLoreOptions(rank=4, proj_type=proj_type)
    assert GaLoreOptions().scale == "auto"
    targets = select_targets(tiny_model(), opts)
    projectors = make_projectors(targets, opts)
    shapes = set()
    for _, m in targets:
        shapes.add(tuple(m.weight.shape))
        assert projectors[m.weight].scale == pytest.approx(expect(*m.weight.shape))
    assert shapes == {(32, 32), (16, 32), (64, 32), (32, 64)}  # q/o, k/v (GQA), up/gate, down
    fixed = make_projectors(targets, GaLoreOptions(rank=4, scale=0.25))
    assert {p.scale for p in fixed.values()} == {0.25}


@pytest.mark.parametrize("scale,ratio", [("auto", 1.0), (0.25, 0.25 * math.sqrt(64 / 256))])
def test_galore_auto_scale_makes_the_first_update_adamws_size(scale, ratio):
    """Adam's first update is lr * sign(g) (RMS = lr). GaLore's is lr * scale * sign(R) projected back by an
    orthonormal basis: RMS lr * scale * sqrt(rank / n). Under "auto" that is lr, exactly."""
    from galore_torch import GaLoreAdamW
    from hf_lowmem_plugins.galore import GaLoreOptions, make_projectors

    lin = torch.nn.Linear(256, 512, bias=False)
    torch.nn.init.zeros_(lin.weight)
    lin.weight.grad = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    opts = GaLoreOptions(rank=64, scale=scale)
    opt = GaLoreAdamW([{"params": [lin.weight], "rank": 64, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}],
                      lr=1.0, eps=1e-12, weight_decay=0.0, no_deprecation_warning=True)
    opt.state[lin.weight]["projector"] = make_projectors([("lin", lin)], opts)[lin.weight]
    opt.step()
    rms = float(lin.weight.detach().square().mean().sqrt())
    assert rms == pytest.approx(ratio, rel=1e-4)


# ---- Lion's betas ------------------------------------------------------------------------------------------------
def test_lion_gets_the_trainers_betas_and_says_what_its_own_measured(caplog):
    pytest.importorskip("bitsandbytes")
    from hf_lowmem_plugins.bnb_optim import EVIDENCE, _bnb_kwargs
    from hf_lowmem_plugins.lr_evidence import forget_said

    ctx = make_context(lowmem_optimizer="bnb-lion8bit", adam_beta2=0.995)
    assert _bnb_kwargs("bnb-lion8bit", ctx.args, ctx.options("bnb-lion8bit"))["betas"] == (0.9, 0.995)
    forget_said()
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        for betas, expect in (([0.9, 0.99], f"{EVIDENCE['bnb-lion8bit betas 0.9, 0.99'].gap_pct:+.2f}%"),
                              ([0.95, 0.98], "are not measured")):
            c = make_context(lowmem_optimizer="bnb-lion8bit", lowmem_options={"bnb-lion8bit": {"betas": betas}})
            c.plugin("optimizer").validate(c)
            assert expect in caplog.records[-1].getMessage()
            assert caplog.records[-1].levelno == logging.WARNING


# ---- the planner -------------------------------------------------------------------------------------------------
def _twin_optimizers(gaps: dict):
    """Optimizer plugins with the same memory and speed (no state at all), differing only in measured quality."""
    from hf_lowmem import Plugin, hookimpl
    from hf_lowmem.plugins import load_plugins

    class NoState(Plugin):
        kind, lossless = "optimizer", False

        def memory_model(self, plan, step):
            step.states = 0

    class Module:
        @hookimpl
        def hf_lowmem_register(self, register):
            for name, gap in gaps.items():
                register(NoState(name=name, quality_gap=gap))

    h = load_plugins(entry_points=False, extra_plugins=[("twins", Module())])
    assert not h.failures, [str(f) for f in h.failures]
    return h


@pytest.mark.parametrize("gaps,best", [({"opt-a": 3.0, "opt-b": 0.5, "opt-c": None}, "opt-b"),
                                       ({"opt-a": 0.5, "opt-b": 3.0, "opt-c": None}, "opt-a"),
                                       ({"opt-a": None, "opt-b": 4.0}, "opt-b")])
def test_the_planner_prefers_the_better_measured_quality_at_equal_memory(gaps, best):
    from hf_lowmem.planner import TrainSetup, load_model_shape, parse_size, plan_training

    shape = load_model_shape("smollm2-135m")
    plan = plan_training(shape, TrainSetup(micro_batch=1, seq_len=512), parse_size("80GiB"), parse_size("64GiB"),
                         host=_twin_optimizers(gaps), check_installed=False)
    by_name = {c.inp.selected("optimizer"): c for c in plan.candidates if not c.inp.names()[1:]}
    assert len({c.estimate.gpu_total for c in by_name.values()}) == 1  # equal memory, equal speed
    assert len({c.estimate.speed for c in by_name.values()}) == 1
    assert plan.chosen.inp.selected("optimizer") == best and plan.chosen.quality_gap == gaps[best]
    assert plan.smallest.inp.selected("optimizer") == best
    assert plan.chosen.to_dict(plan.gpu_budget, plan.host_budget)["quality_gap_pct"] == gaps[best]


def test_plan_quality_gap_adds_lossy_plugins_and_ignores_lossless_ones(host):
    from hf_lowmem.planner import PlanInput, TrainSetup, load_model_shape
    from hf_lowmem.planner.estimate import selected_plugins
    from hf_lowmem.planner.search import quality_gap

    shape, setup = load_model_shape("smollm2-135m"), TrainSetup()
    inp = PlanInput(shape, setup, {"optimizer": ("bnb-adamw8bit",), "quantization": ("int8-weights",),
                                   "offload": ("gradient-checkpointing",)})
    expect = host.registry["bnb-adamw8bit"].quality_gap + host.registry["int8-weights"].quality_gap
    assert quality_gap(inp, selected_plugins(inp, host)) == pytest.approx(expect)
    lossless = PlanInput(shape, setup, {"optimizer": ("adamw",)})
    assert quality_gap(lossless, selected_plugins(lossless, host)) == 0.0
    unmeasured = PlanInput(shape, setup, {"optimizer": ("bnb-paged-adamw32bit",)})
    assert quality_gap(unmeasured, selected_plugins(unmeasured, host)) is None


# ---- where users read it -----------------------------------------------------------------------------------------
def test_plugins_cli_and_readme_table_show_the_lr_advice(host, capsys):
    from pathlib import Path

    from hf_lowmem.cli_plugins import rows

    table = {r["name"]: r for r in rows(host)}
    for name in LOSSY:
        assert table[name]["lr_advice"] == host.registry[name].lr_advice != ""
        assert table[name]["quality_gap_pct"] == host.registry[name].quality_gap
    assert table["adamw"]["lr_advice"] == "" and table["adamw"]["quality_gap_pct"] is None
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- plugin-table:begin -->")[1].split("<!-- plugin-table:end -->")[0]
    for name in LOSSY:
        line = next(x for x in block.splitlines() if x.startswith(f"| {host.registry[name].kind} | `{name}` |"))
        assert line.rstrip(" |").endswith(host.registry[name].lr_advice), \
            "README plugin table is stale: python examples/plugin_table.py --write"
