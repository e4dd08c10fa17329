"""What the lossy optimizer plugins measured against AdamW at the learning rate the user already has, and what
they say about it: once when the trainer is built (:func:`say_once`), in ``hf-lowmem plugins`` and the README
plugin table (``Plugin.lr_advice``), and to the planner (``Plugin.quality_gap``).

**One place per plugin.** Each plugin module keeps its measurements in one constant, ``EVIDENCE``, of
:class:`Measured` values from ``bench/quality.py`` runs; the message, the advice line and the gap are all
computed from it. To update a plugin from a new run (the GPU grid), change its numbers there and add the run
to :data:`RUNS`.

**Lossy at your learning rate**: more than :data:`LOSSY_PCT` percent above AdamW's eval loss when both run
at AdamW's learning rate (x1), the rule of issue 16. Such a plugin warns, with the multiplier of the run's
grid that brings it within that margin, or with the fact that none did; a plugin within it logs the numbers
at INFO level only (nothing shows at the default log level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

#: eval-loss gap (percent of AdamW's, both at AdamW's learning rate) above which a plugin is lossy at your lr
LOSSY_PCT = 2.0

#: run key -> (short label for tables, what was run and where its numbers are)
RUNS = {
    "cpu-pretrain": (
        "CPU pretraining, 0.9M params",
        "bench/results/quality_cpu_pretrain.json: a 0.9M-parameter byte-level Llama trained from scratch for 200 "
        "steps on the CPU, AdamW at lr 1e-3, the best of AdamW's own x0.5-x4 grid",
    ),
    "cpu-pretrain-lion": (
        "CPU pretraining, 0.9M params",
        "bench/results/quality_cpu_lion.json: the run of quality_cpu_pretrain.json again (same model, data, steps "
        "and AdamW baseline) for Lion with its own betas (0.9, 0.99), at x0.25-x1",
    ),
}

#: the multipliers of AdamW's learning rate each run tried
GRIDS = {"cpu-pretrain": "x0.5-x4", "cpu-pretrain-lion": "x0.25-x1"}


@dataclass(frozen=True)
class Measured:
    """One plugin's eval loss against AdamW's in one ``bench/quality.py`` run, as a gap in percent of AdamW's
    eval loss at AdamW's learning rate.

    :param gap_pct: the gap at AdamW's learning rate (x1): what a user who keeps their learning rate gets.
    :param best_mult: the multiplier of AdamW's learning rate with the lowest eval loss in the run's grid.
    :param best_gap_pct: the gap at that multiplier (against AdamW at x1).
    :param run: the run (a key of :data:`RUNS`).
    :param recipe: the plugin that ran (``bench/quality.py``'s recipe), when the numbers are shared by plugins of
        the same arithmetic (the layer-wise variants, paged states); the advice line names it for the others.
    :param measured_as: what ran, when it is not this plugin with its defaults (another plugin with the same
        arithmetic, or other options), in words; empty otherwise.
    """

    gap_pct: float
    best_mult: float
    best_gap_pct: float
    run: str = "cpu-pretrain"
    measured_as: str = ""
    recipe: str = ""

    @property
    def lossy(self) -> bool:
        """More than :data:`LOSSY_PCT` behind AdamW at AdamW's learning rate."""
        return self.gap_pct > LOSSY_PCT

    @property
    def fixable(self) -> bool:
        """Lossy at x1, and another multiplier of the grid brings it within :data:`LOSSY_PCT`."""
        return self.lossy and self.best_mult != 1 and self.best_gap_pct <= LOSSY_PCT

    @property
    def grid(self) -> str:
        return GRIDS.get(self.run, "the grid")


def advice(m: Measured, name: str = "") -> str:
    """One line for ``hf-lowmem plugins`` and the README table: what to do with your AdamW learning rate (``name``:
    the plugin it is for; the line says so when the numbers were measured with another one)."""
    where = RUNS[m.run][0] + (f", measured with {m.recipe}" if m.recipe and name and m.recipe != name else "")
    at_best = f"{m.best_gap_pct:+.2f}% at {m.best_mult:g}x"
    if not m.lossy:
        better = f", {at_best}" if m.best_mult != 1 and m.best_gap_pct < m.gap_pct - LOSSY_PCT / 2 else ""
        return f"keep your lr: {m.gap_pct:+.2f}% vs AdamW at its lr{better} ({where})"
    if m.fixable:
        return f"use ~{m.best_mult:g}x your lr: {m.gap_pct:+.2f}% vs AdamW at 1x, {at_best} ({where})"
    rest = "worse at the other multiples" if m.best_mult == 1 else f"{at_best} at best"
    return f"lossy at every lr of {m.grid}: {m.gap_pct:+.2f}% vs AdamW at 1x, {rest} ({where})"


def measured_sentence(m: Measured) -> str:
    """The numbers, with where they come from."""
    if m.best_mult == 1:
        best = f"no better at the other multipliers of {m.grid}"
    else:
        best = f"{m.best_gap_pct:+.2f}% at {m.best_mult:g}x it, the best of {m.grid}"
    what = f", measured as {m.measured_as}" if m.measured_as else ""
    return (f"measured {m.gap_pct:+.2f}% eval loss vs AdamW at AdamW's learning rate and {best} "
            f"({RUNS[m.run][1]}{what})")


def lr_message(name: str, m: Measured, lr: float, why: str) -> tuple[int, str]:
    """(logging level, text) a plugin logs once at construction: ``why`` its step differs from AdamW's (or
    why it does not), what was measured, and what to do at the learning rate ``lr`` the run has."""
    text = f"{name}: {why}; {measured_sentence(m)}"
    if not m.lossy:
        text += f". It keeps quality at your learning rate ({lr:g})"
        if m.best_mult != 1 and m.best_gap_pct < m.gap_pct - LOSSY_PCT / 2:
            text += f"; {m.best_mult:g}x it ({m.best_mult * lr:g}) did better still there"
        return logging.INFO, text
    if m.fixable:
        return logging.WARNING, (text + f". If {lr:g} is your AdamW learning rate, use about {m.best_mult * lr:g} "
                                 f"({m.best_mult:g}x)")
    return logging.WARNING, (text + f". Expect that gap at your learning rate ({lr:g}): no multiple of it in {m.grid} "
                             f"came within {LOSSY_PCT:g}% of AdamW, so where quality matters choose another optimizer")


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
