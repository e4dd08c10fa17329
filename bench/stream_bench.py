"""Issue 4 benchmark: full-parameter training of a Llama-2-7B-shaped model (random init, random tokens)
with hf-lowmem's weight-streaming engine under a GPU memory cap, against its peers measured in the same run.

    python bench/stream_bench.py --runs ceiling:32,stream:32 --out bench/results/stream_7b.json
    python bench/stream_bench.py --runs ds_z3_offload:16,stream:16,ceiling:16 --out bench/results/stream_16l.json
    python bench/stream_bench.py --smoke          # tiny shape on the CPU: checks the script, says nothing of speed

Each run is a subprocess (its own GPU cap, its own peak host RSS). Modes:

  ceiling        stock Trainer, bf16 weights on the GPU, fused AdamW, no checkpointing, no memory cap
  stream         LowMemTrainer + the ``stream`` plugin (fp32 masters and 8-bit AdamW states in pinned host
                 memory, bf16 compute), under ``--cap-gib``
  ds_z3_offload  stock Trainer + DeepSpeed ZeRO-3 with parameters and optimizer offloaded to the CPU,
                 gradient checkpointing, under ``--cap-gib`` (the recipe of shared/bench/peers.py)

One JSON row per run: name, layers, seq, micro_batch, grad_accum, gpu_cap_gib, peak_gpu_allocated_gib,
peak_host_rss_gib, tokens_per_s (median optimizer step, the update included), and for ``stream`` where the
step's time goes (copy-stream busy time and bytes, compute segments, idle).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchlib import one_gpu, random_tokens, step_timer

GiB = 2**30


def llama_config(layers: int, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return cfg


def host_model(cfg, cuda: bool):
    """The model with fp32 weights in pinned host memory, initialised fast (N(0, 0.02) drawn on the GPU)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=torch.float32)  # pageable: the engine page-locks it in place
            if "norm" in f"{mod_name}.{pname}":
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(p.shape, generator=gen, device=gen.device, dtype=torch.float32).mul_(0.02))
            mod._parameters[pname] = torch.nn.Parameter(t)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model


def worker(a) -> dict:
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available() and not a.smoke
    if a.mode.startswith("ds_"):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if cuda and a.cap_gib and a.mode != "ceiling":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a.cap_gib * GiB / total)
    cfg = llama_config(a.layers, a.smoke)

    class SteadyProfile(TrainerCallback):
        """The engine's profile counts only the steady steps: what the first step recorded is dropped."""

        def __init__(self, engine):
            self.engine = engine

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1 and self.engine.dev.profile is not None:
                self.engine.profile_totals()
                self.engine.dev.profile.totals.clear()

    kw = dict(output_dir="/tmp/stream_bench_out", per_device_train_batch_size=a.mb, gradient_accumulation_steps=a.ga,
              max_steps=a.steps, learning_rate=1e-5, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[],
              dataloader_num_workers=2 if cuda else 0, disable_tqdm=True, use_cpu=not cuda, max_grad_norm=1.0)
    t0 = time.perf_counter()
    timer = step_timer(cuda)
    tokens = random_tokens(cfg.vocab_size, a.seq)
    engine = None
    if a.mode == "ceiling":
        kw.update(optim="adamw_torch_fused" if cuda else "adamw_torch")
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
        trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=tokens, callbacks=[timer])
    elif a.mode == "stream":
        from hf_lowmem import LowMemTrainer, LowMemTrainingArguments

        model = host_model(cfg, cuda)
        opts = {"states": a.states, "profile": bool(cuda)}
        # the budget the issue sets (a 64 GiB machine); declared, because the GPU machine's VM reports less
        # RAM available than it has until it is used
        args = LowMemTrainingArguments(**kw, lowmem_offload=["stream"], lowmem_options={"stream": opts},
                                       lowmem_host_memory=f"{a.host_gib}GiB", lowmem_telemetry=False)
        trainer = LowMemTrainer(model=model, args=args, train_dataset=tokens, callbacks=[timer])
        engine = trainer.lowmem_engine
        trainer.add_callback(SteadyProfile(engine))
    elif a.mode == "ds_z3_offload":
        ds = {"bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                    "offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                                    "contiguous_gradients": True, "stage3_max_live_parameters": 1e9,
                                    "stage3_max_reuse_distance": 1e9, "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto",
                                    "sub_group_size": 1e9},
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto"}
        kw.update(deepspeed=ds, gradient_checkpointing=True)
        args = TrainingArguments(**kw)  # before the model, so zero.Init partitions it at construction
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        trainer = Trainer(model=model, args=args, train_dataset=tokens, callbacks=[timer])
    else:
        raise SystemExit(f"unknown mode {a.mode}")
    build_s = time.perf_counter() - t0
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    steady = timer.times[1:] or timer.times
    step_s = sorted(steady)[len(steady) // 2]
    tokens = a.mb * a.ga * a.seq
    row = {
        "name": a.mode, "params_b": round(n_params / 1e9, 3), "layers": a.layers, "seq": a.seq, "micro_batch": a.mb,
        "grad_accum": a.ga, "gpu_cap_gib": a.cap_gib if a.mode != "ceiling" else None,
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tokens_per_s": round(tokens / step_s, 1), "step_s_median": round(step_s, 3),
        "step_times_s": [round(t, 2) for t in timer.times], "train_loss": round(out.training_loss, 4),
        "build_s": round(build_s, 1),
        "tflops_6N": round(6 * n_params * tokens / step_s / 1e12, 1),
    }
    if engine is not None and cuda:
        tot = engine.profile_totals()
        steady = timer.times[1:]
        n = max(1, len(steady))
        per = {k: round(v / n, 3) for k, v in tot.items()}
        compute = sum(per.get(k, 0.0) for k in ("forward_s", "head_s", "backward_s", "optimizer_s"))
        per["compute_s"] = round(compute, 3)
        per["step_s_mean"] = round(sum(steady) / n, 3)
        # compute-stream time not inside a timed segment: waiting for copies, Python, the Trainer
        per["idle_s"] = round(per["step_s_mean"] - compute, 3)
        row["breakdown_per_step"] = per
        row["states"] = engine.state_format
    return row


def _write(path: str | None, command: str, smoke: bool, rows: list[dict]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"command": command, "smoke": smoke, "rows": rows}, f, indent=2)


def main() -> None:
    one_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="ceiling:32,stream:32",
                   help="MODE:LAYERS[:GRAD_ACCUM],... run in this order (default accumulation: --ga)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4, help="micro-batch")
    p.add_argument("--ga", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cap-gib", type=float, default=8.0)
    p.add_argument("--states", default="8bit", help="stream engine optimizer states: 8bit or fp32")
    p.add_argument("--host-gib", type=float, default=64.0, help="host RAM budget declared to the stream engine")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.mode = a.worker
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    if a.smoke:
        a.seq, a.mb, a.ga, a.steps = 32, 2, 2, 3
    command = "python " + " ".join(sys.argv)
    rows = []
    for spec in a.runs.split(","):
        mode, layers, *ga = spec.split(":")  # MODE:LAYERS[:GRAD_ACCUM]
        layers = 2 if a.smoke else int(layers)
        run_ga = int(ga[0]) if ga else a.ga
        cmd = [sys.executable, __file__, "--worker", mode, "--layers", str(layers), "--seq", str(a.seq), "--mb",
               str(a.mb), "--ga", str(run_ga), "--steps", str(a.steps), "--cap-gib", str(a.cap_gib), "--states", a.states,
               "--host-gib", str(a.host_gib)]
        if a.smoke:
            cmd.append("--smoke")
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                row = json.loads(lines[-1][7:])
            else:
                tail = (proc.stdout + proc.stderr)[-3000:]
                row = {"name": mode, "layers": layers, "error": f"exit {proc.returncode}", "log_tail": tail}
                print(tail, file=sys.stderr)
        except subprocess.TimeoutExpired as e:
            row = {"name": mode, "layers": layers, "error": f"timeout after {a.timeout}s",
                   "log_tail": ((e.stdout or b"")[-2000:]).decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)[-2000:]}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["command"] = command
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "command")}), flush=True)
        _write(a.out, command, a.smoke, rows)  # after every run, so a killed command keeps what it measured
    # ratios within this run
    for r in rows:
        for other in rows:
            if other is not r and other.get("layers") == r.get("layers") and "tokens_per_s" in r and "tokens_per_s" in other:
                tag = other["name"] if other.get("grad_accum") == a.ga else f"{other['name']}_ga{other.get('grad_accum')}"
                r[f"ratio_vs_{tag}"] = round(r["tokens_per_s"] / other["tokens_per_s"], 3)
    _write(a.out, command, a.smoke, rows)
    print("\n| run | layers | grad accum | cap GiB | peak GPU alloc GiB | peak host RSS GiB | tokens/s | ratios |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratios = ", ".join(f"{k[9:]}={v}" for k, v in r.items() if k.startswith("ratio_vs_"))
        print(f"| {r['name']} | {r.get('layers')} | {r.get('grad_accum')} | {r.get('gpu_cap_gib')} | {r.get('peak_gpu_allocated_gib')} | "
              f"{r.get('peak_host_rss_gib')} | {r.get('tokens_per_s', r.get('error'))} | {ratios} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
