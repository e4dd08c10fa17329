"""Issue 14 benchmark: the stream engine's SSD tier against its RAM tier on the same model and settings, in one
invocation on one GPU (each run its own process: stream_bench.py's worker, host memory of the whole process
tree, tokens/s of the median steady step, peak ``torch.cuda.max_memory_allocated``).

    python bench/ssd_bench.py --offload_dir /path/on/nvme/ssd_bench --out bench/results/ssd_7b.json   # one H200
    python bench/ssd_bench.py --smoke        # tiny shape on the CPU, offload_dir in a temporary folder

Default: Llama-2-7B shape (``--layers`` 32), seq 2048, micro-batch 4, GA 8, the compact tier (bf16 masters, 4-bit
states, 8-bit stored gradients), GPU cap 8 GiB, declared host budget 32 GiB, ``--steps`` 3 (the first is not
timed). Runs, in order: ``ram`` (masters and states in host RAM) and ``ssd`` (the same, in per-block files in
``--offload_dir``: host RAM holds only the window of blocks). One JSON row per run, then a ``summary`` row:
``speed_ratio`` (SSD tokens/s over RAM), ``host_ratio`` (host_used_gib SSD over RAM), the disk traffic per step and
the disk's rates as the engine measured them, and whether the training losses agree. The block files are removed
at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import one_gpu
from stream_bench import _child, _write


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offload_dir", "--offload-dir", default=None,
                   help="a folder on the SSD to measure (created; its block files removed at the end)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4, help="micro-batch")
    p.add_argument("--ga", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--tier", default="compact", choices=("compact", "exact", "stream"),
                   help="stream_bench.py's engine mode: compact tier, exact tier, or fp32 masters with --states")
    p.add_argument("--states", default="8bit", help="optimizer states of --tier stream")
    p.add_argument("--cap_gib", "--cap-gib", type=float, default=8.0, help="GPU memory cap")
    p.add_argument("--host_gib", "--host-gib", type=float, default=None,
                   help="host budget declared to the engine (default: stream_bench.py's for the tier)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (forked)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--runs", default="ram,ssd", help="which runs, in order (ram, ssd); the summary needs both")
    p.add_argument("--keep", action="store_true", help="keep the SSD tier's block files")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script only)")
    a = p.parse_args(argv)
    if a.smoke:
        a.seq, a.mb, a.ga, a.steps, a.layers = 32, 2, 2, 3, 2
    elif not a.offload_dir:
        p.error("--offload_dir is required (a folder on the SSD to measure); --smoke uses a temporary one")
    return a


def summary(ram: dict, ssd: dict) -> dict:
    row: dict = {"name": "summary"}
    if "tokens_per_s" in ram and "tokens_per_s" in ssd:
        row["speed_ratio"] = round(ssd["tokens_per_s"] / ram["tokens_per_s"], 3)
    if ram.get("host_used_gib") and ssd.get("host_used_gib"):
        row["host_ratio"] = round(ssd["host_used_gib"] / ram["host_used_gib"], 3)
        row["host_saved_gib"] = round(ram["host_used_gib"] - ssd["host_used_gib"], 2)
    if "train_loss" in ram and "train_loss" in ssd:
        row["train_loss_diff"] = round(abs(ram["train_loss"] - ssd["train_loss"]), 6)
    note = ssd.get("disk_note") or {}
    if note:
        row.update(disk_read_gb_per_step=round(note["read_bytes"] / 1e9, 2),
                   disk_write_gb_per_step=round(note["write_bytes"] / 1e9, 2),
                   disk_read_gbps=note.get("read_gbps"), disk_write_gbps=note.get("write_gbps"),
                   disk_s_per_step=note.get("disk_s"), step_s_ssd=ssd.get("step_s_median"),
                   step_s_ram=ram.get("step_s_median"))
    return row


def main(argv=None) -> None:
    one_gpu()
    a = parse(argv)
    command = "python " + " ".join(sys.argv)
    tmp = tempfile.mkdtemp(prefix="ssd_bench_") if a.smoke or not a.offload_dir else None
    ssd_dir = os.path.abspath(a.offload_dir or os.path.join(tmp, "offload"))
    os.makedirs(ssd_dir, exist_ok=True)
    # what stream_bench.py's _child reads from its namespace
    a.real_path, a.real_optimizer = None, "adamw"
    a.out_dir = os.path.join(tmp or ssd_dir, "trainer_out")
    rows = []
    try:
        wanted = [r.strip() for r in a.runs.split(",") if r.strip()]
        if not wanted or set(wanted) - {"ram", "ssd"}:
            raise SystemExit(f"--runs {a.runs!r}: expected ram, ssd or ram,ssd")
        for name, where in (("ram", None), ("ssd", ssd_dir)):
            if name not in wanted:
                continue
            a.offload_dir = where
            row = _child(a, a.tier, a.layers, a.ga, command)
            row["run"], row["name"] = name, f"{a.tier}:{name}"
            rows.append(row)
            _write(a.out, command, a.smoke, rows)  # after every run, so a killed command keeps what it measured
    finally:
        if not a.keep:
            for f in os.listdir(ssd_dir):
                if f.startswith(("block-", "grad-")) and f.endswith(".bin"):
                    os.remove(os.path.join(ssd_dir, f))
            shutil.rmtree(a.out_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(rows) == 2:
        rows.append(summary(rows[0], rows[1]))
        _write(a.out, command, a.smoke, rows)
        print(json.dumps(rows[-1]), flush=True)
    print("\n| run | peak GPU alloc GiB | host used GiB | tokens/s | step s | SSD files GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["name"] == "summary":
            continue
        print(f"| {r['run']} | {r.get('peak_gpu_allocated_gib')} | {r.get('host_used_gib')} | "
              f"{r.get('tokens_per_s', r.get('error'))} | {r.get('step_s_median')} | {r.get('offload_file_gib', '-')} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
