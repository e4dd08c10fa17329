"""Issue 14 benchmark: the stream engine's SSD tier against its RAM tier and against the 7B ceiling, in one
invocation on one GPU (each run its own process: stream_bench.py's worker, host memory of the whole process
tree, tokens/s of the median timed step, peak ``torch.cuda.max_memory_allocated``).

    # the issue's proof in one call (nvidia-h200-x2, one GPU used; ~8 min, see the durations below)
    python bench/ssd_bench.py --runs ceiling,ssd13b,ram,ssd --offload_dir /path/on/nvme/ssd_bench --out ssd_13b.json
    python bench/ssd_bench.py --offload_dir /path/on/nvme/ssd_bench --out ssd_7b.json    # ram,ssd only
    python bench/ssd_bench.py --smoke --runs ceiling,ram,ssd,ssd13b   # tiny shapes on the CPU (checks the script)

Runs (``--runs``, in the order given; default ``ram,ssd``):

  ceiling  stream_bench.py's ceiling on ``--shape`` (default llama2-7b): a plain Trainer, bf16 weights on the GPU,
           fused AdamW, no checkpointing, no GPU cap. Its 6N TFLOP/s is what the others are measured against.
  ram      the stream engine's ``--tier`` (default compact: bf16 masters, 4-bit states, 8-bit stored gradients) on
           ``--shape``, masters and states in host RAM, at GPU cap ``--cap_gib`` and host budget ``--host_gib``
  ssd      the same, masters and states in per-block files in ``--offload_dir``/ssd (host RAM holds a window)
  ssd13b   the SSD tier on ``--shape13`` (default llama2-13b: 40 layers, hidden 5120, MLP 13824, 40 heads) with
           ``--ga13`` (default 7: the most that fits 8 GiB GPU + 32 GiB host by the engine's memory model,
           docs/ssd-tier.md), files in ``--offload_dir``/ssd13b

Shapes come from the planner's presets (``hf_lowmem.planner.shapes.PRESETS``); ``--layers`` / ``--layers13`` slice
them. Every run: seq ``--seq`` 2048, micro-batch ``--mb`` 4, ``--steps`` 3 optimizer steps (the first is not timed;
the step time is the median of the others), 2 forked DataLoader workers. The rows are written to ``--out`` after
every run. Each run has ``--timeout`` seconds, and the whole sequence ``--deadline`` seconds (default 540, so a
10-minute call keeps its rows): a run gets at most what is left, and its worker ends training after a step when
another would not fit (the row then says ``stopped_early``, with fewer steps) rather than be killed with nothing.
A run with under 60 s left is skipped. Block files are removed after each SSD run (``--keep`` keeps them).

The last row, ``summary``: each run's ``tflops_6N``, tokens/s, step time and host memory; each run's TFLOP/s over
the ceiling's (``vs_ceiling``; the issue's target is ssd13b >= 0.5, ``target_met``); RAM against SSD at 7B
(``speed_ratio``, ``host_ratio``, ``train_loss_diff``); and per SSD run its disk account (``disk``): bytes read and
written per step (the engine's prediction and the measured I/O), the disk's rates, disk seconds against compute
seconds and idle, the TFLOP/s the disk alone allows, and the combined disk GB/s that would reach the target.

Expected durations on one H200 of nvidia-h200-x2 (2.1 GB/s O_DIRECT disk), from the 2026-11-30 measurements, at
the defaults (3 steps):
  ceiling  7B   ~45 s   (start ~15 s, first step ~8.5 s, then ~5.8 s per step)
  ram      7B   ~80 s   (build 21 s, first step 12.6 s, then 9.7 s per step)
  ssd      7B  ~130 s   (build 21 s, files adopted ~15 s, 23-28 s per step)
  ssd13b  13B  ~245 s   (build ~40 s, files adopted ~30 s, ~50 s per step at GA 7: the planner's 50.1 s)
  the four: ~500 s, under the 540 s deadline; if the 13B steps run slower than planned, the deadline trims the
  last run to fewer steps. Without ceiling/ram (ssd,ssd13b) ~380 s; ceiling,ram,ssd alone ~255 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import one_gpu, write_rows
from stream_bench import _child

RUNS = ("ceiling", "ram", "ssd", "ssd13b")
#: seconds a worker keeps, after the step it stops at, to finish and print its row (the parent kills it at its timeout)
STOP_MARGIN_S = 25
#: a run with less than this left of --deadline is skipped
MIN_RUN_S = 60
TARGET = 0.5  # issue 14: the 13B SSD run's TFLOP/s over the 7B ceiling's


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offload_dir", "--offload-dir", default=None,
                   help="a folder on the SSD to measure (created; its block files removed after each run)")
    p.add_argument("--runs", default="ram,ssd", help=f"which runs, in this order: some of {','.join(RUNS)}")
    p.add_argument("--shape", default="llama2-7b", help="model preset of ceiling, ram and ssd (hf_lowmem.planner)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of --shape (default: all)")
    p.add_argument("--ga", type=int, default=8, help="gradient accumulation of ceiling, ram and ssd")
    p.add_argument("--shape13", default="llama2-13b", help="model preset of ssd13b")
    p.add_argument("--layers13", type=int, default=None, help="decoder layers of --shape13 (default: all)")
    p.add_argument("--ga13", type=int, default=7, help="gradient accumulation of ssd13b (7 fits 32 GiB at 13B)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4, help="micro-batch")
    p.add_argument("--tier", default="compact", choices=("compact", "exact", "stream"),
                   help="stream_bench.py's engine mode: compact tier, exact tier, or fp32 masters with --states")
    p.add_argument("--states", default="8bit", help="optimizer states of --tier stream")
    p.add_argument("--cap_gib", "--cap-gib", type=float, default=8.0, help="GPU memory cap of the engine runs")
    p.add_argument("--host_gib", "--host-gib", type=float, default=None,
                   help="host budget declared to the engine (default: stream_bench.py's for the tier, compact 32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (forked)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run at most")
    p.add_argument("--deadline", type=int, default=540,
                   help="seconds for the whole sequence (0: none); each run gets at most what is left")
    p.add_argument("--keep", action="store_true", help="keep the SSD tier's block files")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (the presets scaled down, 13B keeping more layers than 7B)")
    a = p.parse_args(argv)
    a.wanted = [r.strip() for r in a.runs.split(",") if r.strip()]
    bad = [r for r in a.wanted if r not in RUNS]
    if not a.wanted or bad or len(set(a.wanted)) != len(a.wanted):
        p.error(f"--runs {a.runs!r}: expected some of {', '.join(RUNS)}, each once")
    if a.smoke:
        a.seq, a.mb, a.ga, a.ga13, a.steps = 32, 2, 2, 1, 3  # ga13 differs from ga: checks it goes through
    elif not a.offload_dir and {"ssd", "ssd13b"} & set(a.wanted):
        p.error("--offload_dir is required (a folder on the SSD to measure); --smoke uses a temporary one")
    return a


def _ratio(x, y, nd: int = 3):
    return round(x / y, nd) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None


def flops_per_s(row: dict) -> float | None:
    """A run's 6N FLOP/s, unrounded where the row has its parameter count (the row's ``tflops_6N`` is rounded to
    0.1, which is 0.0 for the smoke's tiny shapes)."""
    if row.get("params") and row.get("tokens_per_s"):
        return 6 * row["params"] * row["tokens_per_s"]
    return row["tflops_6N"] * 1e12 if row.get("tflops_6N") else None


def disk_account(row: dict, ceiling_tflops: float | None = None) -> dict:
    """Where an SSD run's step goes, per optimizer step: the engine's predicted bytes and disk seconds
    (``disk_note``), the measured I/O (``io_stats`` over all the run's steps, divided by their number), the measured
    compute and idle (``breakdown_per_step``, timed steps), and what the disk allows."""
    note, io, bd = row.get("disk_note") or {}, row.get("io_stats") or {}, row.get("breakdown_per_step") or {}
    n = len(row.get("step_times_s") or [])
    acc: dict = {"step_s": row.get("step_s_median")}
    if note:
        acc.update(predicted_read_gb=round(note["read_bytes"] / 1e9, 2),
                   predicted_write_gb=round(note["write_bytes"] / 1e9, 2),
                   read_gbps=note.get("read_gbps"), write_gbps=note.get("write_gbps"), disks=note.get("disks"),
                   predicted_disk_s=note.get("disk_s"), predicted_compute_s=note.get("compute_s"))
    if io and n:
        acc.update(read_gb=round(io.get("read_bytes", 0) / n / 1e9, 2), write_gb=round(io.get("write_bytes", 0) / n / 1e9, 2),
                   wait_for_reads_s=round(io.get("wait_s", 0.0) / n, 2),
                   read_busy_s=round(io.get("read_busy_s", 0.0) / n, 2),  # summed over the I/O threads
                   write_busy_s=round(io.get("write_busy_s", 0.0) / n, 2))
    for k in ("compute_s", "idle_s", "h2d_busy_s", "d2h_busy_s"):
        if k in bd:
            acc[k] = bd[k]
    disk_s, step_s, tflops = acc.get("predicted_disk_s"), acc["step_s"], row.get("tflops_6N")
    if disk_s and step_s and tflops:
        acc["disk_bound"] = disk_s > (acc.get("compute_s") or acc.get("predicted_compute_s") or 0)
        acc["disk_limited_tflops_6N"] = round(tflops * step_s / disk_s, 1)  # if the disk were the only cost
    if ceiling_tflops and step_s and tflops and "predicted_read_gb" in acc:
        target_step_s = step_s * tflops / (TARGET * ceiling_tflops)
        acc["target_step_s"] = round(target_step_s, 2)
        # the combined rate that would move a step's bytes in the target step time
        acc["disk_gbps_for_target"] = round((acc["predicted_read_gb"] + acc["predicted_write_gb"]) / target_step_s, 2)
    return acc


def summary(rows: list[dict]) -> dict:
    by = {r["run"]: r for r in rows if r.get("run") in RUNS and "error" not in r}
    row: dict = {"name": "summary"}
    for key in ("tflops_6N", "tokens_per_s", "step_s_median", "host_used_gib", "peak_gpu_allocated_gib"):
        row[key] = {name: r.get(key) for name, r in by.items()}
    row["host_within_budget"] = {name: r["host_used_gib"] <= r["host_budget_gib"] for name, r in by.items()
                                 if r.get("host_used_gib") and r.get("host_budget_gib")}
    ceiling = flops_per_s(by["ceiling"]) if "ceiling" in by else None
    if ceiling:
        row["vs_ceiling"] = {name: _ratio(flops_per_s(r), ceiling) for name, r in by.items() if name != "ceiling"}
        if "ssd13b" in by:
            row["ssd13b_vs_ceiling"] = row["vs_ceiling"]["ssd13b"]
            row["target"] = TARGET
            row["target_met"] = (row["ssd13b_vs_ceiling"] or 0) >= TARGET
    ram, ssd = by.get("ram"), by.get("ssd")
    if ram and ssd:
        row["speed_ratio"] = _ratio(ssd.get("tokens_per_s"), ram.get("tokens_per_s"))
        row["host_ratio"] = _ratio(ssd.get("host_used_gib"), ram.get("host_used_gib"))
        if ram.get("host_used_gib") and ssd.get("host_used_gib"):
            row["host_saved_gib"] = round(ram["host_used_gib"] - ssd["host_used_gib"], 2)
        if "train_loss" in ram and "train_loss" in ssd:
            row["train_loss_diff"] = round(abs(ram["train_loss"] - ssd["train_loss"]), 6)
    ceiling_tflops = by["ceiling"].get("tflops_6N") if "ceiling" in by else None
    disk = {name: disk_account(by[name], ceiling_tflops if name == "ssd13b" else None) for name in ("ssd", "ssd13b")
            if name in by}
    if disk:
        row["disk"] = disk
    skipped = [r["run"] for r in rows if "error" in r]
    if skipped:
        row["missing"] = skipped
    return row


def _remove_blocks(folder: str) -> None:
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(("block-", "grad-")) and f.endswith((".bin", ".bin.new")):
                os.remove(os.path.join(folder, f))


def main(argv=None) -> None:
    one_gpu()
    a = parse(argv)
    t_start = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    tmp = tempfile.mkdtemp(prefix="ssd_bench_") if a.smoke or not a.offload_dir else None
    root = os.path.abspath(a.offload_dir or os.path.join(tmp, "offload"))
    # what stream_bench.py's _child reads from its namespace
    a.real_path, a.real_optimizer, a.stop_margin = None, "adamw", STOP_MARGIN_S
    a.out_dir = os.path.join(tmp or root, "trainer_out")
    plan = {"ceiling": ("ceiling", a.shape, a.layers, a.ga, None),
            "ram": (a.tier, a.shape, a.layers, a.ga, None),
            "ssd": (a.tier, a.shape, a.layers, a.ga, os.path.join(root, "ssd")),
            "ssd13b": (a.tier, a.shape13, a.layers13, a.ga13, os.path.join(root, "ssd13b"))}
    rows: list[dict] = []
    try:
        for name in a.wanted:
            mode, a.shape_run, layers, ga, where = plan[name]
            left = a.deadline - (time.perf_counter() - t_start) if a.deadline else a.timeout
            if left < MIN_RUN_S:
                row = {"name": name, "run": name, "error": f"skipped: {left:.0f} s left of --deadline {a.deadline}"}
                print(json.dumps(row), flush=True)
            else:
                a.run_timeout = int(min(a.timeout, left))
                a.offload_dir, a.shape = where, a.shape_run
                if where:
                    os.makedirs(where, exist_ok=True)
                row = _child(a, mode, layers or 0, ga, command)
                row["run"] = name
                row["name"] = "ceiling" if mode == "ceiling" else f"{a.tier}:{name}"
                row["run_timeout_s"] = a.run_timeout
                if where and not a.keep:
                    _remove_blocks(where)  # frees the disk for the next run
            rows.append(row)
            write_rows(a.out, command, a.smoke, rows)  # after every run, so a killed command keeps what it measured
    finally:
        if not a.keep:
            for sub in ("ssd", "ssd13b"):
                _remove_blocks(os.path.join(root, sub))
            shutil.rmtree(a.out_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rows.append(summary(rows))
    rows[-1]["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_rows(a.out, command, a.smoke, rows)
    print(json.dumps(rows[-1]), flush=True)
    print("\n| run | shape | layers | GA | peak GPU alloc GiB | host used GiB | tokens/s | step s | TFLOP/s (6N) | "
          "SSD files GiB | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows[:-1]:
        print(f"| {r['run']} | {r.get('shape')} | {r.get('layers')} | {r.get('grad_accum')} | "
              f"{r.get('peak_gpu_allocated_gib')} | {r.get('host_used_gib')} | {r.get('tokens_per_s', r.get('error'))} | "
              f"{r.get('step_s_median')} | {r.get('tflops_6N')} | {r.get('offload_file_gib', '-')} | {r.get('wall_s')} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
