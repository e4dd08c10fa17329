"""What the lossy optimizer plugins measured against AdamW at the learning rate the user already has, and what
they say about it: once when the trainer is built (:func:`say_once`), in ``hf-lowmem plugins`` and the README
plugin table (``Plugin.lr_advice``), and to the planner (``Plugin.quality_gap``).

**One place per plugin.** Each plugin module keeps its measurements in one constant, ``EVIDENCE``, of
:class:`Evidence` values: one :class:`Measured` per regime of the ``bench/quality.py`` GPU grid (:data:`RUNS`:
pretraining a 25M Llama from scratch, fine-tuning SmolLM2-135M), with the recipe that ran. The message, the
advice line and the gap are all computed from it; ``tests/test_lr_awareness.py`` checks every ``EVIDENCE``
against the runs' JSON files (``bench/quality_gpu_tables.py`` reads them, and prints
``bench/results/quality_gpu.md``'s tables).

**Two regimes.** The gap at your learning rate differs a lot between them (Adafactor: +10.17% pretraining,
+0.04% fine-tuning), so the message names both. "Lossy at your learning rate", the WARNING level, the advice
line and ``Plugin.quality_gap`` (what the planner compares) follow the *worse* regime: a plugin is lossy when
either regime is more than :data:`LOSSY_PCT` percent above AdamW's eval loss with both at AdamW's learning rate
(x1), the rule of issue 16. For each lossy regime the message gives the multiplier that brought it within that
margin in the grid that was actually run there, or says that none did (with the closest multiplier, and which
multipliers were not run); a plugin within it in both regimes logs the numbers at INFO level only (nothing shows
at the default log level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

#: eval-loss gap (percent of AdamW's, both at AdamW's learning rate) above which a plugin is lossy at your lr
LOSSY_PCT = 2.0
#: the grid of multipliers of AdamW's learning rate that issue 16 asks for (what a run skipped is named)
PLANNED = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Run:
    """One ``bench/quality.py`` run (a regime).

    :param label: a short name for messages and tables ("25M pretraining").
    :param what: what ran and where its numbers are, for the construction-time message.
    :param files: its JSON files under the repository; a later file fills only the jobs (recipe and multiplier)
        that no earlier one finished, each row compared with the AdamW at x1 of its own file
        (``bench/quality_gpu_tables.py``).
    :param grid: the multipliers of AdamW's learning rate its optimizer recipes ran (a :class:`Measured` names
        fewer where its recipe ran fewer).
    """

    label: str
    what: str
    files: tuple[str, ...]
    grid: tuple[float, ...]


#: run key -> the run
RUNS = {
    "gpu-pretrain": Run(
        "25M pretraining",
        "a 25.6M-parameter byte-level Llama from scratch, 300 steps on Python source, AdamW lr 1e-3, whose own best "
        "was 0.5x at -4.03%; H200: bench/results/quality_gpu_pretrain.json and quality_gpu_pretrain_x05_x8.json",
        ("bench/results/quality_gpu_pretrain.json", "bench/results/quality_gpu_pretrain_x05_x8.json"),
        PLANNED,
    ),
    "gpu-finetune": Run(
        "135M fine-tuning",
        "SmolLM2-135M, 200 steps on Python source, AdamW lr 5e-5, whose own best was 2x at -0.53%; H200: "
        "bench/results/quality_gpu_finetune.json and 5 more quality_gpu_finetune_*.json",
        ("bench/results/quality_gpu_finetune.json", "bench/results/quality_gpu_finetune_x1_rerun.json",
         "bench/results/quality_gpu_finetune_x05.json", "bench/results/quality_gpu_finetune_x4.json",
         "bench/results/quality_gpu_finetune_x8.json", "bench/results/quality_gpu_finetune_x2_fill.json"),
        PLANNED,
    ),
}
PRETRAIN, FINETUNE = "gpu-pretrain", "gpu-finetune"


@dataclass(frozen=True)
class Measured:
    """One recipe's eval loss against AdamW's in one run, as gaps in percent of AdamW's eval loss at AdamW's
    learning rate.

    :param gap_pct: the gap at AdamW's learning rate (x1): what a user who keeps their learning rate gets.
    :param best_mult: the multiplier of AdamW's learning rate with the lowest eval loss among those run.
    :param best_gap_pct: the gap at that multiplier (against AdamW at x1).
    :param run: the run (a key of :data:`RUNS`).
    :param mults: the multipliers this recipe ran, when fewer than the run's grid (the budget skipped some).
    """

    gap_pct: float
    best_mult: float
    best_gap_pct: float
    run: str
    mults: tuple[float, ...] = ()

    @property
    def ran(self) -> tuple[float, ...]:
        return tuple(sorted(self.mults or RUNS[self.run].grid))

    @property
    def label(self) -> str:
        return RUNS[self.run].label

    @property
    def lossy(self) -> bool:
        """More than :data:`LOSSY_PCT` behind AdamW at AdamW's learning rate."""
        return self.gap_pct > LOSSY_PCT

    @property
    def fixable(self) -> bool:
        """Lossy at x1, and another multiplier that ran brings it within :data:`LOSSY_PCT`."""
        return self.lossy and self.best_mult != 1 and self.best_gap_pct <= LOSSY_PCT

    @property
    def better_elsewhere(self) -> bool:
        """Within the margin at x1, and clearly better (by half the margin) at another multiplier."""
        return not self.lossy and self.best_mult != 1 and self.best_gap_pct < self.gap_pct - LOSSY_PCT / 2


@dataclass(frozen=True)
class Evidence:
    """One plugin's (or one option setting's) measurements: one :class:`Measured` per regime.

    :param regimes: the measurements, one per run.
    :param recipe: the ``bench/quality.py`` recipe whose rows these are (a plugin name, or a ``--define`` label
        such as ``galore-adamw-s025``); the advice line names it for a plugin of another name (layer-wise
        variants, paged states, the other GaLore variants), which has the same arithmetic.
    :param measured_as: what ran, when it is not this plugin with its defaults, in words; empty otherwise.
    """

    regimes: tuple[Measured, ...]
    recipe: str
    measured_as: str = ""

    @property
    def worse(self) -> Measured:
        """The regime with the larger gap at AdamW's learning rate."""
        return max(self.regimes, key=lambda m: m.gap_pct)

    @property
    def gap_pct(self) -> float:
        """The worse regime's gap at AdamW's learning rate: ``Plugin.quality_gap``, what the planner compares."""
        return self.worse.gap_pct

    @property
    def lossy(self) -> bool:
        return any(m.lossy for m in self.regimes)


def _xs(mults) -> str:
    return ", ".join(f"x{m:g}" for m in sorted(mults))


def gaps(ev: Evidence) -> str:
    """"+10.17% in 25M pretraining, +0.04% in 135M fine-tuning": the gaps at AdamW's learning rate."""
    return ", ".join(f"{m.gap_pct:+.2f}% in {m.label}" for m in ev.regimes)


def advice(ev: Evidence, name: str = "") -> str:
    """One line for ``hf-lowmem plugins`` and the README table: what to do with your AdamW learning rate, from the
    worse regime, with the other regime's gap (``name``: the plugin it is for; the line names the recipe that
    ran when it is another one)."""
    w = ev.worse
    with_ = f", measured with {ev.recipe}" if name and ev.recipe != name else ""
    others = "".join(f"; {m.gap_pct:+.2f}% in {m.label}" + (" (lossy)" if m.lossy else "")
                     for m in ev.regimes if m is not w)
    if not ev.lossy:
        return f"keep your lr: vs AdamW at its lr {gaps(ev)} (H200{with_})"
    at_best = f"{w.best_gap_pct:+.2f}% at {w.best_mult:g}x"
    if w.fixable:
        return f"use ~{w.best_mult:g}x your lr in {w.label}: {w.gap_pct:+.2f}% vs AdamW at 1x, {at_best}{others} (H200{with_})"
    if len(w.ran) == 1:
        return f"lossy in {w.label} at your lr (only x1 run): {w.gap_pct:+.2f}% vs AdamW{others} (H200{with_})"
    rest = "no better at the other multiples" if w.best_mult == 1 else f"{at_best} at best"
    return (f"lossy in {w.label} at every lr run ({_xs(w.ran)}): {w.gap_pct:+.2f}% vs AdamW at 1x, {rest}{others} "
            f"(H200{with_})")


def _clause(m: Measured) -> str:
    """"in 25M pretraining (what ran) +10.17%, no better at x2, x4"."""
    s = f"in {m.label} ({RUNS[m.run].what}) {m.gap_pct:+.2f}%"
    others = [k for k in m.ran if k != 1]
    if not others:
        return s + ", only x1 run"
    if m.best_mult == 1:
        return s + f", no better at {_xs(others)}"
    return s + f", {m.best_gap_pct:+.2f}% at {m.best_mult:g}x, the best of {_xs(m.ran)}"


def measured_sentence(ev: Evidence) -> str:
    """The numbers of every regime, with where they come from."""
    what = f"; measured as {ev.measured_as}" if ev.measured_as else ""
    return ("measured eval loss vs AdamW at AdamW's learning rate: " + "; ".join(_clause(m) for m in ev.regimes)
            + what)


def _closest(m: Measured, lr: float) -> str:
    """"; the closest was 0.5x (0.0005) at +3.16%, the smallest multiple run" (empty when x1 was the best)."""
    if m.best_mult == 1:
        return ""
    edge = {min(m.ran): ", the smallest multiple run", max(m.ran): ", the largest multiple run"}.get(m.best_mult, "")
    return f"; the closest was {m.best_mult:g}x ({m.best_mult * lr:g}) at {m.best_gap_pct:+.2f}%{edge}"


def lr_message(name: str, ev: Evidence, lr: float, why: str) -> tuple[int, str]:
    """(logging level, text) a plugin logs once at construction: ``why`` its step differs from AdamW's (or
    why it does not), what was measured in each regime, and what to do at the learning rate ``lr`` the run has:
    WARNING when either regime is lossy at it."""
    text = f"{name}: {why}; {measured_sentence(ev)}"
    if not ev.lossy:
        text += (f". It keeps quality at your learning rate ({lr:g}) in "
                 + " and in ".join(m.label for m in ev.regimes))
        for m in ev.regimes:
            if m.better_elsewhere:
                text += f"; in {m.label} {m.best_mult:g}x it ({m.best_mult * lr:g}) did better still"
        return logging.INFO, text
    for m in sorted(ev.regimes, key=lambda m: -m.gap_pct):
        if m.fixable:
            text += (f". In {m.label}: if {lr:g} is your AdamW learning rate, use about {m.best_mult * lr:g} "
                     f"({m.best_mult:g}x)")
        elif m.lossy and len(m.ran) == 1:
            text += (f". In {m.label} expect that gap at your learning rate ({lr:g}); only x1 was run there, so no "
                     "learning rate that fixes it is measured")
        elif m.lossy:
            skipped = [k for k in PLANNED if k not in m.ran]
            text += (f". In {m.label} expect that gap at your learning rate ({lr:g}): no multiple of it among "
                     f"{_xs(m.ran)} came within {LOSSY_PCT:g}% of AdamW"
                     + (f" ({_xs(skipped)} not run)" if skipped else "") + _closest(m, lr)
                     + ", so where quality matters there choose another optimizer")
        else:
            text += f". In {m.label} it keeps quality at your learning rate"
    return logging.WARNING, text


_SAID: set = set()  # (logger, text) already logged in this process


def say_once(logger: logging.Logger, level: int, text: str) -> None:
    """Log ``text`` unless this process logged it already (building a second trainer with the same settings
    says nothing new)."""
    key = (logger.name, text)
    if key not in _SAID:
        _SAID.add(key)
        logger.log(level, text)


def forget_said() -> None:
    """Forget what :func:`say_once` logged (for tests)."""
    _SAID.clear()
