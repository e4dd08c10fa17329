"""Quality of the optimizer plugins (and the other lossy techniques) against AdamW, in two regimes, at the
learning rate the user already has and at the best one from a small grid.

    python bench/quality.py                          # the GPU grid (defaults below), ~7 min on one H200, 8 jobs
    python bench/quality.py --smoke                  # tiny end-to-end check on the CPU
    python bench/quality.py --preset cpu --regimes pretrain   # the small CPU measurement in bench/README-quality.md
    python bench/quality.py --markdown bench/results/quality.json   # the tables again, from a JSON

Regimes (``--regimes``):
- ``finetune``: the pretrained SmolLM2-135M (``../shared/assets/fetch-assets.sh assets``) fine-tuned on the
  CPython standard library (the corpus asset); training text from the corpus head, eval from its tail.
  AdamW's learning rate (the "user's") 5e-5.
- ``pretrain``: a ~25M-parameter Llama trained from scratch on the same corpus read as bytes (vocab 256),
  seq 512. AdamW's learning rate 1e-3.
Same data in the same order (shuffled once, seed 0; ``--set REGIME.seed=N`` for another), same seed, same
steps, cosine schedule with 10% warm-up, weight decay 0, ``max_grad_norm`` 1.0, bf16 autocast of fp32 weights on the GPU, fp32 on the CPU.

Recipes (``--recipes``): ``adamw`` (the baseline: a plain LowMemTrainer with no plugin, the Trainer's
AdamW), any registered plugin by name (selected under its kind, with its defaults), and the presets in
``PRESETS`` (``stream-8bit``: the stream engine with 8-bit AdamW states). Each recipe runs at every
multiplier of ``--lr-mults`` times the regime's AdamW learning rate; ``1`` is "your learning rate". A
recipe that cannot run here (plugin not registered, package missing, needs CUDA) is skipped with the reason.
On models narrower than twice a low-rank plugin's default rank, its rank is capped at a quarter of the
hidden size (else few or no matrices are projected); the JSON records every option used.

Jobs (recipe x multiplier x regime) run as separate processes, ``--jobs`` at a time (on one GPU, many small
jobs share it), in priority order: every recipe at x1 first, then the grid. ``--budget-s`` skips a job
whose expected duration (the mean of finished jobs of its regime) would end past the budget.

Output: a JSON file (one row per job: eval loss, peak GPU memory allocated, tokens/s, wall time, status;
per regime and recipe the summary below; the command and configuration) and, per regime, a markdown
table: optimizer, eval loss at your lr, gap vs AdamW at your lr, best lr multiplier, eval loss at best,
peak GPU memory (none on the CPU); a recipe more than 2% worse than AdamW at your lr is marked
``lossy-at-your-lr, use lr xK`` with K its best multiplier.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import one_gpu

from hf_lowmem_plugins.lr_evidence import LOSSY_PCT  # issue 16's "lossy at your lr" rule, as the plugins apply it

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "adamw"
DEFAULT_RECIPES = ("adamw,bnb-adamw8bit,bnb-lion8bit,adafactor,galore-adamw8bit,galore-adamw,apollo,apollo-mini,"
                   "adam-mini,int8-weights,stream-8bit")
DEFAULT_MULTS = "1,2,4,0.5,8"  # priority order after x1
#: recipes that are more than one plugin: label -> LowMemTrainingArguments fields
PRESETS = {"stream-8bit": {"lowmem_offload": ["stream"], "lowmem_optimizer": "bnb-adamw8bit"}}
LOW_RANK = ("galore-", "apollo")  # plugins with a rank option (capped on small models)
DEFAULT_RANK = {"galore-": 128, "apollo-mini": 1, "apollo": 256}

#: per regime and preset: model, data and schedule
REGIMES = {
    "finetune": {
        "gpu": dict(steps=200, seq=512, batch=8, lr=5e-5, eval_blocks=64, layers=None, seed=0),
        "cpu": dict(steps=40, seq=128, batch=4, lr=5e-5, eval_blocks=16, layers=2, seed=0),
        "smoke": dict(steps=2, seq=32, batch=2, lr=5e-5, eval_blocks=2, layers=1, seed=0),
    },
    "pretrain": {
        # ~25M parameters: 8 layers x (4 x 512^2 + 3 x 512 x 1376) + 2 x 256 x 512
        "gpu": dict(steps=300, seq=512, batch=16, lr=1e-3, eval_blocks=64, hidden=512, inter=1376, layers=8, heads=8, seed=0),
        "cpu": dict(steps=200, seq=128, batch=8, lr=1e-3, eval_blocks=32, hidden=128, inter=344, layers=4, heads=4, seed=0),
        "smoke": dict(steps=2, seq=32, batch=2, lr=1e-3, eval_blocks=2, hidden=32, inter=64, layers=1, heads=2, seed=0),
    },
}


# ---------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------

def check_recipe(name: str, cuda: bool) -> tuple[dict | None, str | None]:
    """(the LowMemTrainingArguments fields that select ``name``, None) or (None, why it cannot run here)."""
    if name == BASELINE:
        return {}, None
    from hf_lowmem.plugins import get_plugin_host

    host = get_plugin_host()
    fields = PRESETS.get(name)
    if fields is None:
        if name not in host.registry:
            return None, f"plugin {name!r} is not registered; registered: {', '.join(host.registry.names())}"
        kind = host.registry[name].kind
        field = {"optimizer": "lowmem_optimizer", "quantization": "lowmem_quantization",
                 "attention": "lowmem_attention"}.get(kind)
        fields = {field: name} if field else {"lowmem_offload": [name]}
    selecting = ("lowmem_optimizer", "lowmem_quantization", "lowmem_attention", "lowmem_offload")
    names = [v for k, vs in fields.items() if k in selecting for v in (vs if isinstance(vs, list) else [vs])]
    for n in names:
        if n not in host.registry:
            return None, f"plugin {n!r} is not registered"
        info = host.registry[n]
        missing = info.missing_requirements()
        if missing:
            return None, f"{n} needs {', '.join(missing)}: pip install 'hf-lowmem[{info.extra}]'"
        if info.needs_cuda and not cuda:
            return None, f"{n} needs a CUDA GPU"
    return dict(fields), None


def rank_cap(fields: dict, hidden: int) -> dict:
    """On a model whose hidden size is under twice a low-rank plugin's default rank (few or none of its
    matrices would be projected), cap the rank at hidden / 4, the APOLLO paper's rule."""
    opt = fields.get("lowmem_optimizer")
    if not opt or not opt.startswith(LOW_RANK):
        return fields
    default = next(v for k, v in DEFAULT_RANK.items() if opt.startswith(k))
    if default <= hidden // 2:
        return fields
    given = (fields.get("lowmem_options") or {}).get(opt, {})
    if "rank" in given:
        return fields
    return _merge(fields, {"lowmem_options": {opt: {"rank": max(1, hidden // 4)}}})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if k == "lowmem_options" and isinstance(v, dict):
            opts = {p: dict(o) for p, o in (out.get(k) or {}).items()}
            for p, o in v.items():
                opts.setdefault(p, {}).update(o)
            out[k] = opts
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def tokenize_corpus(model_dir: str, corpus: str, n_train_tokens: int, n_eval_tokens: int, seq: int, seed: int = 0):
    """(train blocks [n, seq] in a fixed shuffled order, eval blocks [m, seq]) from the corpus head / tail,
    with the model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = Path(corpus).read_text(encoding="utf-8", errors="ignore")

    def encode(s: str) -> list[int]:
        # ~64 KB pieces cut at line ends, encoded as a batch (the fast tokenizer runs them in parallel)
        pieces, i = [], 0
        while i < len(s):
            j = s.find("\n", min(i + 65536, len(s)))
            j = len(s) if j < 0 else j + 1
            pieces.append(s[i:j])
            i = j
        ids: list[int] = []
        for row in tok(pieces, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        return ids

    def take(n_tokens: int, from_end: bool) -> list[int]:
        chars = n_tokens * 4
        while True:
            piece = text[-chars:] if from_end else text[:chars]
            ids = encode(piece)
            if len(ids) >= n_tokens or chars >= len(text) // 2:
                break
            chars = int(chars * 1.5)
        if len(ids) < n_tokens:
            raise SystemExit(f"the corpus has too few tokens: need {n_tokens} from each half, got {len(ids)}")
        return ids[-n_tokens:] if from_end else ids[:n_tokens]

    eval_ids = torch.tensor(take(n_eval_tokens, from_end=True)).view(-1, seq)
    train_ids = torch.tensor(take(n_train_tokens, from_end=False)).view(-1, seq)
    return _shuffled(train_ids, seed), eval_ids


def byte_blocks(corpus: str, n_train: int, n_eval: int, seq: int, seed: int = 0):
    """The corpus as bytes (vocab 256): training blocks from its head, eval blocks from its tail."""
    import torch

    data = Path(corpus).read_bytes()
    if len(data) < n_train + n_eval:
        raise SystemExit(f"the corpus has {len(data)} bytes; this run needs {n_train + n_eval}")
    train = torch.frombuffer(bytearray(data[:n_train]), dtype=torch.uint8).long().view(-1, seq)
    ev = torch.frombuffer(bytearray(data[-n_eval:]), dtype=torch.uint8).long().view(-1, seq)
    return _shuffled(train, seed), ev


def _shuffled(blocks, seed: int):
    import torch

    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))].contiguous()


# ---------------------------------------------------------------------------------------------------
# scheduling
# ---------------------------------------------------------------------------------------------------

def plan_jobs(regimes: list[str], recipes: list[str], mults: list[float], x1_only=()) -> list[tuple[str, str, float]]:
    """(regime, recipe, multiplier) in priority order: every recipe at the first multiplier (x1), then the
    rest of the grid multiplier by multiplier; recipes in ``x1_only`` run at the first multiplier only."""
    return [(reg, rec, m) for i, m in enumerate(mults) for reg in regimes for rec in recipes
            if i == 0 or rec not in x1_only]


def grid_applies(fields: dict) -> bool:
    """The learning-rate grid is for optimizers: a recipe that selects anything but an optimizer (a
    quantization, an offload engine) runs at x1 only, its optimizer being one that has its own row."""
    return set(fields) <= {"lowmem_optimizer", "lowmem_options"}


def run_jobs(jobs: list[dict], n_parallel: int, budget_s: float | None, timeout: int, log, on_row=None) -> list[dict]:
    """Run job dicts (each has ``path``, ``regime``) as worker processes, ``n_parallel`` at a time; a job is
    skipped when the mean duration of its regime's finished jobs would take it past ``budget_s``.
    ``on_row(rows so far)`` is called after each job ends."""
    t0 = time.time()
    pending = list(jobs)
    running: list[tuple[dict, subprocess.Popen, float, object]] = []
    done_s: dict[str, list[float]] = {}
    results = []
    while pending or running:
        while pending and len(running) < n_parallel:
            job = pending.pop(0)
            times = done_s.get(job["regime"])
            expect = sum(times) / len(times) if times else None
            if budget_s is not None and expect is not None and time.time() - t0 + expect > budget_s:
                job["row"].update(status="skipped", reason=f"budget: expected {expect:.0f}s, "
                                                           f"{budget_s - (time.time() - t0):.0f}s left")
                results.append(job["row"])
                log(f"[{job['label']}] skipped (budget)")
                if on_row:
                    on_row(results)
                continue
            logf = open(job["log"], "w")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", job["path"]],
                                    stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT))
            running.append((job, proc, time.time(), logf))
        time.sleep(0.5)
        still = []
        for job, proc, started, logf in running:
            rc = proc.poll()
            if rc is None and time.time() - started > timeout:
                proc.kill()
                rc = "timeout"
                proc.wait()
            if rc is None:
                still.append((job, proc, started, logf))
                continue
            logf.close()
            wall = time.time() - started
            row = job["row"]
            res = Path(job["result"])
            if rc == 0 and res.exists():
                row.update(json.loads(res.read_text()), status="ok", wall_s=round(wall, 1))
                done_s.setdefault(job["regime"], []).append(wall)
                log(f"[{job['label']}] eval loss {row['eval_loss']:.4f} ({wall:.0f}s)")
            else:
                tail = Path(job["log"]).read_text(errors="replace").splitlines()[-15:]
                row.update(status="failed", returncode=rc, wall_s=round(wall, 1), log_tail=tail)
                log(f"[{job['label']}] FAILED (rc={rc}):\n  " + "\n  ".join(tail))
            results.append(row)
            if on_row:
                on_row(results)
        running = still
    return results


# ---------------------------------------------------------------------------------------------------
# summary and tables
# ---------------------------------------------------------------------------------------------------

def gap_pct(eval_loss: float, base: float) -> float:
    """An eval loss's gap to AdamW's (``base``) in percent of AdamW's, to two decimals."""
    return round(100.0 * (eval_loss - base) / base, 2)


def summarize(rows: list[dict], regimes: list[str], recipes: list[str]) -> dict:
    """Per regime and recipe: eval loss at x1, gap vs AdamW at x1 (%), best multiplier and its eval loss,
    peak GPU memory at x1, and the lossy-at-your-lr flag."""
    out: dict = {}
    for reg in regimes:
        ok = [r for r in rows if r["regime"] == reg and r["status"] == "ok" and math.isfinite(r["eval_loss"])]
        base = next((r["eval_loss"] for r in ok if r["recipe"] == BASELINE and r["lr_mult"] == 1), None)
        table = {}
        for rec in recipes:
            mine = [r for r in ok if r["recipe"] == rec]
            other = [r for r in rows if r["regime"] == reg and r["recipe"] == rec and r["status"] != "ok"]
            if not mine:
                why = other[0].get("reason") or f"failed (rc={other[0].get('returncode')})" if other else "not run"
                table[rec] = {"status": why}
                continue
            at1 = next((r for r in mine if r["lr_mult"] == 1), None)
            best = min(mine, key=lambda r: r["eval_loss"])
            s = {"status": "ok", "eval_loss_at_1": at1["eval_loss"] if at1 else None,
                 "best_mult": best["lr_mult"], "eval_loss_at_best": best["eval_loss"],
                 "mults_run": sorted(r["lr_mult"] for r in mine),
                 "peak_gpu_gib": (at1 or best).get("peak_gpu_gib"), "options": (at1 or best).get("overrides")}
            if base is not None and at1 is not None:
                s["gap_pct"] = gap_pct(at1["eval_loss"], base)
                s["best_gap_pct"] = gap_pct(best["eval_loss"], base)
                s["lossy_at_your_lr"] = rec != BASELINE and s["gap_pct"] > LOSSY_PCT
            table[rec] = s
        out[reg] = table
    return out


def markdown(summary: dict, configs: dict) -> str:
    parts = []
    for reg, table in summary.items():
        cfg = configs.get(reg, {})
        parts.append(f"**{reg}** (AdamW lr {cfg.get('lr')}, {cfg.get('steps')} steps, seq {cfg.get('seq')}, "
                     f"batch {cfg.get('batch')})\n")
        parts.append("| optimizer | eval loss at your lr | gap vs AdamW | best lr multiplier | eval loss at best | "
                     "peak GPU GiB | note |")
        parts.append("| --- | --- | --- | --- | --- | --- | --- |")
        for rec, s in table.items():
            if s["status"] != "ok":
                parts.append(f"| {rec} | | | | | | {s['status']} |")
                continue
            at1 = "" if s["eval_loss_at_1"] is None else f"{s['eval_loss_at_1']:.4f}"
            gap = "baseline" if rec == BASELINE else (f"{s['gap_pct']:+.2f}%" if "gap_pct" in s else "")
            mem = "none (CPU)" if s.get("peak_gpu_gib") is None else f"{s['peak_gpu_gib']:.2f}"
            note = ""
            if s.get("lossy_at_your_lr"):
                fixed = s.get("best_gap_pct", 99.0) <= LOSSY_PCT
                note = (f"**lossy-at-your-lr, use lr x{s['best_mult']:g}**" if fixed and s["best_mult"] != 1 else
                        f"**lossy-at-your-lr, and at every lr run (best x{s['best_mult']:g})**")
            if len(s["mults_run"]) > 1 and "best_gap_pct" in s:
                note = (note + "; " if note else "") + f"at best {s['best_gap_pct']:+.2f}% vs AdamW at x1"
            parts.append(f"| {rec} | {at1} | {gap} | x{s['best_mult']:g} | {s['eval_loss_at_best']:.4f} | {mem} | {note} |")
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------

def _parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, _, val = item.partition("=")
        reg, _, field = key.partition(".")
        if reg not in REGIMES or not field or not val:
            raise SystemExit(f"--set {item!r}: expected REGIME.FIELD=VALUE with REGIME in {', '.join(REGIMES)}")
        out.setdefault(reg, {})[field] = json.loads(val)
    return out


def main(argv=None) -> int:
    one_gpu()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 recipes, x1 and x2: an end-to-end CPU check")
    ap.add_argument("--preset", choices=("gpu", "cpu", "smoke"), default=None,
                    help="sizes (default gpu; cpu: a 2-layer SmolLM2 and a ~0.9M-parameter Llama, for a 2-core machine)")
    ap.add_argument("--regimes", default="finetune,pretrain")
    ap.add_argument("--recipes", default=None, help=f"comma-separated (default {DEFAULT_RECIPES})")
    ap.add_argument("--lr-mults", default=None, help=f"multipliers of AdamW's lr, x1 first (default {DEFAULT_MULTS})")
    ap.add_argument("--recipe-args", action="append", default=[], metavar="NAME=JSON",
                    help="extra LowMemTrainingArguments fields for one recipe (repeatable)")
    ap.add_argument("--define", action="append", default=[], metavar="LABEL=JSON",
                    help="a recipe of several fields, e.g. apollo-scale1='{\"lowmem_optimizer\": \"apollo\", "
                         "\"lowmem_options\": {\"apollo\": {\"scale\": 1}}}' (repeatable; then list LABEL in --recipes)")
    ap.add_argument("--set", action="append", default=[], metavar="REGIME.FIELD=VALUE",
                    help="override a regime's size, e.g. pretrain.steps=500 (repeatable)")
    ap.add_argument("--jobs", type=int, default=None, help="jobs at a time (default 8 on a GPU, 1 on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per job (default: CPU cores / jobs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip jobs expected to end past this many seconds (default 420 with the gpu preset, so that "
                         "the run ends inside a 10-minute call; 0: no budget)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per job (default 600; 3600 on the CPU)")
    ap.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"))
    ap.add_argument("--corpus", default=str(ROOT / "assets" / "corpus" / "stdlib-code.txt"))
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/quality.json; "
                                                "out/quality-<preset>.json for other presets)")
    ap.add_argument("--markdown", metavar="JSON", default=None, help="print the tables of a finished run and exit")
    a = ap.parse_args(argv)
    if a.markdown:
        rep = json.loads(Path(a.markdown).read_text())
        print(markdown(rep["summary"], rep["config"]["regimes"]))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    preset = a.preset or ("smoke" if a.smoke else "gpu")
    if a.smoke:
        a.recipes = a.recipes or "adamw,apollo-mini"
        a.lr_mults = a.lr_mults or "1,2"
    recipes = [r.strip() for r in (a.recipes or DEFAULT_RECIPES).split(",") if r.strip()]
    if BASELINE not in recipes:
        recipes.insert(0, BASELINE)
    mults = [float(x) for x in (a.lr_mults or DEFAULT_MULTS).split(",")]
    if mults[0] != 1.0:
        mults = [1.0] + [m for m in mults if m != 1.0]
    regimes = [r.strip() for r in a.regimes.split(",") if r.strip()]
    for r in regimes:
        if r not in REGIMES:
            raise SystemExit(f"unknown regime {r!r}; regimes: {', '.join(REGIMES)}")
    overrides = _parse_overrides(a.set)
    configs = {r: {**REGIMES[r][preset], **overrides.get(r, {})} for r in regimes}
    n_jobs = a.jobs or (8 if cuda else 1)
    if a.budget_s is None and preset == "gpu":
        a.budget_s = 420.0
    a.budget_s = a.budget_s or None
    timeout = a.timeout or (600 if cuda else 3600)
    out = a.out or str(ROOT / ("bench/results/quality.json" if preset == "gpu" else f"out/quality-{preset}.json"))
    for path, what in ((a.corpus, "corpus"), *(((a.model, "model folder"),) if "finetune" in regimes else ())):
        if not os.path.exists(path):
            raise SystemExit(f"{what} {path} not found: run ../shared/assets/fetch-assets.sh {ROOT / 'assets'}")
    extra: dict[str, dict] = {}
    for item in a.recipe_args:
        name, _, js = item.partition("=")
        try:
            extra[name] = json.loads(js)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--recipe-args {item!r}: not NAME=JSON ({e})") from e
    for item in a.define:
        label, _, js = item.partition("=")
        try:
            PRESETS[label] = json.loads(js)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--define {item!r}: not LABEL=JSON ({e})") from e
    t_start = time.time()
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])

    fields, skipped = {}, {}
    for rec in recipes:
        f, why = check_recipe(rec, cuda)
        if why:
            skipped[rec] = why
            print(f"[{rec}] skipped: {why}", flush=True)
        else:
            fields[rec] = _merge(f, extra.get(rec, {}))
    threads = a.threads or max(1, (os.cpu_count() or 1) // n_jobs)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hf-lowmem-quality-") as tmp:
        work = Path(tmp)
        jobs = []
        for reg in regimes:
            cfg = configs[reg]
            t0 = time.time()
            n_train, n_eval = cfg["steps"] * cfg["batch"] * cfg["seq"], cfg["eval_blocks"] * cfg["seq"]
            if reg == "finetune":
                train, ev = tokenize_corpus(a.model, a.corpus, n_train, n_eval, cfg["seq"], cfg.get("seed", 0))
            else:
                train, ev = byte_blocks(a.corpus, n_train, n_eval, cfg["seq"], cfg.get("seed", 0))
            torch.save({"train": train, "eval": ev}, work / f"{reg}.data.pt")
            print(f"{reg}: {len(train)} train blocks, {len(ev)} eval blocks of {cfg['seq']} tokens "
                  f"({time.time() - t0:.1f}s); device {'cuda' if cuda else 'cpu'}", flush=True)
            for rec, why in skipped.items():
                rows.append({"regime": reg, "recipe": rec, "lr_mult": 1.0, "status": "skipped", "reason": why})
        hidden = {"pretrain": configs.get("pretrain", {}).get("hidden", 512)}
        if "finetune" in regimes:
            from transformers import AutoConfig

            hidden["finetune"] = AutoConfig.from_pretrained(a.model).hidden_size
        x1_only = [rec for rec, f in fields.items() if not grid_applies(f)]
        for reg, rec, m in plan_jobs(regimes, list(fields), mults, x1_only):
            cfg = configs[reg]
            label = f"{reg}/{rec}/x{m:g}"
            stem = label.replace("/", "_")
            f = rank_cap(fields[rec], hidden[reg])
            row = {"regime": reg, "recipe": rec, "lr_mult": m, "lr": cfg["lr"] * m, "overrides": f}
            job = {"regime": reg, "recipe": rec, "config": cfg, "lr": cfg["lr"] * m, "overrides": f,
                   "model": a.model, "data": str(work / f"{reg}.data.pt"), "cuda": cuda, "threads": threads,
                   "output_dir": str(work / stem), "result": str(work / f"{stem}.result.json")}
            path = work / f"{stem}.job.json"
            path.write_text(json.dumps(job))
            jobs.append({"path": str(path), "regime": reg, "label": label, "row": row, "result": job["result"],
                         "log": str(work / f"{stem}.log")})
        print(f"{len(jobs)} jobs, {n_jobs} at a time, {threads} CPU threads each"
              + (f", budget {a.budget_s:.0f}s" if a.budget_s else ""), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

        def write(done: list[dict], finished: bool) -> dict:
            rep = {
                "command": command, "finished": finished, "wall_time_s": round(time.time() - t_start, 1),
                "baseline": BASELINE, "lossy_threshold_pct": LOSSY_PCT,
                "summary": summarize(rows + done, regimes, recipes),
                "config": {"preset": preset, "regimes": configs, "lr_mults": mults, "jobs": n_jobs,
                           "budget_s": a.budget_s, "model": a.model, "corpus": a.corpus, "recipe_args": extra,
                           "defined": {k: PRESETS[k] for k in recipes if k in PRESETS}, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if cuda else None},
                "rows": rows + done,
            }
            Path(out).write_text(json.dumps(rep, indent=2) + "\n")  # after every job: a killed run keeps its rows
            return rep

        done = run_jobs(jobs, n_jobs, a.budget_s, timeout, lambda s: print(s, flush=True),
                        on_row=lambda d: write(d, False))
    report = write(done, True)
    rows, summary = report["rows"], report["summary"]
    print()
    print(markdown(summary, configs))
    print(f"{command}\nwall time {report['wall_time_s']:.0f}s; results: {out}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


# ---------------------------------------------------------------------------------------------------
# worker: one job, in its own process
# ---------------------------------------------------------------------------------------------------

def build_model(job: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = job["config"]
    torch.manual_seed(cfg.get("seed", 0))
    if job["regime"] == "finetune":
        kw = {"num_hidden_layers": cfg["layers"]} if cfg.get("layers") else {}
        return AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, **kw)
    conf = AutoConfig.for_model("llama", vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                                num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"],
                                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoModelForCausalLM.from_config(conf, dtype=torch.float32)


def worker(job_path: str) -> int:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    from hf_lowmem import LowMemTrainer, LowMemTrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __init__(self, blocks):
            self.blocks = blocks

        def __len__(self):
            return len(self.blocks)

        def __getitem__(self, i):
            x = self.blocks[i]
            return {"input_ids": x, "labels": x.clone()}

    class InOrder(LowMemTrainer):
        """The same blocks in the same order for every job."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    data = torch.load(job["data"])
    cuda, cfg = job["cuda"], job["config"]
    model = build_model(job)
    args = dict(
        output_dir=job["output_dir"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=cfg["batch"], learning_rate=job["lr"], lr_scheduler_type="cosine",
        warmup_steps=max(1, cfg["steps"] // 10), weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
        logging_steps=max(1, cfg["steps"] // 10), save_strategy="no", eval_strategy="no", report_to="none", seed=cfg.get("seed", 0),
        dataloader_num_workers=0, disable_tqdm=True, lowmem_telemetry=False,
    )
    args.update(job["overrides"])
    trainer = InOrder(model=model, args=LowMemTrainingArguments(**args), train_dataset=Blocks(data["train"]),
                      eval_dataset=Blocks(data["eval"]))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = trainer.train()
    train_s = time.time() - t0
    after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = cfg["steps"] * cfg["batch"] * cfg["seq"]
    result = {
        "eval_loss": after, "train_loss": out.training_loss, "train_loss_last_logged": losses[-1] if losses else None,
        "train_s": round(train_s, 2), "tokens_per_s": tokens / train_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    Path(job["result"]).write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        raise SystemExit(worker(sys.argv[2]))
    raise SystemExit(main())
