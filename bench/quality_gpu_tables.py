"""The tables of bench/results/quality_gpu.md and the README's quality table, from the GPU quality runs' JSON files
(``bench/quality.py``).

    python bench/quality_gpu_tables.py           # print both regimes' tables and the README's table
    python bench/quality_gpu_tables.py --write   # write them between their markers in quality_gpu.md and README.md
    python bench/quality_gpu_tables.py --check   # exit 1 if either file's tables differ from the JSON files'

A regime may come from several files: the first file's rows are kept, and a later file only fills the jobs
(recipe and multiplier) that no earlier one finished: the fine-tuning x1 jobs re-run alone after a timeout, then
the multipliers of the later calls. Every row's gap is taken against AdamW at x1 *of its own file*, so a job is
compared with the AdamW that ran beside it, and the best multiplier is the one with the lowest such gap. The files
are the runs of ``hf_lowmem_plugins.lr_evidence.RUNS``; the plugins' ``EVIDENCE`` constants must equal
:func:`merged` (tests/test_lr_awareness.py checks it, tests/test_quality_bench.py that the written tables are
current).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import BASELINE, LOSSY_PCT, PRESETS, ROOT, gap_pct

from hf_lowmem_plugins.lr_evidence import PLANNED as MULTS  # the grid issue 16 asks for (not all of it was run)
from hf_lowmem_plugins.lr_evidence import RUNS  # the runs the plugins' evidence names


def merged(paths: list[str]) -> dict:
    """recipe -> {"rows": {mult: row with "gap_pct" and "file"}, "gap_pct", "best_mult", "best_gap_pct",
    "mults", "eval_loss_at_1", "peak_gpu_gib", "skipped": {mult: reason}} for one regime."""
    out: dict = {}
    for f in paths:
        rep = json.loads((ROOT / f).read_text())
        rows = rep["rows"]
        for table in rep["summary"].values():  # the command's recipe order
            for rec in table:
                out.setdefault(rec, {"rows": {}, "skipped": {}})
        base = next(r["eval_loss"] for r in rows if r["recipe"] == BASELINE and r["lr_mult"] == 1 and r["status"] == "ok")
        for r in rows:
            rec = out.setdefault(r["recipe"], {"rows": {}, "skipped": {}})
            m = float(r["lr_mult"])
            if r["status"] != "ok" or not math.isfinite(r.get("eval_loss", math.nan)):
                if m not in rec["rows"]:  # the latest file's reason, unless a later file fills it
                    rec["skipped"][m] = r.get("reason") or f"{r['status']} after {r.get('wall_s', '?')} s"
                continue
            if m in rec["rows"]:
                continue
            rec["skipped"].pop(m, None)
            rec["rows"][m] = dict(r, gap_pct=gap_pct(r["eval_loss"], base) + 0.0, file=f,
                                  baseline=base)
    for rec in out.values():
        rows = rec["rows"]
        if not rows:
            continue
        best = min(rows.values(), key=lambda r: (r["gap_pct"], r["eval_loss"]))  # each against its own file's AdamW
        at1 = rows.get(1.0)
        rec.update(mults=tuple(sorted(rows)), best_mult=float(best["lr_mult"]), best_gap_pct=best["gap_pct"],
                   eval_loss_at_best=best["eval_loss"], gap_pct=at1["gap_pct"] if at1 else None,
                   eval_loss_at_1=at1["eval_loss"] if at1 else None,
                   peak_gpu_gib=(at1 or best).get("peak_gpu_gib"))
    return out


def _note(rec: str, s: dict) -> str:
    if rec == BASELINE or s["gap_pct"] is None or s["gap_pct"] <= LOSSY_PCT:
        return ""
    if s["best_mult"] != 1 and s["best_gap_pct"] <= LOSSY_PCT:
        return f"**yes: use lr x{s['best_mult']:g}**"
    if len(s["mults"]) == 1:
        return "**yes** (only x1 run)"
    return f"**yes, at every lr run** (best x{s['best_mult']:g})"


def table(summary: dict, paths: list[str]) -> str:
    lines = [("| optimizer | eval loss at your lr (x1) | gap vs AdamW | multipliers run | best multiplier: eval loss "
              "(gap) | peak GPU GiB | lossy at your lr (> 2%) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec, s in summary.items():
        if not s["rows"]:
            lines.append(f"| {rec} | not run | | | | | |")
            continue
        at1 = "" if s["eval_loss_at_1"] is None else f"{s['eval_loss_at_1']:.4f}"
        if s["rows"].get(1.0, {}).get("file", paths[0]) != paths[0]:
            at1 += " (re-run)"
        gap = "baseline" if rec == BASELINE else ("" if s["gap_pct"] is None else f"{s['gap_pct']:+.2f}%")
        run = ", ".join(f"x{m:g}" for m in s["mults"])
        best = f"x{s['best_mult']:g}: {s['eval_loss_at_best']:.4f} ({s['best_gap_pct']:+.2f}%)"
        mem = "" if s["peak_gpu_gib"] is None else f"{s['peak_gpu_gib']:.2f}"
        lines.append(f"| {rec} | {at1} | {gap} | {run} | {best} | {mem} | {_note(rec, s)} |")
    return "\n".join(lines)


def grid(summary: dict) -> str:
    """Eval loss per multiplier (empty: not run)."""
    lines = ["| optimizer | " + " | ".join(f"x{m:g}" for m in MULTS) + " |", "|---" * (len(MULTS) + 1) + "|"]
    for rec, s in summary.items():
        cells = [f"{s['rows'][m]['eval_loss']:.4f}" if m in s["rows"] else "" for m in MULTS]
        lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defined(paths: list[str]) -> set[str]:
    """The recipes that the runs defined with ``--define`` (a plugin with options other than its defaults), not
    ``bench/quality.py``'s own presets."""
    out: set[str] = set()
    for f in paths:
        out |= set(json.loads((ROOT / f).read_text())["config"].get("defined", {}))
    return out - set(PRESETS)


#: how the README names a recipe that is not a plugin's name
README_NAMES = {"stream-8bit": "`stream` with 8-bit states"}


def _readme_cell(rec: str, s: dict) -> tuple[str, str]:
    """(at your lr, at the best multiplier) for one regime's cell pair of the README table."""
    if rec == BASELINE:
        return f"reference, {s['eval_loss_at_1']:.4f}", f"x{s['best_mult']:g}: {s['best_gap_pct']:+.2f}%"
    gap = f"{s['gap_pct']:+.2f}%"
    if s["gap_pct"] > LOSSY_PCT:
        gap = f"**{gap}**"
    if len(s["mults"]) == 1:
        return gap, "x1 only"
    return gap, f"x{s['best_mult']:g}: {s['best_gap_pct']:+.2f}%"


def readme_table(summaries: dict) -> str:
    """The README's quality table: the plugins with their defaults (not the ``--define`` variants), each regime's
    gap at your lr and at its best multiplier, ordered by the worse regime's gap at your lr; then one sentence
    saying which are lossy at your lr in which regime, and whether a multiplier of the grid fixed it."""
    keys = list(summaries)
    skip = set().union(*(defined(list(RUNS[k].files)) for k in keys))
    recs = [r for r in summaries[keys[0]] if r not in skip and all(summaries[k].get(r, {}).get("rows") for k in keys)]
    recs.sort(key=lambda r: (r != BASELINE, max(summaries[k][r]["gap_pct"] for k in keys)))
    grid = ", ".join(f"x{m:g}" for m in MULTS)
    head = " | ".join(f"{RUNS[k].label}, at your lr | at its best lr" for k in keys)
    lines = [f"| optimizer | {head} |", "| --- |" + " --- | --- |" * len(keys)]
    for rec in recs:
        cells = " | ".join(" | ".join(_readme_cell(rec, summaries[k][rec])) for k in keys)
        lines.append(f"| {README_NAMES.get(rec, f'`{rec}`')} | {cells} |")
    said = []
    for k in keys:
        lossy = [r for r in recs if r != BASELINE and summaries[k][r]["gap_pct"] > LOSSY_PCT]
        fixed = [r for r in lossy if summaries[k][r]["best_gap_pct"] <= LOSSY_PCT]
        if not lossy:
            said.append(f"in {RUNS[k].label} none")
            continue
        names = ", ".join(f"`{r}`" for r in lossy)
        fix = (f"no multiplier of the grid brings any of them within {LOSSY_PCT:g}%" if not fixed else
               "a multiplier of the grid brings " + ", ".join(f"`{r}`" for r in fixed) + f" within {LOSSY_PCT:g}%")
        said.append(f"in {RUNS[k].label} {names} ({fix})")
    x1 = ", ".join(README_NAMES.get(r, f"`{r}`") for r in recs
                   if all(len(summaries[k][r]["mults"]) == 1 for k in keys))
    return ("\n".join(lines) + f"\n\nLossy at your learning rate (more than {LOSSY_PCT:g}% behind AdamW at x1, in "
            "bold): " + "; ".join(said) + ". \"At its best lr\": the multiplier of your learning rate with the lowest "
            f"eval loss among those run ({grid}), as a gap against AdamW at x1"
            + (f"; {x1} ran at x1 only (recipes that are not optimizers)" if x1 else "") + ".")


def sources(summary: dict, paths: list[str]) -> str:
    """Which file each row came from, with that file's AdamW at x1 (what the row's gap is taken against)."""
    lines = []
    for f in paths:
        kept = [r for s in summary.values() for r in s["rows"].values() if r["file"] == f]
        if not kept:
            continue
        base, mults = kept[0]["baseline"], sorted({float(r["lr_mult"]) for r in kept})
        lines.append(f"- `{Path(f).name}`: AdamW at x1 {base:.4f}; {len(kept)} rows kept "
                     f"({', '.join(f'x{m:g}' for m in mults)})")
    spread = x1_repeats(paths)
    if spread:
        rec, lo, hi, n = max(spread, key=lambda t: t[2] - t[1])
        lines.append(f"- x1 runs in every file (its own baseline): of the {len(spread)} recipes whose x1 ran in more "
                     f"than one file, the gap moved by up to {hi - lo:.2f} points ({rec}: {lo:+.2f}% to {hi:+.2f}% "
                     f"in {n} files); the tables keep the first x1 that finished")
    return "\n".join(lines)


def x1_repeats(paths: list[str]) -> list[tuple[str, float, float, int]]:
    """(recipe, lowest gap, highest gap, files) at x1 for each recipe whose x1 ran in more than one file: how far
    the same job moves when it runs again (the GPU's nondeterministic kernels, other jobs beside it)."""
    gaps: dict = {}
    for f in paths:
        rows = [r for r in json.loads((ROOT / f).read_text())["rows"]
                if r["lr_mult"] == 1 and r["status"] == "ok" and math.isfinite(r.get("eval_loss", math.nan))]
        base = next(r["eval_loss"] for r in rows if r["recipe"] == BASELINE)
        for r in rows:
            if r["recipe"] != BASELINE:
                gaps.setdefault(r["recipe"], []).append(gap_pct(r["eval_loss"], base))
    return [(rec, min(g), max(g), len(g)) for rec, g in gaps.items() if len(g) > 1]


def gpu_tables(summaries: dict) -> str:
    """The two regimes' sections of bench/results/quality_gpu.md."""
    out = []
    for key, s in summaries.items():
        run = RUNS[key]
        out.append(f"### {run.label} (`{key}`)\n\n{table(s, list(run.files))}\n\n"
                   f"Eval loss per multiplier of AdamW's learning rate:\n\n{grid(s)}\n\n"
                   f"Where the rows come from (each gap is against the AdamW at x1 of its own file):\n\n"
                   f"{sources(s, list(run.files))}")
    return "\n\n".join(out)


#: file -> (begin marker, end marker, the text between them)
TARGETS = {
    "bench/results/quality_gpu.md": ("<!-- quality-gpu-tables:begin -->", "<!-- quality-gpu-tables:end -->",
                                     gpu_tables),
    "README.md": ("<!-- quality-table:begin -->", "<!-- quality-table:end -->", readme_table),
}


def between(text: str, begin: str, end: str) -> str | None:
    m = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    return m.group(1) if m else None


def main(argv: list[str]) -> int:
    summaries = {key: merged(list(run.files)) for key, run in RUNS.items()}
    out = {rel: (begin, end, make(summaries), (ROOT / rel).read_text()) for rel, (begin, end, make) in TARGETS.items()}
    if "--write" in argv or "--check" in argv:
        missing = [f"{rel} ({begin} ... {end})" for rel, (begin, end, _, text) in out.items()
                   if between(text, begin, end) is None]
        if missing:
            print(f"no table markers in {', '.join(missing)}", file=sys.stderr)
            return 1
    stale = []
    for rel, (begin, end, body, text) in out.items():
        if "--write" in argv:
            (ROOT / rel).write_text(re.sub(re.escape(begin) + r"\n.*?\n" + re.escape(end),
                                           lambda _, b=begin, e=end, t=body: f"{b}\n{t}\n{e}", text, flags=re.S))
        elif "--check" in argv:
            if between(text, begin, end) != body:
                stale.append(rel)
        else:
            print(f"{rel}:\n\n{body}\n")
    if stale:
        print(f"stale tables in {', '.join(stale)}: run python bench/quality_gpu_tables.py --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
