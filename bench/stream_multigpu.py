"""Issue 15/18 benchmark: the stream engine on 1 to N GPUs of one machine (``torchrun``, NCCL), one host copy of
the model's state for all ranks, against DeepSpeed ZeRO-3 offload at the same settings, in one invocation.

    python bench/stream_multigpu.py --out bench/results/stream_multigpu_7b.json     # nvidia-h200-x2
    python bench/stream_multigpu.py --runs stream:1,stream:2,stream:4,ds_z3_offload:4 --budget-s 560 \
        --out $OUT/stream_multigpu_7b_x4.json                                       # nvidia-h200-x4
    python bench/stream_multigpu.py --smoke       # CPU: gloo, 1 and 2 processes, tiny shape (checks the script)

Default: Llama-2-7B shape (32 layers), seq 2048, micro-batch 4 per GPU, GA 8, GPU cap 8 GiB per GPU, the
compact tier, a declared host budget of ``--host-gib`` (44) for the WHOLE machine in every run (the engine
chooses ``stash_every`` for it: with more ranks it stashes less often, since each rank stashes its own
tokens). Runs (``--runs``, in order, each one ``torchrun`` launch; any GPU count):

  stream:N           the engine on N GPUs (``torchrun --nproc_per_node N``; N = 1 is the same code path,
                     world 1): every rank streams the same layer, owns 1/N of every block
  ds_z3_offload:N    stock Trainer + DeepSpeed ZeRO-3, parameters and optimizer offloaded to pinned CPU memory,
                     gradient checkpointing (stream_bench.py's recipe), N GPUs; without deepspeed a row says so

The parent samples the host memory of the launcher's whole process tree (torchrun's agent, every rank, their
DataLoader workers: bench/hostmem.py, Pss, page-locked and shared memory counted once): ``host_used_gib`` is its
peak over the run, with ``phases.build`` (until rank 0 has built its trainer) and ``phases.train``. One JSON row
per run: tokens/s of the whole job (GPUs x micro-batch x GA x seq over the median steady step of rank 0), the
largest peak GPU allocation of any rank, stash_every, the losses; then a ``summary`` row whose ``by_gpus``
gives, for every N that ran, the speed-up over ``stream:1`` (target >= 0.9 N), the efficiency, ``host_ratio``
(host_used at N over 1; target <= 1.15) and the stream engine against DeepSpeed at the same N (the 2-GPU
figures also as the top-level ``scaling`` / ``host_ratio`` keys of the first version). Rows are written after
every run. ``--budget-s`` keeps one command under the device machine's 10-minute limit (later runs: skipped).

``--init rank0``: ranks other than 0 build the model on the meta device (rank 0's weights and buffers are used:
one model in host memory while loading, instead of one per process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import random_tokens, step_timer, write_rows
from hostmem import HostMemSampler

GiB = 2**30
DEFAULT_RUNS = "stream:1,stream:2,ds_z3_offload:2"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=DEFAULT_RUNS, help="MODE:GPUS,... (modes: stream, ds_z3_offload)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--ga", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--ds-steps", type=int, default=3, help="optimizer steps of the DeepSpeed run")
    p.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory cap per GPU")
    p.add_argument("--tier", default="compact", choices=["compact", "exact"])
    p.add_argument("--states", default=None, help="optimizer states of the engine (default: the tier's)")
    p.add_argument("--stash-every", default="auto", help="the engine's stash_every (default: auto, from the budget)")
    p.add_argument("--host-gib", type=float, default=44.0, help="host budget declared for the machine (engine runs)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (forked)")
    p.add_argument("--init", default="all", choices=["all", "rank0"], help="which ranks build the model's weights")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run (a hung run is killed with its ranks)")
    p.add_argument("--budget-s", type=float, default=None, help="start no run later than this many seconds minus 60 "
                   "into the command, and cut each run's timeout to what is left (default: no limit)")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shape: checks the script only")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.seq, a.mb, a.ga, a.steps, a.ds_steps = 2, 32, 2, 2, 3, 3
    return a


# ---- one rank ----------------------------------------------------------------------------------------------------
def _model(cfg, cuda: bool, dtype, meta: bool):
    import torch
    from stream_bench import host_model

    if not meta:
        return host_model(cfg, cuda, dtype)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def worker(a: argparse.Namespace) -> None:
    import torch
    from stream_bench import _train_kwargs, ds_z3_offload_config, llama_config

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not a.smoke
    if cuda:
        torch.cuda.set_device(local)
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(a.cap_gib * GiB / total, device=local)
    cfg = llama_config(a.layers, a.smoke)
    a.out_dir = str(Path(a.result).parent / f"trainer-{a.worker}")
    mode = a.worker.split(":")[0]
    steps = a.ds_steps if mode == "ds_z3_offload" else a.steps
    kw = _train_kwargs(argparse.Namespace(out_dir=a.out_dir, mb=a.mb, ga=a.ga, steps=steps, workers=a.workers), cuda,
                       ddp_find_unused_parameters=False)
    timer = step_timer(cuda)
    data = random_tokens(cfg.vocab_size, a.seq)
    t0 = time.perf_counter()
    engine = None
    if mode == "stream":
        from hf_lowmem import LowMemTrainer, LowMemTrainingArguments

        opts = {"tier": a.tier, "profile": cuda}
        if a.states:
            opts["states"] = a.states
        if a.stash_every != "auto":
            opts["stash_every"] = int(a.stash_every)
        args = LowMemTrainingArguments(**kw, lowmem_offload=["stream"], lowmem_options={"stream": opts},
                                       lowmem_host_memory=f"{a.host_gib}GiB", lowmem_telemetry=False)
        dtype = torch.bfloat16 if a.tier == "compact" else torch.float32
        model = _model(cfg, cuda, dtype, meta=a.init == "rank0" and rank > 0)
        trainer = LowMemTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        engine = trainer.lowmem_engine
    elif mode == "ds_z3_offload":
        from transformers import LlamaForCausalLM, Trainer, TrainingArguments

        args = TrainingArguments(**kw, deepspeed=ds_z3_offload_config(), gradient_checkpointing=True)
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)  # partitioned at construction (zero.Init)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes: stream, ds_z3_offload")
    build_s = time.perf_counter() - t0
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        Path(f"{a.result}.built").touch()  # the parent's sampler starts the "train" phase
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    steady = timer.times[1:] or timer.times
    step_s = statistics.median(steady)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = {"rank": rank, "world_size": world, "step_s_median": round(step_s, 3),
           "step_times_s": [round(t, 2) for t in timer.times],
           "tokens_per_s": round(world * a.mb * a.ga * a.seq / step_s, 1), "train_loss": round(out.training_loss, 4),
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "build_s": round(build_s, 1),
           "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
           "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
           "peak_rank_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "params_b": round(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e9, 3)}
    if engine is not None:
        fm = engine.formats
        row.update(tier=a.tier, master=fm.master, states=fm.states, grads=fm.grads, stash_every=engine.stash_every,
                   shared_host_gib=round(engine.arena.shared_nbytes / GiB, 2),
                   private_host_gib=round(engine.arena.nbytes / GiB, 2), host_budget_gib=a.host_gib)
        if cuda:
            n = max(1, len(timer.times) - 1)
            row["profile_per_step"] = {k: round(v / n, 3) for k, v in engine.profile_totals().items()}
    with open(f"{a.result}.rank{rank}.json", "w") as f:
        json.dump(row, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip tearing down tens of GiB of page-locked memory and the process group: measured, not needed


# ---- the parent ---------------------------------------------------------------------------------------------------
def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the run cannot happen
        return f"deepspeed is not installed here ({type(e).__name__}: {str(e)[:120]})"
    return None


def launch(a: argparse.Namespace, spec: str, work: Path, command: str, timeout: float | None = None) -> dict:
    mode, gpus = spec.split(":")
    gpus = int(gpus)
    row: dict = {"name": spec, "mode": mode, "gpus": gpus, "layers": a.layers, "seq": a.seq, "micro_batch": a.mb,
                 "grad_accum": a.ga, "gpu_cap_gib": a.cap_gib, "command": command}
    if mode == "ds_z3_offload":
        missing = _deepspeed_missing()
        if missing:
            row["skipped"] = missing
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
            return row
    result = work / spec.replace(":", "-")
    for old in work.glob(f"{result.name}.*"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           os.path.abspath(__file__), "--worker", spec, "--result", str(result)]
    for flag in ("layers", "seq", "mb", "ga", "steps", "ds_steps", "cap_gib", "tier", "stash_every", "host_gib",
                 "workers", "init"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if a.states:
        cmd += ["--states", a.states]
    if a.smoke:
        cmd.append("--smoke")
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", OMP_NUM_THREADS="1" if a.smoke else
               os.environ.get("OMP_NUM_THREADS", "8"), TOKENIZERS_PARALLELISM="false")
    if not a.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    limit = a.timeout if timeout is None else timeout
    t0 = time.perf_counter()
    rc: int | str
    with open(work / f"{result.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        hm = HostMemSampler(pid=proc.pid, interval=0.5).start()
        try:
            with hm.phase("build"):
                while proc.poll() is None and not Path(f"{result}.built").exists():
                    time.sleep(0.25)
            with hm.phase("train"):
                rc = proc.wait(timeout=max(1, limit - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks (their own session)
            proc.wait()
            rc = f"timeout after {limit:.0f}s"
        hm.stop()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row.update(hm.result())
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{result.name}.rank*.json"))]
    if rc != 0 or len(ranks) != gpus:
        tail = (work / f"{result.name}.log").read_text(errors="replace")[-3000:]
        row.update(error=f"exit {rc}", log_tail=tail)
        print(tail, file=sys.stderr)
    else:
        r0 = next(r for r in ranks if r["rank"] == 0)
        row.update({k: v for k, v in r0.items() if k not in ("rank", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib",
                                                             "peak_rank_rss_gib")})
        for key in ("peak_gpu_allocated_gib", "peak_gpu_reserved_gib", "peak_rank_rss_gib"):
            vals = [r[key] for r in ranks if r.get(key) is not None]
            row[key] = max(vals) if vals else None
    print(json.dumps({k: v for k, v in row.items() if k not in ("command", "log_tail", "step_times_s")}), flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    """Per GPU count N: the stream engine's speed-up over its 1-GPU run (``speedup``, target >= 0.9 N: 1.8 on 2
    GPUs), scaling efficiency (speed-up / N), host memory over the 1-GPU run (``host_ratio``, target <= 1.15: one
    host copy of the model for all ranks), and against DeepSpeed ZeRO-3 offload at the same N. The 2-GPU keys of
    the first version (``scaling``, ``host_ratio``, ``stream_vs_deepspeed_*``) stay, from ``by_gpus["2"]``."""
    by = {r["name"]: r for r in rows if "tokens_per_s" in r}
    s: dict = {"name": "summary", "by_gpus": {}}
    one = by.get("stream:1")
    counts = sorted({int(n.split(":")[1]) for n in by})
    for n in counts:
        cur, ds = by.get(f"stream:{n}"), by.get(f"ds_z3_offload:{n}")
        d: dict = {}
        if one and cur and n > 1:
            d["speedup"] = round(cur["tokens_per_s"] / one["tokens_per_s"], 3)
            d["speedup_target"] = round(0.9 * n, 2)
            d["efficiency"] = round(d["speedup"] / n, 3)
            d["host_ratio"] = round(cur["host_used_gib"] / one["host_used_gib"], 3)
            d["host_ratio_target"] = 1.15
            d["host_ratio_train_phase"] = round(cur["phases"]["train"]["host_used_gib"] /
                                                one["phases"]["train"]["host_used_gib"], 3)
        if cur and ds:
            d["stream_vs_deepspeed_tokens_per_s"] = round(cur["tokens_per_s"] / ds["tokens_per_s"], 3)
            d["stream_vs_deepspeed_host_used"] = round(cur["host_used_gib"] / ds["host_used_gib"], 3)
        if ds and by.get("ds_z3_offload:1") and n > 1:
            d["deepspeed_speedup"] = round(ds["tokens_per_s"] / by["ds_z3_offload:1"]["tokens_per_s"], 3)
        if d:
            s["by_gpus"][str(n)] = d
    two = s["by_gpus"].get("2", {})
    if "speedup" in two:
        s.update(scaling=two["speedup"], scaling_target=1.8, host_ratio=two["host_ratio"], host_ratio_target=1.15,
                 host_ratio_train_phase=two["host_ratio_train_phase"])
    for k in ("stream_vs_deepspeed_tokens_per_s", "stream_vs_deepspeed_host_used"):
        if k in two:
            s[k] = two[k]
    return s


def parse_runs(runs: str) -> list[str]:
    """``MODE:GPUS,...`` checked: modes stream / ds_z3_offload, GPUS a positive integer."""
    out = []
    for spec in (x.strip() for x in runs.split(",")):
        if not spec:
            continue
        mode, _, n = spec.partition(":")
        if mode not in ("stream", "ds_z3_offload") or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--runs: {spec!r} is not MODE:GPUS (modes stream, ds_z3_offload; GPUS >= 1), "
                             "e.g. stream:1,stream:4,ds_z3_offload:4")
        out.append(f"{mode}:{int(n)}")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.worker:
        worker(a)
        return 0
    import torch

    runs = parse_runs(a.runs)
    need = max(int(r.split(":")[1]) for r in runs)
    if not a.smoke and torch.cuda.device_count() < need:
        raise SystemExit(f"{a.runs} needs {need} GPUs, this machine has {torch.cuda.device_count()}: ask for fewer "
                         "(--runs), or run with --smoke for the CPU check")
    command = "python bench/stream_multigpu.py " + " ".join(argv)
    work = Path(a.out).with_suffix("") if a.out else Path("/tmp/stream_multigpu")
    work = work.parent / (work.name + "-runs")
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for spec in runs:
        left = None if a.budget_s is None else a.budget_s - (time.perf_counter() - t_start)
        if left is not None and left < 60:
            mode, gpus = spec.split(":")
            rows.append({"name": spec, "mode": mode, "gpus": int(gpus), "skipped": f"budget: {max(left, 0):.0f} s of "
                         f"--budget-s {a.budget_s:.0f} left", "command": command})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "command"}), flush=True)
        else:
            rows.append(launch(a, spec, work, command, None if left is None else min(a.timeout, left)))
        write_rows(a.out, command, a.smoke, rows)
    rows.append(summary(rows))
    write_rows(a.out, command, a.smoke, rows)
    print(json.dumps(rows[-1]))
    print("\n| run | GPUs | tokens/s | step s | stash_every | peak GPU alloc GiB | host used GiB (build / train) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows[:-1]:
        ph = r.get("phases", {})
        host = (f"{r.get('host_used_gib')} ({ph.get('build', {}).get('host_used_gib')} / "
                f"{ph.get('train', {}).get('host_used_gib')})") if "host_used_gib" in r else "-"
        print(f"| {r['name']} | {r['gpus']} | {r.get('tokens_per_s', '-')} | {r.get('step_s_median', '-')} | "
              f"{r.get('stash_every', '-')} | {r.get('peak_gpu_allocated_gib', '-')} | {host} | "
              f"{r.get('skipped') or r.get('error') or ''} |")
    for n, d in rows[-1]["by_gpus"].items():
        print(f"{n} GPUs: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
