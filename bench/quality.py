"""Quality of the lossy memory techniques: fine-tune a real pretrained model with each recipe on the same
data in the same order, and compare the eval loss on a held-out slice with plain AdamW's.

    python bench/quality.py                       # the GPU run (defaults below), ~3 min on one H200
    python bench/quality.py --smoke               # tiny end-to-end check on CPU (~2-4 min on 2 cores)

Model and corpus: what ``../shared/assets/fetch-assets.sh assets`` makes (SmolLM2-135M, Llama
architecture, and the CPython standard library as one text file). The training text is the head of the
corpus and the held-out eval slice its tail (different files), tokenized once by the parent process; the
training blocks are shuffled once with a fixed seed and fed in that order to every recipe.

Recipes (``--recipes``, comma-separated): ``adamw`` (the baseline: a plain LowMemTrainer with no plugin,
the Trainer's own AdamW), and any registered plugin by name, selected under its kind
(``bnb-adamw8bit``, ``galore-adamw8bit``, ``int8-weights``, ``stream``, ...). Presets add options
(GaLore: rank 128, update_proj_gap 100, scale 1.0); ``--recipe-args NAME='{"lowmem_options": ...}'``
adds or overrides ``LowMemTrainingArguments`` fields for one recipe. A recipe whose plugin is not
registered, whose packages are missing, or that needs a GPU on a machine without one is skipped with the
reason. Each recipe runs in its own subprocess, so no GPU memory carries over.

Output: one JSON file (per recipe: eval loss before and after, gap vs the baseline in %, ``lossy`` when
more than 2% above it, training tokens/s, peak GPU memory, wall time; plus the command line and the total
wall time) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import one_gpu

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "adamw"
LOSSY_PCT = 2.0
DEFAULT_RECIPES = "adamw,bnb-adamw8bit,galore-adamw8bit,int8-weights,stream"
GALORE_PRESET = {"rank": 128, "update_proj_gap": 100, "scale": 1.0}


def recipe_overrides(name: str, kind: str | None) -> dict:
    """``LowMemTrainingArguments`` fields that select recipe ``name`` (a plugin of ``kind``)."""
    if name == BASELINE:
        return {}
    field = {"optimizer": "lowmem_optimizer", "quantization": "lowmem_quantization",
             "attention": "lowmem_attention"}.get(kind)
    out: dict = {field: name} if field else {"lowmem_offload": [name]}
    if name.startswith("galore-"):
        out["lowmem_options"] = {name: dict(GALORE_PRESET)}
    return out


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
# parent: data, recipe checks, subprocesses, report
# ---------------------------------------------------------------------------------------------------

def tokenize_corpus(model_dir: str, corpus: str, n_train_tokens: int, n_eval_tokens: int, seq: int, seed: int = 0):
    """(train blocks [n, seq] in a fixed shuffled order, eval blocks [m, seq]) from the corpus head / tail."""
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
    perm = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))
    return train_ids[perm].contiguous(), eval_ids


def check_recipe(name: str, cuda: bool) -> tuple[str | None, str | None]:
    """(kind, None) when the recipe can run here, else (kind or None, reason to skip)."""
    if name == BASELINE:
        return None, None
    from hf_lowmem.plugins import get_plugin_host

    host = get_plugin_host()
    if name not in host.registry:
        failed = [f for f in host.failures if f.entry_point.replace("_", "-") in name or name.replace("-", "_") in f.entry_point]
        why = f" (its module failed to load: {failed[0].error})" if failed else ""
        return None, f"plugin {name!r} is not registered yet{why}; registered: {', '.join(host.registry.names())}"
    info = host.registry[name]
    missing = info.missing_requirements()
    if missing:
        return info.kind, f"needs {', '.join(missing)}: pip install 'hf-lowmem[{info.extra}]'"
    if info.needs_cuda and not cuda:
        return info.kind, "needs a CUDA GPU"
    return info.kind, None


def run_recipe(name: str, overrides: dict, cfg: dict, work: Path, timeout: int) -> dict:
    job = {"name": name, "overrides": overrides, **cfg, "result": str(work / f"{name}.result.json"),
           "output_dir": str(work / name)}
    job_path = work / f"{name}.job.json"
    job_path.write_text(json.dumps(job))
    log_path = work / f"{name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(job_path)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(ROOT))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t0
    tail = log_path.read_text(errors="replace").splitlines()[-25:]
    if rc == 0 and Path(job["result"]).exists():
        out = json.loads(Path(job["result"]).read_text())
        out.update(status="ok", wall_s=round(wall, 1))
        return out
    return {"status": "failed", "returncode": rc, "wall_s": round(wall, 1), "log_tail": tail, "log": str(log_path)}


def markdown(results: dict, baseline: str) -> str:
    rows = ["| recipe | status | eval loss before | eval loss after | vs adamw | lossy (> 2%) | train tokens/s | "
            "peak GPU GiB | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for name, r in results.items():
        if r["status"] != "ok":
            why = r.get("reason") or f"rc={r.get('returncode')}, see {r.get('log')}"
            rows.append(f"| {name} | {r['status']}: {why} | | | | | | | {f(r.get('wall_s'), '.0f')} |")
            continue
        gap = "baseline" if name == baseline else (f"{r['gap_pct']:+.2f}%" if r.get("gap_pct") is not None else "")
        lossy = "" if name == baseline or r.get("lossy") is None else ("**LOSSY**" if r["lossy"] else "no")
        rows.append(f"| {name} | ok | {f(r.get('eval_loss_before'), '.4f')} | {r['eval_loss']:.4f} | {gap} | {lossy} | "
                    f"{f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('peak_gpu_gib'), '.2f')} | {r['wall_s']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    one_gpu()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run for a CPU check: 3 steps, seq 128, batch 2")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated (default {DEFAULT_RECIPES})")
    ap.add_argument("--recipe-args", action="append", default=[], metavar="NAME=JSON",
                    help="extra LowMemTrainingArguments fields for one recipe, e.g. "
                         "int8-weights='{\"lowmem_optimizer\": \"bnb-adamw8bit\"}' (repeatable)")
    ap.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"))
    ap.add_argument("--corpus", default=str(ROOT / "assets" / "corpus" / "stdlib-code.txt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of --seq tokens")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--timeout", type=int, default=None,
                    help="seconds per recipe before it is killed (default 300; 1800 with --smoke, CPUs are slow)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/quality.json; "
                                                "out/quality-smoke.json with --smoke)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.seq, a.batch, a.grad_accum, a.warmup, a.eval_blocks = 3, 128, 2, 1, 0, 4
        a.out = a.out or str(ROOT / "out" / "quality-smoke.json")
    a.out = a.out or str(ROOT / "bench" / "results" / "quality.json")
    a.timeout = a.timeout or (1800 if a.smoke else 300)
    t_start = time.time()
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])

    for path, what in ((a.model, "model folder"), (a.corpus, "corpus")):
        if not os.path.exists(path):
            raise SystemExit(f"{what} {path} not found: run ../shared/assets/fetch-assets.sh {ROOT / 'assets'}")
    extra: dict[str, dict] = {}
    for item in a.recipe_args:
        name, _, js = item.partition("=")
        try:
            extra[name] = json.loads(js)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--recipe-args {item!r}: not NAME=JSON ({e})") from e
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    if BASELINE not in recipes:
        recipes.insert(0, BASELINE)

    import torch

    cuda = torch.cuda.is_available()
    tokens_per_step = a.batch * a.grad_accum * a.seq
    t0 = time.time()
    train_blocks, eval_blocks = tokenize_corpus(a.model, a.corpus, a.steps * tokens_per_step, a.eval_blocks * a.seq, a.seq)
    print(f"data: {len(train_blocks)} train blocks, {len(eval_blocks)} eval blocks of {a.seq} tokens "
          f"(tokenized in {time.time() - t0:.1f}s); device: {'cuda' if cuda else 'cpu'}", flush=True)

    cfg = {"model": a.model, "steps": a.steps, "seq": a.seq, "batch": a.batch, "grad_accum": a.grad_accum, "lr": a.lr,
           "warmup": a.warmup, "max_grad_norm": a.max_grad_norm, "cuda": cuda}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hf-lowmem-quality-") as tmp:
        work = Path(tmp)
        torch.save({"train": train_blocks, "eval": eval_blocks}, work / "data.pt")
        cfg["data"] = str(work / "data.pt")
        for name in recipes:
            kind, reason = check_recipe(name, cuda)
            if reason:
                print(f"[{name}] skipped: {reason}", flush=True)
                results[name] = {"status": "skipped", "reason": reason}
                continue
            overrides = _merge(recipe_overrides(name, kind), extra.get(name, {}))
            print(f"[{name}] running: {json.dumps(overrides)}", flush=True)
            results[name] = run_recipe(name, overrides, cfg, work, a.timeout)
            r = results[name]
            if r["status"] == "ok":
                print(f"[{name}] eval loss {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f}, "
                      f"{r['tokens_per_s']:,.0f} tokens/s, {r['wall_s']:.0f}s", flush=True)
            else:
                print(f"[{name}] FAILED (rc={r['returncode']}):\n  " + "\n  ".join(r["log_tail"]), flush=True)
                r["log"] = "(temporary; see the tail above)"

    base = results.get(BASELINE, {})
    for name, r in results.items():
        if r["status"] == "ok" and base.get("status") == "ok":
            r["gap_pct"] = round(100.0 * (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"], 3)
            r["lossy"] = r["gap_pct"] > LOSSY_PCT if name != BASELINE else False
    report = {
        "command": command,
        "wall_time_s": round(time.time() - t_start, 1),
        "baseline": BASELINE,
        "lossy_threshold_pct": LOSSY_PCT,
        "config": {**{k: v for k, v in cfg.items() if k != "data"}, "corpus": a.corpus,
                   "train_tokens_per_recipe": a.steps * tokens_per_step, "eval_tokens": a.eval_blocks * a.seq,
                   "smoke": a.smoke, "galore_preset": GALORE_PRESET, "recipe_args": extra,
                   "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None},
        "recipes": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(results, BASELINE))
    print(f"\n{command}\nwall time {report['wall_time_s']:.0f}s; results: {a.out}")
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------
# worker: one recipe, in its own process
# ---------------------------------------------------------------------------------------------------

def worker(job_path: str) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    job = json.loads(Path(job_path).read_text())
    from transformers import AutoModelForCausalLM

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
        """The same blocks in the same order for every recipe."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    data = torch.load(job["data"])
    cuda = job["cuda"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    args = dict(
        output_dir=job["output_dir"], max_steps=job["steps"], per_device_train_batch_size=job["batch"],
        per_device_eval_batch_size=job["batch"], gradient_accumulation_steps=job["grad_accum"],
        learning_rate=job["lr"], lr_scheduler_type="cosine", warmup_steps=job["warmup"], weight_decay=0.0,
        max_grad_norm=job["max_grad_norm"], bf16=cuda, use_cpu=not cuda, logging_steps=max(1, job["steps"] // 10),
        save_strategy="no", eval_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
        disable_tqdm=True, lowmem_telemetry=False,
    )
    args.update(job["overrides"])
    targs = LowMemTrainingArguments(**args)
    trainer = InOrder(model=model, args=targs, train_dataset=Blocks(data["train"]), eval_dataset=Blocks(data["eval"]))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = trainer.evaluate()["eval_loss"]
    t0 = time.time()
    out = trainer.train()
    train_s = time.time() - t0
    after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = job["steps"] * job["batch"] * job["grad_accum"] * job["seq"]
    result = {
        "eval_loss_before": before, "eval_loss": after, "train_loss": out.training_loss,
        "train_loss_last_logged": losses[-1] if losses else None, "train_s": round(train_s, 2),
        "tokens_per_s": tokens / train_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "overrides": job["overrides"],
    }
    Path(job["result"]).write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        raise SystemExit(worker(sys.argv[2]))
    raise SystemExit(main())
