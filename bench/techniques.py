"""Issue 3 benchmark: each memory-technique plugin, and the combined recipe, against a plain Trainer.

    source bench/gpu_setup.sh && python bench/techniques.py --out bench/results/techniques.json
    python bench/techniques.py --smoke --out /tmp/techniques_smoke.json     # tiny, on the CPU: checks the script
    python bench/techniques.py --list                                       # the runs, in the order they run

Model: Llama-2-7B-shaped layers (hidden 4096, intermediate 11008, 32 heads, vocab 32000), **8 decoder
layers by default** (``--layers``; so that every run fits one H200 — eager attention needs 2x the plain
run's memory, fp32 optimizer states more — and the whole set fits a GPU session), bf16 weights (``bf16=True``), random init, random tokens,
seq 2048, micro-batch 4 (8,192 tokens per step), SDPA attention unless a run says otherwise.

Each run is a subprocess (its own CUDA context and peak-memory counters). Per run: peak GPU memory
allocated / reserved over training (model, gradients, optimizer states, activations), the median step time
after ``--warmup`` steps, tokens/s from it, and ``ratio_vs_plain`` = tokens/s over the plain Trainer's in
the same invocation. One GPU: the parent sets ``CUDA_VISIBLE_DEVICES=0`` unless it is set (with several
GPUs visible the Trainer would use ``torch.nn.DataParallel``). Runs go in priority order under a wall-clock budget (``--budget-s``, default 470 s, so
the whole command, setup included, stays under 9 minutes); a run that does not fit is recorded as skipped. The JSON is
rewritten after every run, so a killed command still leaves its rows.

The check the issue asks for: activation offload costs at most 5% of step time versus checkpointing alone
at seq 2048 (row ``check:activation-offload-overhead``: gradient-checkpointing vs gradient-checkpointing +
activation-offload, and the same on top of the combined recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

from benchlib import one_gpu, random_tokens, step_timer

GiB = 2**30
ROW_MARK = "BENCH_ROW "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMBINED = dict(optim="bnb-adamw8bit", attention="sdpa", offload=["gradient-checkpointing", "chunked-loss"])

# name -> spec. trainer: "plain" (stock transformers.Trainer) or "lowmem" (LowMemTrainer + plugins).
RUNS: dict[str, dict] = {
    "plain": dict(trainer="plain"),
    # the offload-overhead pairs measure more steps (extra_steps), since the check compares medians within 5%
    "gradient-checkpointing": dict(offload=["gradient-checkpointing"], extra_steps=4),
    "gradient-checkpointing+activation-offload": dict(offload=["gradient-checkpointing", "activation-offload"],
                                                      extra_steps=4),
    "combined": dict(COMBINED, extra_steps=4),
    "combined+activation-offload": dict(COMBINED, offload=COMBINED["offload"] + ["activation-offload"], extra_steps=4),
    "chunked-loss": dict(offload=["chunked-loss"]),
    "sdpa": dict(attention="sdpa"),
    "flash-attn": dict(attention="flash-attn"),
    "bnb-adamw8bit": dict(optim="bnb-adamw8bit"),
    "int8-weights+bnb-adamw8bit": dict(quantization="int8-weights", optim="bnb-adamw8bit"),
    "int8-weights": dict(quantization="int8-weights"),
    "gradient-checkpointing-every2": dict(offload=["gradient-checkpointing"],
                                          options={"gradient-checkpointing": {"every_n": 2}}),
    "gradient-checkpointing+activation-offload-disk": dict(
        offload=["gradient-checkpointing", "activation-offload"],
        options={"activation-offload": {"target": "disk"}}),
    "activation-offload": dict(offload=["activation-offload"]),
    "lora-bf16": dict(adapters=True),
    "bnb-nf4+lora": dict(adapters=True, quantization="bnb-nf4"),
    "bnb-int8+lora": dict(adapters=True, quantization="bnb-int8"),
    "plain-eager": dict(trainer="plain", attn="eager"),
    "bnb-paged-adamw8bit": dict(optim="bnb-paged-adamw8bit"),
    "bnb-lion8bit": dict(optim="bnb-lion8bit"),
    "adafactor": dict(optim="adafactor"),
    "galore-adamw8bit-layerwise": dict(optim="galore-adamw8bit-layerwise", offload=["gradient-checkpointing"]),
}


# ---- the child: one run --------------------------------------------------------------------------------------
def build_model(a, spec, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if a.smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=a.layers, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=max(256, a.seq))
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = spec.get("attn", "sdpa")
    cfg.use_cache = False
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if spec.get("adapters"):
        add_lora(model, r=16)
    return model


def add_lora(model, r: int):
    """Freeze the model and put a rank-r adapter beside every decoder Linear (no peft on the GPU machine)."""
    import torch

    class LoRA(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            w = base.weight
            self.A = torch.nn.Parameter(torch.randn(r, base.in_features, device=w.device, dtype=w.dtype) / base.in_features**0.5)
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))

        def forward(self, x):
            return self.base(x) + (x @ self.A.t()) @ self.B.t()

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, LoRA(child))


def child(a):
    import torch
    from transformers import Trainer, TrainingArguments

    spec = RUNS[a.child]
    cuda = torch.cuda.is_available() and not a.smoke
    row = dict(name=a.child, layers=a.layers, seq=a.seq, micro_batch=a.mb, status="error")
    model = build_model(a, spec, cuda)
    vocab = model.config.vocab_size
    row["params"] = sum(p.numel() for p in model.parameters())
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    timer = step_timer(cuda)
    tokens = random_tokens(vocab, a.seq)
    steps = a.steps + (0 if a.smoke else spec.get("extra_steps", 0))
    base = dict(output_dir=os.path.join(a.tmp, a.child), per_device_train_batch_size=a.mb, max_steps=a.warmup + steps,
                learning_rate=1e-5, bf16=cuda, logging_steps=1, save_strategy="no", report_to="none",
                dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda, seed=0,
                optim="adamw_torch_fused" if cuda else "adamw_torch")
    if spec.get("trainer") == "plain":
        args = TrainingArguments(**base)
        trainer = Trainer(model=model, args=args, train_dataset=tokens, callbacks=[timer])
    else:
        from hf_lowmem import LowMemTrainer, LowMemTrainingArguments

        opts = dict(spec.get("options") or {})
        if a.smoke and "activation-offload" in spec.get("offload", []):
            opts["activation-offload"] = {"min_bytes": 0, "keep_bytes": 0, **opts.get("activation-offload", {})}
        args = LowMemTrainingArguments(**base, lowmem_optimizer=spec.get("optim"),
                                       lowmem_quantization=spec.get("quantization"),
                                       lowmem_attention=spec.get("attention"), lowmem_offload=spec.get("offload"),
                                       lowmem_options=opts or None, lowmem_telemetry=False)
        trainer = LowMemTrainer(model=model, args=args, train_dataset=tokens, callbacks=[timer])
        row["plugins"] = trainer.lowmem_ctx.selection.names()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    row["train_s"] = round(time.perf_counter() - t0, 2)
    measured = timer.times[a.warmup:] or timer.times
    step = statistics.median(measured)
    row.update(
        status="ok",
        step_s_median=round(step, 4),
        step_s=[round(t, 4) for t in timer.times],
        tokens_per_s=round(a.mb * a.seq / step, 1),
        final_loss=round(float(out.training_loss), 4),
        peak_host_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        peak_gpu_allocated_gib=round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
    )
    ctx = getattr(trainer, "lowmem_ctx", None)
    if ctx is not None:
        off = ctx.state.get("activation-offload")
        if off:
            row["offload_stats"] = off["offloader"].stats
        for key in ("sdpa", "gradient-checkpointing"):
            if key in ctx.state:
                row[key] = {k: v for k, v in ctx.state[key].items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    print(ROW_MARK + json.dumps(row), flush=True)


# ---- the parent: all runs under a budget ------------------------------------------------------------------------
def child_command(a, name):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--layers", str(a.layers), "--seq", str(a.seq),
           "--mb", str(a.mb), "--steps", str(a.steps), "--warmup", str(a.warmup), "--tmp", a.tmp]
    if a.smoke:
        cmd.append("--smoke")
    return cmd


def run_one(a, name, timeout):
    cmd = child_command(a, name)
    shown = " ".join(shlex.quote(c) for c in ["python", "bench/techniques.py"] + cmd[2:])
    base = dict(name=name, layers=a.layers, seq=a.seq, micro_batch=a.mb, peak_gpu_allocated_gib=None,
                peak_gpu_reserved_gib=None, tokens_per_s=None, command=shown)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-1500:]
        return dict(base, status="timeout", error=f"ran past {timeout:.0f} s", stderr_tail=str(tail),
                    wall_s=round(time.perf_counter() - t0, 1))
    rows = [line[len(ROW_MARK):] for line in res.stdout.splitlines() if line.startswith(ROW_MARK)]
    if res.returncode != 0 or not rows:
        err = res.stderr.strip().splitlines()
        last = next((l for l in reversed(err) if l and not l.startswith(" ")), "no output")
        return dict(base, status="error", error=last[-500:], stderr_tail=res.stderr[-3000:],
                    wall_s=round(time.perf_counter() - t0, 1))
    row = dict(base, **json.loads(rows[-1]))
    row["command"] = shown
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def summarize(rows):
    by = {r["name"]: r for r in rows if r.get("status") == "ok"}
    plain = by.get("plain")
    for r in rows:
        if r.get("status") == "ok" and plain:
            r["ratio_vs_plain"] = round(r["tokens_per_s"] / plain["tokens_per_s"], 3)
            if r.get("peak_gpu_allocated_gib") is not None and plain.get("peak_gpu_allocated_gib"):
                r["memory_vs_plain"] = round(r["peak_gpu_allocated_gib"] / plain["peak_gpu_allocated_gib"], 3)
        else:
            r.setdefault("ratio_vs_plain", None)
    checks = []
    for ref, off in (("gradient-checkpointing", "gradient-checkpointing+activation-offload"),
                     ("combined", "combined+activation-offload")):
        if ref in by and off in by:
            pct = (by[off]["step_s_median"] / by[ref]["step_s_median"] - 1) * 100
            checks.append(dict(
                name=f"check:activation-offload-overhead[{ref}]", layers=by[ref]["layers"], seq=by[ref]["seq"],
                micro_batch=by[ref]["micro_batch"], status="ok", reference=ref, with_offload=off,
                step_s_reference=by[ref]["step_s_median"], step_s_offload=by[off]["step_s_median"],
                overhead_pct=round(pct, 2), limit_pct=5.0, passed=pct <= 5.0,
                gpu_allocated_saved_gib=(round(by[ref]["peak_gpu_allocated_gib"] - by[off]["peak_gpu_allocated_gib"], 2)
                                         if by[ref].get("peak_gpu_allocated_gib") is not None else None),
                peak_gpu_allocated_gib=by[off].get("peak_gpu_allocated_gib"),
                peak_gpu_reserved_gib=by[off].get("peak_gpu_reserved_gib"),
                tokens_per_s=by[off]["tokens_per_s"], ratio_vs_plain=by[off].get("ratio_vs_plain"),
                command=by[off]["command"]))
    return checks


def markdown(paths: list[str]) -> str:
    """One table from one or more result files (each with its own plain-Trainer row, measured in its run)."""
    out = []
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        m = d["meta"]
        out += [f"Command: `{m['command']}` ({m['env'].get('device')}, torch {m['env'].get('torch')}, "
                f"transformers {m['env'].get('transformers')}; {m['wall_s']:.0f} s). {m['model']}; seq {m['seq']}, "
                f"micro-batch {m['micro_batch']}, {m['warmup_steps']} warm-up + {m['measured_steps']}+ measured steps.", "",
                "| run | status | peak GPU allocated GiB | vs plain | tokens/s | vs plain | step s (median) |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in d["rows"]:
            if r["name"].startswith("check:"):
                continue
            if r.get("status") != "ok":
                why = (r.get("error") or "").splitlines()[-1:] or [""]
                out.append(f"| {r['name']} | {r.get('status')}: {why[0][:160]} | | | | | |")
                continue
            out.append(f"| {r['name']} | ok | {r['peak_gpu_allocated_gib']:.2f} | {r.get('memory_vs_plain') or 0:.3f} | "
                       f"{r['tokens_per_s']:,.0f} | {r.get('ratio_vs_plain') or 0:.3f} | {r['step_s_median']:.4f} |")
        for c in (r for r in d["rows"] if r["name"].startswith("check:")):
            out.append(f"\n{c['name']}: {c['step_s_offload']:.4f} s vs {c['step_s_reference']:.4f} s per step, "
                       f"**{c['overhead_pct']:+.2f}%** (limit {c['limit_pct']:.0f}%): {'PASS' if c['passed'] else 'FAIL'}; "
                       f"peak GPU allocated {c['gpu_allocated_saved_gib']:+.2f} GiB saved.")
        out.append("")
    return "\n".join(out)


def environment():
    info = {}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception as e:  # noqa: BLE001
        info["error"] = str(e)
    return info


def main(argv=None):
    one_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/techniques.json")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument("--mb", type=int, default=None, help="micro-batch (default 4; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="measured steps after warm-up (default 6; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; smoke 1)")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget for all runs")
    p.add_argument("--run-timeout-s", type=float, default=150.0, help="limit for one run")
    p.add_argument("--only", default=None, help="comma-separated run names (plain is always added)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", nargs="+", metavar="JSON", help="print a Markdown table of result files and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/hf-lowmem-bench", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    d = dict(layers=2, seq=64, mb=2, steps=2, warmup=1) if a.smoke else dict(layers=8, seq=2048, mb=4, steps=6, warmup=2)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.markdown:
        print(markdown(a.markdown))
        return 0
    if a.list:
        for name, spec in RUNS.items():
            print(f"{name:48s} {json.dumps(spec)}")
        return 0
    if a.child:
        child(a)
        return 0

    names = list(RUNS)
    if a.only:
        wanted = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in RUNS]
        if unknown:
            p.error(f"unknown run(s) {unknown}; --list shows them")
        names = ["plain"] + [n for n in wanted if n != "plain"]
    start = time.perf_counter()
    meta = dict(
        command=" ".join(["python", "bench/techniques.py"] + [shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])]),
        model=("tiny Llama (smoke test: says nothing of speed)" if a.smoke else
               f"Llama-2-7B-shaped layers (hidden 4096, intermediate 11008, 32 heads, vocab 32000), {a.layers} of 32 "
               "decoder layers (so that every run fits one H200: eager attention takes 2x the plain run's memory, fp32 "
               "optimizer states more; and to fit the GPU time), bf16, random init"),
        data="random tokens", seq=a.seq, micro_batch=a.mb, warmup_steps=a.warmup, measured_steps=a.steps,
        env=environment(),
    )
    rows: list[dict] = []

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        checks = summarize(rows)
        with open(a.out, "w") as f:
            json.dump(dict(meta=dict(meta, wall_s=round(time.perf_counter() - start, 1)), rows=rows + checks), f, indent=1)
        return checks

    typical = None
    for name in names:
        left = a.budget_s - (time.perf_counter() - start)
        need = typical or 20.0
        if left < min(need, a.run_timeout_s) or left < 10:
            rows.append(dict(name=name, layers=a.layers, seq=a.seq, micro_batch=a.mb, status="skipped",
                             error=f"wall-clock budget ({a.budget_s:.0f} s) spent", peak_gpu_allocated_gib=None,
                             peak_gpu_reserved_gib=None, tokens_per_s=None, ratio_vs_plain=None,
                             command=" ".join(["python", "bench/techniques.py"] + child_command(a, name)[2:])))
            continue
        row = run_one(a, name, min(a.run_timeout_s, left))
        if row.get("status") == "ok" and name == "plain":
            typical = row["wall_s"]
        rows.append(row)
        write()
        short = {k: row.get(k) for k in ("status", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib", "tokens_per_s",
                                          "step_s_median", "wall_s", "error")}
        print(f"{name:48s} {json.dumps(short)}", flush=True)
    checks = write()
    for c in checks:
        print(f"{c['name']}: {c['overhead_pct']:+.2f}% step time (limit 5%): {'PASS' if c['passed'] else 'FAIL'}")
    print(f"wrote {a.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
