"""Multi-GPU scaling of LowMemTrainer: throughput from 1 to N GPUs and memory per GPU, for a 1B-7B
Llama-shaped model, under DDP, FSDP2 and DeepSpeed ZeRO, launched with ``accelerate launch`` and the
configs in ``examples/accelerate/``.

Run on 2 H200s (2026-11-29): ``bench/results/multigpu-1b.{json,md}`` (1B: DDP, FSDP2, ZeRO-2, ZeRO-3 on
1 and 2 GPUs) and ``bench/results/multigpu-1b-galore-layerwise.{json,md}`` (GaLore 8-bit layer-wise +
checkpointing under DDP); the commands are in the files. Larger machines and 7B: not run yet; the commands
per machine kind, with their expected durations, are in ``notes/multigpu-next.md``.
It is also checked end to end on the CPU with ``--smoke`` (gloo, tiny model).

    # 7B on 2 GPUs: the plain modes, ZeRO-3 with CPU offload, and the plugin combination under FSDP2 / ZeRO-3
    python bench/multigpu.py --model 7b --gpus 1,2 --steps 8 --warmup 3 --budget-s 560 \
        --modes ddp,fsdp2,zero3,fsdp2+8bit-ckpt-sdpa,zero3+8bit-ckpt-sdpa
    # 1B, every mode, 20 timed steps per run:
    python bench/multigpu.py --model 1b --steps 25 --warmup 5
    # CPU check of the whole pipeline (gloo, a tiny model, 1 and 2 processes; ~1-2 min on 2 cores):
    python bench/multigpu.py --smoke

Runs (``--modes``): ``MODE`` or ``MODE+PRESET``. ``MODE`` is ``single`` (single_gpu.yaml; 1 GPU), ``ddp``
(ddp.yaml; 1 GPU runs use single_gpu.yaml, as accelerate needs 2+ processes for MULTI_GPU), ``fsdp2``,
``zero2``, ``zero3``, ``zero3-offload`` (deepspeed_zero3_offload.yaml for the launch, and the DeepSpeed config
of ``stream_bench.ds_z3_offload_config()``: parameters and optimizer in pinned CPU memory, the recipe the
stream engine is compared with). ``PRESET`` names a plugin set (:data:`PRESETS`, e.g. ``8bit-ckpt-sdpa`` =
bnb-adamw8bit + gradient-checkpointing + sdpa); without one, the run uses ``--optimizer`` / ``--offload`` /
``--attention`` / ``--quantization``.

Before launching, the parent checks each run as the ranks would, and records a row instead of launching:
* ``refused``: a selected plugin does not declare the run's distributed mode (``hf_lowmem.context.
  resolve_selection``, the same check and message every rank would raise; e.g. bnb 8-bit optimizers under
  FSDP2, whose DTensor parameters bitsandbytes does not take);
* ``does not fit``: single/DDP, and ZeRO-2/3 without offload on one GPU (which shards nothing), when the
  planner's GPU estimate of one rank (``hf_lowmem.planner.estimate_memory``; plus DDP's gradient buckets, 4 bytes
  per parameter, which the planner does not count) exceeds the GPU's memory (7B with AdamW: 154.5 GiB before the
  buckets, bench/results/multigpu-7b.md, more than an H200's 139.8 GiB).
  ``--no-precheck`` launches them anyway (an out-of-memory is then recorded as the run's error).
``--budget-s`` stops launching runs once the sweep's elapsed time would leave less than a run's timeout
(rows say ``not run: budget``), so that one command stays under the device machine's 10-minute limit.

For each run it starts one ``accelerate launch`` (a fresh process group, so one out-of-memory or crash is
recorded and the sweep goes on). Every rank measures its own step times (after ``--warmup`` steps,
CUDA-synchronised) and its peak memory (``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, and
its own host RSS); the parent samples the host memory of the launcher's whole process tree
(``bench/hostmem.py``: every rank and worker, shared and page-locked pages counted once). The table reports
tokens/s for the whole job, the scaling efficiency against the 1-GPU run of the same run name (or of
``--baseline``, the JSON of an earlier sweep), the largest per-GPU peak and the tree's host peak. Results go
to ``--out`` (default ``bench/results/``) as JSON and Markdown, with the command that made them; the JSON is
rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import random_tokens, step_timer
from hostmem import HostMemSampler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
MODE_CONFIG = {
    "single": "single_gpu.yaml", "ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml", "zero3-offload": "deepspeed_zero3_offload.yaml",
}
#: named plugin sets, used as ``MODE+PRESET`` in --modes
PRESETS = {
    "8bit-ckpt-sdpa": {"optimizer": "bnb-adamw8bit", "offload": "gradient-checkpointing", "attention": "sdpa"},
}
PLUGIN_FLAGS = ("optimizer", "offload", "attention", "quantization", "options")
#: hf-lowmem's distributed mode (hf_lowmem.context.distributed_mode) of each launch config
HF_MODE = {"single": "single", "ddp": "ddp", "fsdp2": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed",
           "zero3-offload": "deepspeed"}
GiB = 2**30
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
    p.add_argument("--modes", default=None, help=f"comma-separated runs MODE or MODE+PRESET; modes {', '.join(MODE_CONFIG)}; "
                                                   f"presets {', '.join(PRESETS)} (default ddp,fsdp2,zero2,zero3; "
                                                   "--smoke: ddp,fsdp2,fsdp2+8bit-ckpt-sdpa,ddp+8bit-ckpt-sdpa)")
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
    p.add_argument("--budget-s", type=float, default=None,
                   help="launch no run that could end after this many seconds of the sweep (default: no limit)")
    p.add_argument("--baseline", default=None, help="JSON of an earlier sweep whose 1-GPU rows are the scaling "
                                                    "base for runs this sweep has no 1-GPU row of")
    p.add_argument("--no-precheck", action="store_true", help="launch runs the plugin-mode or fit check refuses")
    p.add_argument("--out", default=None, help="results folder (default bench/results; out/bench for --smoke)")
    # internal: what each launched rank runs
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-mode", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.modes, a.gpus = a.modes or ("" if a.smoke else "ddp,fsdp2,zero2,zero3"), a.gpus or ("" if a.smoke else "1,2,4,8")
    if a.smoke:
        a.model, a.gpus = "tiny", a.gpus or "1,2"
        a.modes = a.modes or "ddp,fsdp2,fsdp2+8bit-ckpt-sdpa,ddp+8bit-ckpt-sdpa"
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
        **_deepspeed_override(a.run_mode, cuda and a.precision == "bf16"),
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


def _deepspeed_override(run_mode: str | None, bf16: bool) -> dict:
    """``zero3-offload``: stream_bench.py's DeepSpeed config (params and optimizer in pinned CPU memory) in the
    arguments. accelerate refuses a DeepSpeed config beside the launch config's own ZeRO fields
    (``ACCELERATE_CONFIG_DS_FIELDS``), so the config file only starts DeepSpeed and this config decides."""
    if run_mode != "zero3-offload":
        return {}
    from stream_bench import ds_z3_offload_config

    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    config = ds_z3_offload_config()
    config["bf16"] = {"enabled": bf16}
    return {"deepspeed": config}


# ---- the sweep ----------------------------------------------------------------------------------------------------
def parse_run(spec: str) -> tuple[str, dict]:
    """``MODE`` or ``MODE+PRESET`` -> (mode, preset plugin flags or {} for the command line's)."""
    mode, _, preset = spec.partition("+")
    if mode not in MODE_CONFIG:
        raise SystemExit(f"unknown mode {mode!r} in {spec!r}; modes are {', '.join(MODE_CONFIG)}")
    if preset and preset not in PRESETS:
        raise SystemExit(f"unknown plugin preset {preset!r} in {spec!r}; presets are {', '.join(PRESETS)}")
    return mode, dict(PRESETS[preset]) if preset else {}


def run_plugins(a: argparse.Namespace, preset: dict) -> dict:
    """The plugin flags of one run: its preset's, else the command line's."""
    return {f: preset.get(f) if preset else getattr(a, f) for f in PLUGIN_FLAGS}


def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the run cannot happen
        return f"deepspeed is not installed here ({type(e).__name__}: {str(e)[:120]})"
    return None


def precheck(a: argparse.Namespace, mode: str, nproc: int, plugins: dict, gpu_bytes: int | None) -> tuple[str, str] | None:
    """What the ranks would refuse, found before launching: ``("refused", the plugin's own message)`` when a
    plugin does not declare the run's distributed mode or the selection is invalid; ``("skipped", why)``
    without deepspeed for a ZeRO mode; ``("does not fit", estimate)`` for single/DDP (and ZeRO on one GPU) when the
    planner's GPU estimate of one rank exceeds ``gpu_bytes`` (:func:`_fit_check`). ``None``: launch it."""
    from hf_lowmem.context import resolve_selection
    from hf_lowmem.errors import PluginError
    from hf_lowmem.plugins import get_plugin_host

    hf_mode = "single" if (mode == "ddp" and nproc == 1) else HF_MODE[mode]
    requested = {"optimizer": [plugins["optimizer"]] if plugins["optimizer"] else [],
                 "quantization": [plugins["quantization"]] if plugins["quantization"] else [],
                 "attention": [plugins["attention"]] if plugins["attention"] else [],
                 "offload": [x.strip() for x in (plugins["offload"] or "").split(",") if x.strip()]}
    raw = json.loads(plugins["options"]) if plugins["options"] else {}
    host = get_plugin_host()
    try:
        sel = resolve_selection(host, requested, raw, hf_mode)
    except PluginError as e:
        return "refused", f"{type(e).__name__}: {e}"
    # ZeRO without offload on one GPU shards nothing: judged as the single-GPU step (7B zero3 on one H200 ran out
    # of memory at 138.25 GiB allocated, bench/results/multigpu-7b.md)
    fit_mode = "single" if (mode in ("zero2", "zero3") and nproc == 1) else hf_mode
    if fit_mode in ("single", "ddp") and gpu_bytes:
        verdict = _fit_check(a, fit_mode, sel, host, gpu_bytes)
        if verdict:
            return verdict
    if hf_mode == "deepspeed":
        missing = _deepspeed_missing()
        if missing:
            return "skipped", missing
    return None


def _fit_check(a: argparse.Namespace, fit_mode: str, sel, host, gpu_bytes: int) -> tuple[str, str] | None:
    """``("does not fit", estimate)`` when the planner's GPU estimate of one rank in ``fit_mode`` (single or DDP,
    plus DDP's gradient buckets) exceeds ``gpu_bytes``; ``("refused", why)`` when the planner refuses the run."""
    from transformers import LlamaConfig

    from hf_lowmem.errors import PluginError
    from hf_lowmem.planner.estimate import estimate_memory
    from hf_lowmem.planner.inputs import PlanInput, TrainSetup
    from hf_lowmem.planner.shapes import shape_from_config

    config = LlamaConfig(max_position_embeddings=max(a.seq_len, 128), tie_word_embeddings=False, **SHAPES[a.model])
    shape = shape_from_config(config)
    setup = TrainSetup(micro_batch=a.micro_batch, seq_len=a.seq_len, grad_accum=a.grad_accum,
                       precision="bf16-mixed" if a.precision == "bf16" else "fp32",
                       gradient_checkpointing=False)
    inp = PlanInput(shape, setup, {k: tuple(v) for k, v in sel.by_kind.items()}, sel.options, mode=fit_mode)
    try:
        est = estimate_memory(inp, host)
    except PluginError as e:
        return "refused", f"{type(e).__name__}: {e}"
    n_params = sum(p.numel() for p in _meta_model(config).parameters())
    buckets = 4 * n_params if fit_mode == "ddp" else 0  # DDP's gradient buckets (fp32 grads), not in the planner
    need = est.gpu_total + buckets
    if need > gpu_bytes:
        return "does not fit", (f"the planner estimates {need / GiB:.1f} GiB per GPU ({est.gpu_total / GiB:.1f} GiB for the "
                                f"step of {inp.label()}" + (f" + {buckets / GiB:.1f} GiB of DDP gradient buckets" if buckets
                                                            else "") + f") > {gpu_bytes / GiB:.1f} GiB on this GPU")
    return None


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def launch_one(a: argparse.Namespace, name: str, mode: str, nproc: int, plugins: dict, workdir: Path, timeout: float) -> dict:
    config = MODE_CONFIG["single" if (mode == "ddp" and nproc == 1) else mode]
    result = workdir / f"{name}-{nproc}"
    for old in workdir.glob(f"{name}-{nproc}.rank*.json"):
        old.unlink()
    worker_args = ["--worker", "--result", str(result), "--run-mode", mode, "--model", a.model, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--micro-batch", str(a.micro_batch), "--grad-accum", str(a.grad_accum),
                   "--seq-len", str(a.seq_len), "--precision", a.precision]
    for flag in PLUGIN_FLAGS:
        if plugins[flag]:
            worker_args += [f"--{flag}", plugins[flag]]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(nproc), "--mixed_precision", a.precision, "--main_process_port", "0",
           str(Path(__file__).resolve()), *worker_args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    log_path = workdir / f"{name}-{nproc}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        hm = HostMemSampler(pid=proc.pid, interval=0.5).start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank (their own session)
            proc.wait()
            rc = f"timeout after {timeout:.0f}s"
        hm.stop()
    tail = log_path.read_text(errors="replace")[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"{name}-{nproc}.rank*.json"))]
    host = hm.result()
    row = {"name": name, "mode": mode, "plugins": {k: v for k, v in plugins.items() if v}, "config": config,
           "processes": nproc, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "host_tree_gib": host.get("host_used_gib"), "host_tree_rss_gib": host.get("tree_rss_peak_gib"), "ranks": ranks}
    if rc != 0 or len(ranks) != nproc:
        row["status"] = "oom" if "OutOfMemoryError" in tail or "CUDA out of memory" in tail else "failed"
        row["error"] = _error_line(tail)
        return row
    row.update(
        status="ok", world_size=ranks[0]["world_size"], params=ranks[0]["params"], hf_lowmem_mode=ranks[0]["mode"],
        tokens_per_s=min(x["tokens_per_s"] for x in ranks),  # the slowest rank sets the pace
        median_step_s=max(x["median_step_s"] for x in ranks), build_s=max(x["build_s"] for x in ranks),
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


def scaling_base(rows: list[dict], baseline: list[dict] | None = None) -> dict[str, float]:
    """Run name -> tokens/s of its 1-GPU row: this sweep's, else the baseline's."""
    # rows of sweeps before run names existed carry only their mode
    base = {r.get("name", r.get("mode")): r["tokens_per_s"] for r in (baseline or [])
            if r.get("processes") == 1 and "tokens_per_s" in r}
    base.update({r["name"]: r["tokens_per_s"] for r in rows if r["processes"] == 1 and "tokens_per_s" in r})
    return base


def table(rows: list[dict], baseline: list[dict] | None = None) -> str:
    head = ("| run | GPUs | tokens/s | scaling vs 1 GPU | step (s) | peak allocated / GPU (GiB) | peak reserved / GPU (GiB) "
            "| host, process tree (GiB) | host RSS / rank (GiB) | note |\n|---|---|---|---|---|---|---|---|---|---|")
    base = scaling_base(rows, baseline)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    out = [head]
    for r in rows:
        if "tokens_per_s" not in r:
            out.append(f"| {r['name']} | {r['processes']} | - | - | - | - | - | {fmt(r.get('host_tree_gib'))} | - "
                       f"| {r.get('status', 'failed')}: {r.get('error', '')} |")
            continue
        eff = r["tokens_per_s"] / (r["processes"] * base[r["name"]]) if r["name"] in base else None
        out.append(f"| {r['name']} | {r['processes']} | {r['tokens_per_s']:,.0f} | {'-' if eff is None else f'{eff:.0%}'} "
                   f"| {r['median_step_s']:.3f} | {fmt(r['peak_allocated_gib'])} | {fmt(r['peak_reserved_gib'])} "
                   f"| {fmt(r.get('host_tree_gib'))} | {r['peak_host_rss_gib']:.2f} | {r['config']} |")
    return "\n".join(out)


def sweep(a: argparse.Namespace, argv: list[str]) -> list[dict]:
    import torch

    runs = [(spec, *parse_run(spec)) for spec in (m.strip() for m in a.modes.split(",")) if spec]
    counts = sorted({int(x) for x in a.gpus.split(",")})
    n_gpu = torch.cuda.device_count()
    if n_gpu:
        counts = [c for c in counts if c <= n_gpu] or [1]
    elif not a.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU check")
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if n_gpu else None
    baseline = json.loads(Path(a.baseline).read_text())["rows"] if a.baseline else None
    out = Path(a.out or (ROOT / "out" / "bench" if a.smoke else ROOT / "bench" / "results"))
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/multigpu.py " + " ".join(shlex.quote(x) for x in argv)
    print(f"{command}\nmodel {a.model}, runs {[r[0] for r in runs]}, processes {counts}, "
          f"{'CPU (gloo)' if not n_gpu else f'{n_gpu} x ' + torch.cuda.get_device_name(0)}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"multigpu-{a.model}-{stamp}"
    meta = {"command": command, "model": a.model, "shape": SHAPES[a.model], "seq_len": a.seq_len,
            "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "precision": a.precision,
            "plugins": {k: getattr(a, k) for k in PLUGIN_FLAGS}, "presets": PRESETS,
            "torch": torch.__version__, "gpus": n_gpu, "rows": []}
    rows = meta["rows"]
    t_start = time.perf_counter()
    for spec, mode, preset in runs:
        plugins = run_plugins(a, preset)
        for k in counts:
            if mode == "single" and k > 1:
                continue
            row = {"name": spec, "mode": mode, "plugins": {f: v for f, v in plugins.items() if v}, "processes": k,
                   "config": MODE_CONFIG["single" if (mode == "ddp" and k == 1) else mode]}
            checked = None if a.no_precheck else precheck(a, mode, k, plugins, gpu_bytes)
            left = None if a.budget_s is None else a.budget_s - (time.perf_counter() - t_start)
            if checked:
                row.update(status=checked[0], error=checked[1])
            elif left is not None and left < min(a.timeout, 60):
                row.update(status="not run", error=f"budget: {max(left, 0):.0f} s of --budget-s {a.budget_s:.0f} left")
            else:
                row = launch_one(a, spec, mode, k, plugins, work, a.timeout if left is None else min(a.timeout, left))
            rows.append(row)
            peak = (f"peak {row['peak_allocated_gib']:.2f} GiB allocated per GPU" if row.get("peak_allocated_gib") is not None
                    else f"peak host RSS {row.get('peak_host_rss_gib', 0):.2f} GiB per rank")
            status = (f"{row['tokens_per_s']:,.0f} tokens/s, {peak}, host tree {row.get('host_tree_gib')} GiB"
                      if "tokens_per_s" in row else f"{row['status'].upper()}: {row.get('error')}")
            print(f"  {spec:24s} x{k}: {status} ({row.get('wall_s', 0)} s)", flush=True)
            (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    md = f"# {name}\n\n`{command}`\n\n{table(rows, baseline)}\n"
    (out / f"{name}.md").write_text(md)
    print("\n" + table(rows, baseline) + f"\n\nwritten: {out / name}.json, .md")
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.worker:
        worker(a)
        return 0
    rows = sweep(a, argv)
    # a refusal, a row that does not fit, a missing deepspeed or the budget is an answer; a crash is not
    return 0 if all(r.get("status") in ("ok", "refused", "does not fit", "oom", "skipped", "not run") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
