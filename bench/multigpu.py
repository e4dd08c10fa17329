"""Multi-GPU scaling of LowMemTrainer: throughput from 1 to N GPUs and memory per GPU, for a 1B-7B
Llama-shaped model, under DDP, FSDP2 and DeepSpeed ZeRO, launched with ``accelerate launch`` and the
configs in ``examples/accelerate/``.

Run on 2 H200s (2026-11-29): ``bench/results/multigpu-1b.{json,md}`` (1B: DDP, FSDP2, ZeRO-2, ZeRO-3 on
1 and 2 GPUs) and ``bench/results/multigpu-1b-galore-layerwise.{json,md}`` (GaLore 8-bit layer-wise +
checkpointing under DDP); the commands are in the files. Larger machines and 7B: not run yet.
It is also checked end to end on the CPU with ``--smoke`` (gloo, tiny model).

    # on a machine with N GPUs (the full sweep; ~30-40 min on 8 x H200):
    python bench/multigpu.py --model 7b --modes ddp,fsdp2,zero2,zero3 --gpus 1,2,4,8 \
        --optimizer bnb-adamw8bit --offload gradient-checkpointing --attention sdpa
    # 1B, every mode, 20 timed steps per run:
    python bench/multigpu.py --model 1b --steps 25 --warmup 5
    # CPU check of the whole pipeline (gloo, a tiny model, 1 and 2 processes; ~1-2 min on 2 cores):
    python bench/multigpu.py --smoke

For each mode and each GPU count it runs one ``accelerate launch`` (a fresh process group, so one
out-of-memory or crash is recorded and the sweep goes on). Every rank measures its own step times
(after ``--warmup`` steps, CUDA-synchronised) and its peak memory (``torch.cuda.max_memory_allocated``
and ``max_memory_reserved``, and host RSS); the table reports tokens/s for the whole job, the scaling
efficiency against the 1-GPU run of the same mode, and the largest per-GPU peak. Results go to
``--out`` (default ``bench/results/``) as JSON and Markdown, with the command that made them.

Modes: ``single`` (single_gpu.yaml; 1 GPU), ``ddp`` (ddp.yaml; 1 GPU runs use single_gpu.yaml, as
accelerate needs 2+ processes for MULTI_GPU), ``fsdp2``, ``zero2``, ``zero3``, ``zero3-offload``. Plugins that
do not declare a mode are refused before training starts; that refusal is recorded as the run's error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import random_tokens, step_timer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
MODE_CONFIG = {
    "single": "single_gpu.yaml", "ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml", "zero3-offload": "deepspeed_zero3_offload.yaml",
}
#: Llama shapes: 1b/3b as Llama-3.2, 7b as Llama-2-7B; tiny for --smoke
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny model, gloo, 1-2 processes, ddp and fsdp2 configs")
    p.add_argument("--model", default="1b", choices=sorted(SHAPES))
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODE_CONFIG)} "
                                                   "(default ddp,fsdp2,zero2,zero3; --smoke: ddp,fsdp2)")
    p.add_argument("--gpus", default=None, help="process counts to try, capped at the GPUs present (default 1,2,4,8; --smoke: 1,2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=4, help="per GPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--optimizer", default=None, help="optimizer plugin (default: the Trainer's AdamW)")
    p.add_argument("--offload", default=None, help="offload plugins, comma-separated (e.g. gradient-checkpointing)")
    p.add_argument("--attention", default=None, help="attention plugin (e.g. sdpa)")
    p.add_argument("--quantization", default=None)
    p.add_argument("--options", default=None, help="per-plugin options, JSON")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="accelerate --mixed_precision")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", default=None, help="results folder (default bench/results; out/bench for --smoke)")
    # internal: what each launched rank runs
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.modes, a.gpus = a.modes or ("" if a.smoke else "ddp,fsdp2,zero2,zero3"), a.gpus or ("" if a.smoke else "1,2,4,8")
    if a.smoke:
        a.model, a.modes, a.gpus = "tiny", a.modes or "ddp,fsdp2", a.gpus or "1,2"
        a.steps, a.warmup, a.micro_batch, a.seq_len, a.precision = min(a.steps, 6), min(a.warmup, 2), 2, 32, "no"
        a.timeout = min(a.timeout, 300)
    return a


# ---- one rank ----------------------------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import resource

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_lowmem import LowMemTrainer, LowMemTrainingArguments

    cuda = torch.cuda.is_available()
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    # Arguments first: plugin names, options and the distributed mode are checked before the model exists
    # (identically on every rank), and ZeRO-3 must be configured before the model is built (zero.Init).
    args = LowMemTrainingArguments(
        output_dir=str(Path(a.result).parent / "trainer"), max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.grad_accum, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda and a.precision == "bf16",
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False, seed=0,
        lowmem_optimizer=a.optimizer, lowmem_offload=a.offload, lowmem_attention=a.attention,
        lowmem_quantization=a.quantization, lowmem_options=a.options, lowmem_telemetry=False,
    )
    config = LlamaConfig(max_position_embeddings=max(a.seq_len, 128), tie_word_embeddings=False, **SHAPES[a.model])
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    t0 = time.perf_counter()
    if cuda and not deepspeed:  # build on this rank's GPU directly (a 7B fp32 model takes minutes on the CPU)
        torch.cuda.set_device(local_rank)
        with torch.device(f"cuda:{local_rank}"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:  # DeepSpeed ZeRO-3 partitions at construction (zero.Init) when the arguments enable it
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    build_s = time.perf_counter() - t0
    # under ZeRO-3 each parameter is a partitioned placeholder: its full size is ds_numel
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    timer = step_timer(cuda)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=random_tokens(config.vocab_size, a.seq_len, n=10**6),
                            callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[a.warmup:] or timer.times
    world = trainer.args.world_size
    tokens_per_step = world * a.micro_batch * a.grad_accum * a.seq_len
    step_s = statistics.median(timed)
    result = {
        "rank": rank, "world_size": world, "mode": trainer.lowmem_ctx.mode,
        "plugins": trainer.lowmem_ctx.selection.names(), "params": n_params, "build_s": round(build_s, 2),
        "step_times": [round(t, 4) for t in timer.times], "median_step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device": torch.cuda.get_device_name(local_rank) if cuda else "cpu",
    }
    with open(f"{a.result}.rank{rank}.json", "w") as f:
        json.dump(result, f)


# ---- the sweep ----------------------------------------------------------------------------------------------------
def launch_one(a: argparse.Namespace, mode: str, nproc: int, workdir: Path) -> dict:
    config = MODE_CONFIG["single" if (mode == "ddp" and nproc == 1) else mode]
    result = workdir / f"{mode}-{nproc}"
    for old in workdir.glob(f"{mode}-{nproc}.rank*.json"):
        old.unlink()
    worker_args = ["--worker", "--result", str(result), "--model", a.model, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--micro-batch", str(a.micro_batch), "--grad-accum", str(a.grad_accum),
                   "--seq-len", str(a.seq_len), "--precision", a.precision]
    for flag in ("optimizer", "offload", "attention", "quantization", "options"):
        if getattr(a, flag):
            worker_args += [f"--{flag}", getattr(a, flag)]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(nproc), "--mixed_precision", a.precision, "--main_process_port", "0",
           str(Path(__file__).resolve()), *worker_args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env, cwd=ROOT)
        rc, tail = r.returncode, (r.stderr or "")[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stderr or "")[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"{mode}-{nproc}.rank*.json"))]
    row = {"mode": mode, "config": config, "processes": nproc, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "ranks": ranks}
    if rc != 0 or len(ranks) != nproc:
        row["error"] = _error_line(tail)
        return row
    row.update(
        world_size=ranks[0]["world_size"], params=ranks[0]["params"], hf_lowmem_mode=ranks[0]["mode"],
        tokens_per_s=min(x["tokens_per_s"] for x in ranks),  # the slowest rank sets the pace
        median_step_s=max(x["median_step_s"] for x in ranks),
        peak_allocated_gib=max((x["peak_allocated_gib"] or 0) for x in ranks) if ranks[0]["peak_allocated_gib"] is not None else None,
        peak_reserved_gib=max((x["peak_reserved_gib"] or 0) for x in ranks) if ranks[0]["peak_reserved_gib"] is not None else None,
        peak_host_rss_gib=max(x["peak_host_rss_gib"] for x in ranks), losses=ranks[0]["losses"], device=ranks[0]["device"],
    )
    return row


def _error_line(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if "Error" in ln or "error" in ln]
    for key in ("OutOfMemoryError", "PluginError", "MissingExtraError"):
        hits = [ln for ln in lines if key in ln]
        if hits:
            return hits[-1].strip()[:300]
    return (lines[-1] if lines else tail.strip().splitlines()[-1] if tail.strip() else "no output").strip()[:300]


def table(rows: list[dict]) -> str:
    head = ("| mode | GPUs | tokens/s | scaling vs 1 GPU | step (s) | peak allocated / GPU (GiB) | peak reserved / GPU (GiB) "
            "| host RSS / rank (GiB) | note |\n|---|---|---|---|---|---|---|---|---|")
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["processes"] == 1 and "tokens_per_s" in r}
    out = [head]
    for r in rows:
        if "tokens_per_s" not in r:
            out.append(f"| {r['mode']} | {r['processes']} | - | - | - | - | - | - | failed: {r.get('error', '')} |")
            continue
        eff = r["tokens_per_s"] / (r["processes"] * base[r["mode"]]) if r["mode"] in base else None
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        out.append(f"| {r['mode']} | {r['processes']} | {r['tokens_per_s']:,.0f} | {'-' if eff is None else f'{eff:.0%}'} "
                   f"| {r['median_step_s']:.3f} | {fmt(r['peak_allocated_gib'])} | {fmt(r['peak_reserved_gib'])} "
                   f"| {r['peak_host_rss_gib']:.2f} | {r['config']} |")
    return "\n".join(out)


def sweep(a: argparse.Namespace, argv: list[str]) -> list[dict]:
    import torch

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODE_CONFIG]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; modes are {', '.join(MODE_CONFIG)}")
    counts = sorted({int(x) for x in a.gpus.split(",")})
    n_gpu = torch.cuda.device_count()
    if n_gpu:
        counts = [c for c in counts if c <= n_gpu] or [1]
    elif not a.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU check")
    out = Path(a.out or (ROOT / "out" / "bench" if a.smoke else ROOT / "bench" / "results"))
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/multigpu.py " + " ".join(shlex.quote(x) for x in argv)
    print(f"{command}\nmodel {a.model}, modes {modes}, processes {counts}, "
          f"{'CPU (gloo)' if not n_gpu else f'{n_gpu} x ' + torch.cuda.get_device_name(0)}", flush=True)
    rows = []
    for mode in modes:
        for k in counts:
            if mode == "single" and k > 1:
                continue
            row = launch_one(a, mode, k, work)
            rows.append(row)
            peak = (f"peak {row['peak_allocated_gib']:.2f} GiB allocated per GPU" if row.get("peak_allocated_gib") is not None
                    else f"peak host RSS {row.get('peak_host_rss_gib', 0):.2f} GiB per rank")
            status = (f"{row['tokens_per_s']:,.0f} tokens/s, {peak}"
                      if "tokens_per_s" in row else f"FAILED: {row.get('error')}")
            print(f"  {mode:14s} x{k}: {status} ({row['wall_s']} s)", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"multigpu-{a.model}-{stamp}"
    meta = {"command": command, "model": a.model, "shape": SHAPES[a.model], "seq_len": a.seq_len,
            "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "precision": a.precision,
            "plugins": {k: getattr(a, k) for k in ("optimizer", "offload", "attention", "quantization", "options")},
            "torch": torch.__version__, "gpus": n_gpu, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    md = f"# {name}\n\n`{command}`\n\n{table(rows)}\n"
    (out / f"{name}.md").write_text(md)
    print("\n" + table(rows) + f"\n\nwritten: {out / name}.json, .md")
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.worker:
        worker(a)
        return 0
    rows = sweep(a, argv)
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
