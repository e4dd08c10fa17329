"""Issue 14 on paper: what ``hf-lowmem plan`` predicts for the SSD tier, checked against the one measured run.

    python bench/ssd_planner_check.py                      # prints the rows, writes bench/results/ssd_planner_check.json
    python bench/ssd_planner_check.py --only 7b-measured   # one scenario

CPU only, no model weights: each row is one ``hf-lowmem plan`` call (its exact command is in the row), made
in-process through :func:`hf_lowmem.cli_plan.make_plan`. The planner takes one disk rate (``--disk_gbps``, used
for reads and writes alike); the rows give it the read rate and add the figures for the real write rate with
:func:`hf_lowmem.engine.estimate.disk_seconds` (``disk_s_rw``, ``step_s_rw``). Writes are never faster than reads
here, so the disk still sets the pace and the step is ``max(planned step, disk_s_rw + first block's read)``.

Per row: bytes read and written per optimizer step, the plan's step time and compute time, whether the disk sets
the pace, the accumulation at which the disk would be hidden (compute grows with it, the disk traffic does not)
and whether that accumulation still fits the budgets (``ga_hide_fits``: the same command with that
``--grad_accum``, each ``stash_every`` of 1, 2, 4 tried), TB written per 1,000 steps and the share of a
1,200 TBW drive (a typical 2 TB consumer NVMe) that uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TBW = 1200.0  # TB written a typical 2 TB consumer NVMe is rated for
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ssd_planner_check.json")

#: the measured runs, by scenario: (JSON file, row): 7B (its disk: bench/results/disk_h200x2.json) and 13B (a later
#: call; its engine's probe read 1.416 and wrote 1.83 GB/s there)
MEASURED = {"7b-measured": ("bench/results/ssd_7b_ssd.json", 0), "13b-2.1GBps": ("bench/results/ssd_13b.json", 1)}


def measured(name: str) -> dict:
    """What the measured run of scenario ``name`` logged: its step times, the mean of its timed steps, and the
    engine's own disk and compute estimate (``disk_note``)."""
    path, i = MEASURED[name]
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)) as f:
        row = json.load(f)["rows"][i]
    note = row["disk_note"]
    return {"file": path, "row": i, "step_times_s": row["step_times_s"],
            "step_s_steady_mean": row["breakdown_per_step"]["step_s_mean"], "engine_disk_s": note["disk_s"],
            "engine_compute_s": note["compute_s"], "engine_read_bytes": note["read_bytes"],
            "engine_write_bytes": note["write_bytes"]}


# name, model, gpu, host, micro-batch, accumulation, stream options, disk size, disks, read GB/s, write GB/s
SCENARIOS = [
    ("7b-measured", "llama2-7b", "8GiB", "32GiB", 4, 8, {"tier": "compact", "stash_every": 1}, "127GiB", 1, 2.1, 2.1),
    ("13b-2.1GBps", "llama2-13b", "8GiB", "32GiB", 4, 7, {"tier": "compact", "stash_every": 1}, "127GiB", 1, 2.1, 2.1),
    ("70b-gen4x1", "llama2-70b", "8GiB", "64GiB", 1, 8, {"tier": "compact", "stash_every": 1, "offload_grads": True},
     "2TB", 1, 7.0, 6.0),
    ("70b-gen4x2", "llama2-70b", "8GiB", "64GiB", 1, 8, {"tier": "compact", "stash_every": 1, "offload_grads": True},
     "2TB", 2, 7.0, 6.0),
    ("70b-gen5x1", "llama2-70b", "8GiB", "64GiB", 1, 8, {"tier": "compact", "stash_every": 1, "offload_grads": True},
     "2TB", 1, 13.0, 11.0),
    ("70b-gen5x2", "llama2-70b", "8GiB", "64GiB", 1, 8, {"tier": "compact", "stash_every": 1, "offload_grads": True},
     "2TB", 2, 13.0, 11.0),
    # the same 70B on a 12 GiB card: the 8 GiB plans above are refused for GPU memory (smallest ~9.5 GiB)
    # (13B: accumulation 7 is the most that fits 32 GiB at stash_every=1; 8 needs 32.07 GiB)
    ("70b-gen4x2-12GiB", "llama2-70b", "12GiB", "64GiB", 1, 8,
     {"tier": "compact", "stash_every": 1, "offload_grads": True}, "2TB", 2, 7.0, 6.0),
    ("70b-gen5x2-12GiB", "llama2-70b", "12GiB", "64GiB", 1, 8,
     {"tier": "compact", "stash_every": 1, "offload_grads": True}, "2TB", 2, 13.0, 11.0),
]


def plan_args(model, gpu, host, mb, ga, opts, disk_size, disks, gbps) -> list[str]:
    return ["--model", model, "--gpu_memory", gpu, "--host_memory", host, "--seq_len", "2048", "--batch_size", str(mb),
            "--grad_accum", str(ga), "--disk_size", disk_size, "--disk_gbps", f"{gbps:g}", "--disks", str(disks),
            "--require", "stream", "--require", "adamw", "--options",
            json.dumps({"stream": {**opts, "offload_dir": "SSD_FOLDER"}})]


def run_plan(argv: list[str]):
    """``hf-lowmem plan`` with ``argv``, in-process: the plan's only candidate (stream + adamw)."""
    from hf_lowmem.cli_plan import add_arguments, make_plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    plan = make_plan(p.parse_args(argv))
    c = plan.chosen or plan.smallest or (plan.candidates[0] if plan.candidates else None)
    if c is None or c.estimate is None or c.estimate.disk is None:
        raise SystemExit(f"hf-lowmem plan {shlex.join(argv)}: no SSD-tier estimate ({plan.budget_error()})")
    return plan, c


def row_for(name, model, gpu, host, mb, ga, opts, disk_size, disks, read, write, hide_search=True) -> dict:
    from hf_lowmem.engine.estimate import disk_seconds

    argv = plan_args(model, gpu, host, mb, ga, opts, disk_size, disks, read)
    plan, c = run_plan(argv)
    e, d = c.estimate, c.estimate.disk
    disk_rw = disk_seconds(d, read, write, disks)
    first = (d["window_bytes"] / d["window"]) / (read * 1e9)
    step_rw = max(e.seconds_per_step, disk_rw + first)
    tokens = mb * ga * 2048
    row = {
        "name": name, "command": "hf-lowmem plan " + shlex.join(argv), "model": model, "gpu_budget": gpu,
        "host_budget": host, "micro_batch": mb, "grad_accum": ga, "seq": 2048, "options": opts, "disks": disks,
        "read_gbps": read, "write_gbps": write,
        "fits": c.fits, "why_not": c.why_not(plan.gpu_budget, plan.host_budget) if not c.fits else "",
        "gpu_gib": round(e.gpu_total / 2**30, 2), "host_gib": round(e.host_total / 2**30, 2),
        "read_bytes": d["read_bytes"], "write_bytes": d["write_bytes"], "file_bytes": d["file_bytes"],
        "read_gb": round(d["read_bytes"] / 1e9, 2), "write_gb": round(d["write_bytes"] / 1e9, 2),
        "file_gib": round(d["file_bytes"] / 2**30, 2),
        "compute_s": round(d["compute_s"], 2), "planner_disk_s": round(d["disk_s"], 2),
        "planner_step_s": round(e.seconds_per_step, 2), "disk_s_rw": round(disk_rw, 2), "step_s_rw": round(step_rw, 2),
        "tokens_per_s_rw": round(tokens / step_rw, 1), "disk_bound": disk_rw > d["compute_s"],
        "tb_written_per_1000_steps": round(d["write_bytes"] * 1000 / 1e12, 2),
        "steps_per_1200_tbw": int(TBW * 1e12 / (d["write_bytes"] / disks)),
    }
    # the disk's traffic does not grow with the accumulation, the compute does (linearly)
    ga_hide = max(ga, math.ceil(ga * disk_rw / d["compute_s"]))
    row["ga_to_hide_disk"] = ga_hide
    if hide_search and ga_hide > ga:
        tried = []
        for n in (1, 2, 4):
            o = {**opts, "stash_every": n}
            _, c2 = run_plan(plan_args(model, gpu, host, mb, ga_hide, o, disk_size, disks, read))
            tried.append({"stash_every": n, "fits": c2.fits, "gpu_gib": round(c2.estimate.gpu_total / 2**30, 2),
                          "host_gib": round(c2.estimate.host_total / 2**30, 2)})
        row["ga_hide_fits"] = any(t["fits"] for t in tried)
        row["ga_hide_tried"] = tried
    if name in MEASURED:
        m = measured(name)
        row["measured"] = m
        row["planner_step_vs_measured_mean"] = round(e.seconds_per_step / m["step_s_steady_mean"] - 1, 3)
        row["bytes_vs_engine"] = [d["read_bytes"] - m["engine_read_bytes"], d["write_bytes"] - m["engine_write_bytes"]]
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated scenario names")
    p.add_argument("--no_hide_search", action="store_true", help="skip the re-plans at the hiding accumulation")
    p.add_argument("--out", default=OUT, help="JSON file (default bench/results/ssd_planner_check.json; '' for none)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    want = set(a.only.split(",")) if a.only else None
    rows = [row_for(*s, hide_search=not a.no_hide_search) for s in SCENARIOS if want is None or s[0] in want]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"command": "python " + " ".join(["bench/ssd_planner_check.py", *(argv or sys.argv[1:])]),
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
