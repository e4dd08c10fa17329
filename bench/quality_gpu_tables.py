"""The tables of bench/results/quality_gpu.md, from the GPU quality runs' JSON files (``bench/quality.py``).

    python bench/quality_gpu_tables.py      # print both regimes' tables (pasted into bench/results/quality_gpu.md)

A regime may come from several files: the first file's rows are kept, and a later file only fills the jobs
that did not finish in the earlier ones (the fine-tuning x1 jobs re-run alone after a timeout). Every row's
gap is taken against AdamW at x1 *of its own file*, so a re-run job is compared with the AdamW that ran beside
it. The files are the runs of ``hf_lowmem_plugins.lr_evidence.RUNS``; the plugins' ``EVIDENCE`` constants must
equal :func:`merged` (tests/test_lr_awareness.py checks it).
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import BASELINE, LOSSY_PCT, ROOT

from hf_lowmem_plugins.lr_evidence import PLANNED as MULTS  # the grid issue 16 asks for (not all of it was run)
from hf_lowmem_plugins.lr_evidence import RUNS  # the runs the plugins' evidence names


def merged(paths: list[str]) -> dict:
    """recipe -> {"rows": {mult: row with "gap_pct" and "file"}, "gap_pct", "best_mult", "best_gap_pct",
    "mults", "eval_loss_at_1", "peak_gpu_gib", "skipped": {mult: reason}} for one regime."""
    out: dict = {}
    for i, f in enumerate(paths):
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
                if m not in rec["rows"] and i == 0:
                    rec["skipped"][m] = r.get("reason") or f"{r['status']} after {r.get('wall_s', '?')} s"
                continue
            if m in rec["rows"]:
                continue
            rec["skipped"].pop(m, None)
            rec["rows"][m] = dict(r, gap_pct=round(100.0 * (r["eval_loss"] - base) / base, 2) + 0.0, file=f,
                                  baseline=base)
    for rec in out.values():
        rows = rec["rows"]
        if not rows:
            continue
        best = min(rows.values(), key=lambda r: r["eval_loss"])
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


def main() -> int:
    for key, run in RUNS.items():
        summary = merged(list(run.files))
        print(f"### {run.label} (`{key}`)\n\n{table(summary, list(run.files))}\n\n"
              f"Eval loss per multiplier of AdamW's learning rate:\n\n{grid(summary)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
