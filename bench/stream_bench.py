"""Issues 4 and 12 benchmark: full-parameter training of a Llama-2-7B-shaped model (random init, random tokens)
with hf-lowmem's weight-streaming engine under a GPU memory cap, against its peers measured in the same run,
with host memory measured the way the OOM killer sees it (the whole process tree, DataLoader workers included).

    python bench/stream_bench.py --runs ceiling:32,compact:32,exact:32 --out bench/results/stream_7b_tiers.json
    python bench/stream_bench.py --runs none --real-path /tmp/llama7b --out bench/results/stream_7b_realpath.json
    python bench/stream_bench.py --runs ds_z3_offload:16,stream:16,ceiling:16 --out bench/results/stream_16l.json
    python bench/stream_bench.py --smoke          # tiny shape on the CPU: checks the script, says nothing of speed

Each run is a subprocess (its own GPU cap, its own host memory). Modes:

  ceiling        stock Trainer, bf16 weights on the GPU, fused AdamW, no checkpointing, no memory cap
  stream         LowMemTrainer + ``stream``, exact tier (fp32 masters) with ``--states`` (default 8-bit AdamW)
  exact          the exact tier: fp32 masters, fp32 AdamW states (the arithmetic of a plain Trainer)
  compact        the compact tier: bf16 masters (stochastic rounding), 4-bit states, 8-bit stored gradients,
                 ``stash_every`` chosen for the host budget (``--host-gib``, default 32)
  ds_z3_offload  stock Trainer + DeepSpeed ZeRO-3 with parameters and optimizer offloaded to the CPU,
                 gradient checkpointing, under ``--cap-gib`` (the recipe of shared/bench/peers.py)

Engine runs use ``--workers`` DataLoader workers (default 2, forked). One JSON row per run: name, layers, seq,
micro_batch, grad_accum, gpu_cap_gib, peak_gpu_allocated_gib, ``host_used_gib`` (peak of the process tree's
Pss, page-locked memory included), ``peak_host_rss_gib`` (ru_maxrss of the training process alone),
memavailable_drop_gib, tokens_per_s (median optimizer step, the update included), the command, and for engine
runs where the step's time goes.

``--real-path DIR``: the user's path at this shape, each phase a fresh process: write the random-initialised
model as bf16 safetensors shards into DIR; an uninterrupted 5-step run loaded with ``from_pretrained``; a run
that stops after saving its step-3 checkpoint; a run resumed from it for steps 4-5 that then saves the final
model with ``save_model``; a plain ``from_pretrained`` of that folder. Rows report load, save and resume
seconds, checkpoint GiB, ``host_used_gib`` per phase and the losses; the last row compares the resumed losses
with the uninterrupted ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import one_gpu, random_tokens, step_timer, write_rows
from hostmem import HostMemSampler

GiB = 2**30
ENGINE_MODES = ("stream", "exact", "compact")
DEFAULT_HOST_GIB = {"compact": 32.0, "stream": 64.0, "exact": 120.0}


def llama_config(layers: int | None, smoke: bool, shape: str = "llama2-7b"):
    """The benchmark model's config: the planner's preset ``shape`` (``hf_lowmem.planner.shapes.PRESETS``, the one
    place the project keeps model shapes), sliced to ``layers`` decoder layers (``None`` or 0: all of the preset's).

    ``smoke``: the preset scaled down for the CPU: heads / 8 (at least 1) of head size 16, MLP / 64, vocab 512, and
    by default layers / 8, so llama2-7b becomes 4 layers of hidden 64 and llama2-13b 5 layers of hidden 80."""
    from hf_lowmem.planner import preset_config

    full = preset_config(shape)
    if smoke:
        heads = max(1, full.num_attention_heads // 8)
        kv = max(1, (full.num_key_value_heads or full.num_attention_heads) // 8)
        while heads % kv:
            kv -= 1
        cfg = preset_config(shape, hidden_size=16 * heads, intermediate_size=max(16, full.intermediate_size // 64),
                            num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, vocab_size=512,
                            max_position_embeddings=256,
                            num_hidden_layers=layers or max(1, full.num_hidden_layers // 8))
    else:
        cfg = preset_config(shape, num_hidden_layers=layers) if layers else full
    cfg._attn_implementation = "sdpa"
    return cfg


def _init_tensor(name: str, shape, dtype, gen):
    """N(0, 0.02) weights (drawn on the generator's device), ones for norms: the fast init of every model here."""
    import torch

    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).mul_(0.02).to(dtype).cpu()


def host_model(cfg, cuda: bool, dtype):
    """The model with pageable host weights of ``dtype``, initialised fast (drawn on the GPU when there is one)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod._parameters[pname] = torch.nn.Parameter(_init_tensor(f"{mod_name}.{pname}", p.shape, dtype, gen))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model


def ds_z3_offload_config() -> dict:
    """DeepSpeed ZeRO-3 with parameters and optimizer states offloaded to pinned CPU memory (shared/bench/peers.py's)."""
    return {"bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                  "offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                                  "contiguous_gradients": True, "stage3_max_live_parameters": 1e9,
                                  "stage3_max_reuse_distance": 1e9, "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto",
                                  "sub_group_size": 1e9},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto"}


def _engine_args(a, kw: dict, optimizer: str | None = None):
    from hf_lowmem import LowMemTrainingArguments

    opts = {"profile": bool(kw.get("bf16"))}
    if a.mode == "compact":
        opts["tier"] = "compact"
    elif a.mode == "exact":
        opts["states"] = "fp32"
    else:
        opts["states"] = a.states
    if getattr(a, "offload_dir", None):  # the SSD tier (bench/ssd_bench.py): masters and states in files there
        opts["offload_dir"] = a.offload_dir
    opts.update(json.loads(getattr(a, "stream_options", None) or "{}"))  # e.g. '{"states": "8bit", "stash_every": 4}'
    host = a.host_gib if a.host_gib else DEFAULT_HOST_GIB[a.mode]
    # declared: the GPU machine's VM reports less RAM available than it has until it is used
    return LowMemTrainingArguments(**kw, lowmem_optimizer=optimizer, lowmem_offload=["stream"], lowmem_options={"stream": opts},
                                   lowmem_host_memory=f"{host}GiB", lowmem_telemetry=False)


def _train_kwargs(a, cuda: bool, **extra) -> dict:
    kw = dict(output_dir=a.out_dir, per_device_train_batch_size=a.mb, gradient_accumulation_steps=a.ga,
              max_steps=a.steps, learning_rate=1e-5, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[],
              dataloader_num_workers=a.workers, disable_tqdm=True, use_cpu=not cuda, max_grad_norm=1.0, seed=0)
    kw.update(extra)
    return kw


def _cap(a, cuda: bool) -> None:
    import torch

    if cuda and a.cap_gib and a.mode != "ceiling":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a.cap_gib * GiB / total)


def _engine_row(engine, timer) -> dict:
    """Where a steady step's time goes (copy streams, compute segments, idle), from the engine's profile."""
    tot = engine.profile_totals()
    steady = timer.times[1:]
    n = max(1, len(steady))
    per = {k: round(v / n, 3) for k, v in tot.items()}
    compute = sum(per.get(k, 0.0) for k in ("forward_s", "head_s", "backward_s", "optimizer_s"))
    per["compute_s"] = round(compute, 3)
    per["step_s_mean"] = round(sum(steady) / n, 3)
    per["idle_s"] = round(per["step_s_mean"] - compute, 3)  # waiting for copies, Python, the Trainer
    return per


def worker(a) -> dict:
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available() and not a.smoke
    if a.mode.startswith("ds_"):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    _cap(a, cuda)
    cfg = llama_config(a.layers, a.smoke, a.shape)
    hm = HostMemSampler().start()

    class SteadyProfile(TrainerCallback):
        """The engine's profile counts only the steady steps: what the first step recorded is dropped."""

        def __init__(self, engine):
            self.engine = engine

        def on_step_end(self, args, state, control, **kw):
            hm.sample()  # while the DataLoader workers are alive
            if state.global_step == 1 and self.engine.dev.profile is not None:
                self.engine.profile_totals()
                self.engine.dev.profile.totals.clear()

    stopped: list[str] = []

    class StopBy(TrainerCallback):
        """With ``--stop-by`` (a time.time() the parent will kill this run at, less a margin): end training after a
        step when another step of the last one's length would not end before it, once a timed step exists (the
        first is not timed). The row then says so and has fewer steps, rather than no row at all."""

        def on_step_end(self, args, state, control, **kw):
            timed = len(timer.times) >= 2 and state.global_step < args.max_steps
            if a.stop_by and timed and time.time() + 1.2 * timer.times[-1] > a.stop_by:
                control.should_training_stop = True
                stopped.append(f"after {state.global_step} of {args.max_steps} steps: another step of "
                               f"{timer.times[-1]:.1f} s would not end before the run's time is up")

    kw = _train_kwargs(a, cuda)
    t0 = time.perf_counter()
    timer = step_timer(cuda)
    tokens = random_tokens(cfg.vocab_size, a.seq)
    engine = None
    with hm.phase("build"):
        if a.mode == "ceiling":
            kw.update(optim="adamw_torch_fused" if cuda else "adamw_torch")
            with torch.device("cuda" if cuda else "cpu"):
                model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
            trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=tokens, callbacks=[timer])
        elif a.mode in ENGINE_MODES:
            from hf_lowmem import LowMemTrainer

            model = host_model(cfg, cuda, torch.bfloat16 if a.mode == "compact" else torch.float32)
            trainer = LowMemTrainer(model=model, args=_engine_args(a, kw), train_dataset=tokens, callbacks=[timer])
            engine = trainer.lowmem_engine
            trainer.add_callback(SteadyProfile(engine))
        elif a.mode == "ds_z3_offload":
            kw.update(deepspeed=ds_z3_offload_config(), gradient_checkpointing=True)
            args = TrainingArguments(**kw)  # before the model, so zero.Init partitions it at construction
            model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
            trainer = Trainer(model=model, args=args, train_dataset=tokens, callbacks=[timer])
        else:
            raise SystemExit(f"unknown mode {a.mode}")
    build_s = time.perf_counter() - t0
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.add_callback(StopBy())
    with hm.phase("train"):
        out = trainer.train()
    hm.stop()
    steady = timer.times[1:] or timer.times
    step_s = statistics.median(steady)  # of an even count: the mean of the middle two
    tokens = a.mb * a.ga * a.seq
    row = {
        "name": a.mode, "shape": a.shape, "params": n_params, "params_b": round(n_params / 1e9, 3),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
        "seq": a.seq, "micro_batch": a.mb,
        "grad_accum": a.ga, "workers": a.workers, "gpu_cap_gib": a.cap_gib if a.mode != "ceiling" else None,
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        **hm.result(),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tokens_per_s": round(tokens / step_s, 1), "step_s_median": round(step_s, 3),
        "step_times_s": [round(t, 2) for t in timer.times], "train_loss": round(out.training_loss, 4),
        "build_s": round(build_s, 1), "tflops_6N": round(6 * n_params * tokens / step_s / 1e12, 1),
    }
    if stopped:
        row["stopped_early"] = stopped[0]
    if engine is not None:
        from hf_lowmem.engine.optim import CHUNK as update_chunk

        fm = engine.formats
        row.update(tier=engine.options.tier, master=fm.master, states=fm.states, grads=fm.grads,
                   stash_every=engine.stash_every, engine_host_gib=round(engine.arena.nbytes / GiB, 2),
                   host_budget_gib=a.host_gib or DEFAULT_HOST_GIB[a.mode], update_chunk=update_chunk)
        if cuda:
            row["breakdown_per_step"] = _engine_row(engine, timer)
        if getattr(engine.store, "file_backed", False):  # the SSD tier: its files, its traffic, its disk
            st = engine.store
            row.update(offload_dir=st.dirs, offload_file_gib=round(st.file_bytes() / GiB, 2), direct_io=st.direct,
                       offload_window=st.window, io_stats={k: round(v, 3) for k, v in st.stats.items()},
                       disk_note={k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in (getattr(engine, "disk_note", None) or {}).items()})
    return row


# ---- the real path: write -> load -> 3 steps -> save -> resume -> 2 steps -> save_model -> reload ----------------
def _du_gib(path: str) -> float:
    return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / GiB, 2)


def real_phase(a) -> dict:
    """One phase of the real path, in this (fresh) process."""
    import torch

    cuda = torch.cuda.is_available() and not a.smoke
    cfg = llama_config(a.layers, a.smoke, a.shape)
    phase = a.mode.split(":", 1)[1]
    hm = HostMemSampler().start()
    row: dict = {"name": f"real:{phase}", "layers": a.layers, "tier": "compact", "workers": a.workers,
                 "optimizer": a.real_optimizer}
    if phase == "write":
        from hf_lowmem.engine.weights_io import write_safetensors_sharded

        os.makedirs(a.real_path, exist_ok=True)
        cfg.dtype = torch.bfloat16
        with torch.device("meta"):
            from transformers import LlamaForCausalLM

            shapes = [(n, tuple(p.shape), torch.bfloat16) for n, p in LlamaForCausalLM(cfg).named_parameters()]
        gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
        shape_of = {n: s for n, s, _ in shapes}
        t0 = time.perf_counter()
        with hm.phase("write"):  # one tensor at a time: never the whole model in memory
            write_safetensors_sharded(a.real_path, shapes, lambda n: _init_tensor(n, shape_of[n], torch.bfloat16, gen))
            cfg.save_pretrained(a.real_path)
        row.update(write_s=round(time.perf_counter() - t0, 1), checkpoint_gib=_du_gib(a.real_path))
    elif phase == "reload":
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        with hm.phase("load"):
            m = AutoModelForCausalLM.from_pretrained(os.path.join(a.real_path, "final"))
        row.update(load_s=round(time.perf_counter() - t0, 1), dtype=str(m.dtype).replace("torch.", ""),
                   params_b=round(sum(p.numel() for p in m.parameters()) / 1e9, 3))
    else:
        row.update(_real_train(a, phase, cuda, hm))
    hm.stop()
    row.update(hm.result())
    row["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def _real_train(a, phase: str, cuda: bool, hm) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from hf_lowmem import LowMemTrainer

    _cap(a, cuda)
    # deterministic kernels (cuBLAS workspace, SDPA and embedding backward): the comparison of a resumed run with an
    # uninterrupted one is then about the resume, not about the order of atomic additions on the GPU
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = os.path.join(a.real_path, "run")
    times: dict[str, float] = {}

    class Marks(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            times["train_begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            times.setdefault("first_step", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            hm.sample()
            times[f"step_end_{state.global_step}"] = time.perf_counter()
            if phase == "first" and state.global_step == 3:
                control.should_training_stop = True  # after the step-3 checkpoint is written

        def on_save(self, args, state, control, **kw):
            times[f"saved_{state.global_step}"] = time.perf_counter()

    t0 = time.perf_counter()
    with hm.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(a.real_path)
    load_s = time.perf_counter() - t0
    a.mode = "compact"
    kw = _train_kwargs(a, cuda, output_dir=out_dir, max_steps=5, learning_rate=1e-4,
                       save_strategy="steps" if phase == "first" else "no", save_steps=3)
    t1 = time.perf_counter()
    args = _engine_args(a, kw, optimizer=None if a.real_optimizer == "adamw" else a.real_optimizer)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=random_tokens(model.config.vocab_size, a.seq),
                            callbacks=[Marks()])
    adopt_s = time.perf_counter() - t1
    resume = os.path.join(out_dir, "checkpoint-3") if phase == "resume" else None
    with hm.phase("train"):
        trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = {"load_s": round(load_s, 1), "adopt_s": round(adopt_s, 1), "losses": losses,
           "stash_every": trainer.lowmem_engine.stash_every, "loaded_dtype": str(model.dtype).replace("torch.", "")}
    if phase == "first":
        row["save_s"] = round(times["saved_3"] - times["step_end_3"], 1)
        row["checkpoint_gib"] = _du_gib(os.path.join(out_dir, "checkpoint-3"))
    if phase == "resume":
        row["resume_load_s"] = round(times["first_step"] - times["train_begin"], 1)
        t2 = time.perf_counter()
        with hm.phase("save_model"):
            trainer.save_model(os.path.join(a.real_path, "final"))
        row["save_model_s"] = round(time.perf_counter() - t2, 1)
        row["final_gib"] = _du_gib(os.path.join(a.real_path, "final"))
    if cuda:
        row["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    return row


# ---- the parent --------------------------------------------------------------------------------------------------
def _result_row(stdout: str) -> dict | None:
    """The row a worker printed last (its ``RESULT {json}`` line), or ``None``."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def _child(a, mode: str, layers: int, ga: int, command: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--layers", str(layers), "--seq", str(a.seq), "--mb", str(a.mb),
           "--ga", str(ga), "--steps", str(a.steps), "--cap-gib", str(a.cap_gib), "--states", a.states,
           "--host-gib", str(a.host_gib or 0), "--workers", str(a.workers), "--out-dir", a.out_dir,
           "--shape", getattr(a, "shape", "llama2-7b")]
    timeout = getattr(a, "run_timeout", None) or a.timeout
    if getattr(a, "stop_margin", 0):  # the worker ends training early rather than be killed (see StopBy)
        cmd += ["--stop-by", str(time.time() + timeout - a.stop_margin)]
    if a.real_path:
        cmd += ["--real-path", a.real_path, "--real-optimizer", a.real_optimizer]
    if getattr(a, "offload_dir", None):
        cmd += ["--offload-dir", a.offload_dir]
    if getattr(a, "stream_options", None):
        cmd += ["--stream-options", a.stream_options]
    if a.smoke:
        cmd.append("--smoke")
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        row = _result_row(proc.stdout)
        if row is None:
            tail = (proc.stdout + proc.stderr)[-3000:]
            row = {"name": mode, "layers": layers, "error": f"exit {proc.returncode}", "log_tail": tail}
            print(tail, file=sys.stderr)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout or "")
        row = _result_row(out)
        if row is not None:  # killed while exiting (freeing its memory) after it printed its row
            row["killed_after_result"] = f"timeout after {timeout}s"
        else:
            row = {"name": mode, "layers": layers, "error": f"timeout after {timeout}s", "log_tail": out[-2000:]}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["command"] = command
    print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "command")}), flush=True)
    return row


def main() -> None:
    one_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="ceiling:32,compact:32,exact:32",
                   help="MODE:LAYERS[:GRAD_ACCUM],... run in this order (default accumulation: --ga); 'none' for none")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4, help="micro-batch")
    p.add_argument("--ga", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cap-gib", type=float, default=8.0)
    p.add_argument("--states", default="8bit", help="optimizer states of the 'stream' mode: 8bit or fp32")
    p.add_argument("--stream-options", default=None,
                   help='JSON merged into the engine runs\' stream options, e.g. \'{"states": "8bit", "stash_every": 4}\'')
    p.add_argument("--host-gib", type=float, default=None,
                   help="host budget declared to the engine (default: compact 32, stream 64, exact 120)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of every run (forked)")
    p.add_argument("--real-path", default=None, help="run the user's path with bf16 safetensors shards in this folder")
    p.add_argument("--real-layers", type=int, default=32, help="decoder layers of the real-path model")
    p.add_argument("--keep", action="store_true", help="keep the real-path folder (default: removed at the end)")
    p.add_argument("--real-optimizer", default="adamw",
                   help="lowmem_optimizer of the real path (adamw: 4-bit states; bnb-adamw8bit: 8-bit states)")
    p.add_argument("--offload-dir", default=None, help="engine runs use the SSD tier with this folder (offload_dir)")
    p.add_argument("--shape", default="llama2-7b",
                   help="model shape: a preset of hf_lowmem.planner (llama2-7b, llama2-13b, ...); LAYERS slices it")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--out-dir", default="/tmp/stream_bench_out", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--stop-by", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.mode = a.worker
        row = real_phase(a) if a.mode.startswith("real:") else worker(a)
        print("RESULT " + json.dumps(row), flush=True)
        return
    if a.smoke:
        a.seq, a.mb, a.ga, a.steps = 32, 2, 2, 3
    command = "python " + " ".join(sys.argv)
    rows = []
    specs = [] if a.runs == "none" else a.runs.split(",")
    for spec in specs:
        mode, layers, *ga = spec.split(":")  # MODE:LAYERS[:GRAD_ACCUM]
        rows.append(_child(a, mode, 2 if a.smoke else int(layers), int(ga[0]) if ga else a.ga, command))
        write_rows(a.out, command, a.smoke, rows)  # after every run, so a killed command keeps what it measured
    for r in rows:  # ratios within this run
        for other in rows:
            if other is not r and other.get("layers") == r.get("layers") and "tokens_per_s" in r and "tokens_per_s" in other:
                tag = other["name"] if other.get("grad_accum") == a.ga else f"{other['name']}_ga{other.get('grad_accum')}"
                r[f"ratio_vs_{tag}"] = round(r["tokens_per_s"] / other["tokens_per_s"], 3)
    if a.real_path:
        rows += real_path(a, command)
    write_rows(a.out, command, a.smoke, rows)
    print("\n| run | layers | workers | cap GiB | peak GPU alloc GiB | host used GiB | peak RSS GiB | tokens/s | ratios |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratios = ", ".join(f"{k[9:]}={v}" for k, v in r.items() if k.startswith("ratio_vs_"))
        print(f"| {r['name']} | {r.get('layers')} | {r.get('workers')} | {r.get('gpu_cap_gib')} | "
              f"{r.get('peak_gpu_allocated_gib')} | {r.get('host_used_gib')} | {r.get('peak_host_rss_gib')} | "
              f"{r.get('tokens_per_s', r.get('error', r.get('losses')))} | {ratios} |")
    if any("error" in r for r in rows) or any(r.get("same_losses") is False for r in rows):
        sys.exit(1)


def real_path(a, command: str) -> list[dict]:
    layers = 2 if a.smoke else a.real_layers
    shutil.rmtree(a.real_path, ignore_errors=True)
    rows = []
    for phase in ("write", "uninterrupted", "first", "resume", "reload"):
        row = _child(a, f"real:{phase}", layers, a.ga, command)
        rows.append(row)
        write_rows(a.out, command, a.smoke, rows)
        if "error" in row:
            break
    by = {r["name"]: r for r in rows}
    full = by.get("real:uninterrupted", {}).get("losses")
    first, again = by.get("real:first", {}).get("losses"), by.get("real:resume", {}).get("losses")
    if full and first and again:
        resumed = first[:3] + again[-2:]
        rows.append({"name": "real:compare", "layers": layers, "optimizer": a.real_optimizer,
                     "first_three_same": full[:3] == first[:3], "uninterrupted_losses": full, "resumed_losses": resumed,
                     "max_abs_diff": max(abs(x - y) for x, y in zip(full, resumed)),
                     "same_losses": len(full) == len(resumed) == 5 and full == resumed, "command": command})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "command"}), flush=True)
    if not a.keep:
        shutil.rmtree(a.real_path, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
