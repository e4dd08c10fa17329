"""``hf-lowmem plan``: will this model train in this much memory, and how?

    hf-lowmem plan --model llama2-7b --gpu_memory 8GiB --host_memory 64GiB --seq_len 2048 --batch_size 4 --grad_accum 8

Reads the model's configuration only (a preset name, a ``config.json``, a model folder or a cached hub id;
the model is built on the meta device, so no weight is loaded and no memory is allocated), estimates every
combination of the registered plugins, and prints the fastest plan that fits: where GPU and host memory
go at the peak, the arguments that select it, and the faster alternatives it rejected with the reason.
``--json`` prints the same as JSON. Exit status 0 when a plan fits, 2 when none does (the smallest budget
that works is printed).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hf_lowmem.planner import ATTN_IMPLS, PRECISIONS, preset_names

    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(preset_names())}), a config.json, a model folder or a cached hub id")
    p.add_argument("--gpu_memory", default=None,
                   help="GPU memory budget, e.g. 8GiB (an 8 GB card; 8GB is 10^9 bytes each). Default: this machine's GPU, if it has one")
    p.add_argument("--host_memory", default=None, help="host RAM budget, e.g. 64GiB. Default: this machine's RAM")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per micro-batch (per_device_train_batch_size)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS,
                   help="bf16-mixed: fp32 weights + bf16 autocast (Trainer bf16=True; default); bf16: bf16 weights; fp32")
    p.add_argument("--attention", default="sdpa", choices=ATTN_IMPLS, help="the model's attention implementation")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (plan a slice of the model)")
    p.add_argument("--require", action="append", default=[], metavar="PLUGIN",
                   help="a plugin every plan must use (repeatable), e.g. --require bnb-adamw8bit")
    p.add_argument("--options", default=None, help='per-plugin options as JSON, e.g. \'{"gradient-checkpointing": {"every_n": 2}}\'')
    p.add_argument("--lossless_only", action="store_true", help="only plugins that do not change the results")
    p.add_argument("--assume_installed", action="store_true",
                   help="plan as if every plugin's packages were installed (planning for another machine)")
    p.add_argument("--tflops", type=float, default=None,
                   help="the GPU's dense bf16 matmul rate for the speed model (default: 784, measured on our H200)")
    p.add_argument("--pcie_gbps", type=float, default=None,
                   help="host<->GPU copy rate per direction, GB/s, for the speed model (default: 55, PCIe Gen5 x16 pinned)")
    p.add_argument("--disk_size", default=None,
                   help="free space of a local SSD the stream engine's SSD tier may use, e.g. 2TB (with --disks: each); "
                        "without it (and --disk_gbps) no SSD tier is planned")
    p.add_argument("--disk_gbps", type=float, default=None,
                   help="sequential GB/s of that SSD (e.g. 7 for PCIe Gen4, 14 for Gen5; default 3 when only "
                        "--disk_size is given)")
    p.add_argument("--disks", type=int, default=1, help="SSDs of that size and speed, the SSD tier spread over them")
    p.add_argument("--all", action="store_true", help="list every candidate, not only the interesting alternatives")
    p.add_argument("--json", action="store_true", help="print JSON")


def _require_by_kind(host, names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        for part in n.split(","):
            part = part.strip()
            if part:
                info = host.registry.get(part)
                out.setdefault(info.kind, []).append(info.name)
    return out


def make_plan(a: argparse.Namespace):
    from hf_lowmem.errors import PluginError
    import dataclasses

    from hf_lowmem.planner import (DEFAULT_DEVICE, TrainSetup, host_memory_bytes, load_model_shape, parse_size,
                                   plan_training)
    from hf_lowmem.plugins import load_plugins

    if a.gpu_memory is None:
        import torch

        if not torch.cuda.is_available():
            raise PluginError("this machine has no CUDA GPU: give the budget to plan for, e.g. --gpu_memory 8GiB")
        a.gpu_memory = torch.cuda.get_device_properties(0).total_memory
    gpu = parse_size(a.gpu_memory, "--gpu_memory")
    host_b = parse_size(a.host_memory, "--host_memory") if a.host_memory else host_memory_bytes()
    if a.layers is not None and a.layers < 1:
        raise PluginError(f"--layers {a.layers}: the number of decoder layers to plan must be >= 1 (leave it out to "
                          "plan every layer)")
    for flag, rate, unit in (("--tflops", a.tflops, "TFLOP/s, e.g. 784"), ("--pcie_gbps", a.pcie_gbps, "GB/s, e.g. 55")):
        if rate is not None and not (rate > 0 and rate != float("inf")):
            raise PluginError(f"{flag} {rate:g}: a rate must be a positive number of {unit} (leave it out for the "
                              "measured H200 rates)")
    overrides = {"num_hidden_layers": a.layers} if a.layers is not None else {}
    shape = load_model_shape(a.model, **overrides)
    setup = TrainSetup(micro_batch=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum, precision=a.precision,
                       attn_impl=a.attention, device="cuda")
    host = load_plugins()
    require = _require_by_kind(host, a.require)
    raw_options = {}
    if a.options:
        try:
            raw_options = json.loads(a.options)
        except json.JSONDecodeError as e:
            raise PluginError(f'--options must be JSON like {{"plugin-name": {{"option": 1}}}}: {e}') from e
    device = DEFAULT_DEVICE
    if a.tflops or a.pcie_gbps:
        bw = a.pcie_gbps or device.h2d_gbps
        device = dataclasses.replace(
            device, name=f"{a.tflops or device.matmul_tflops:g} TFLOP/s, {bw:g} GB/s host<->GPU (given)",
            matmul_tflops=a.tflops or device.matmul_tflops, fp32_tflops=(a.tflops or device.matmul_tflops) / 13,
            h2d_gbps=bw, d2h_gbps=bw, duplex_gbps=1.8 * bw)
    if a.disk_size or a.disk_gbps:
        if a.disks < 1:
            raise PluginError(f"--disks must be at least 1, got {a.disks}")
        if a.disk_gbps is not None and not a.disk_gbps > 0:
            raise PluginError(f"--disk_gbps must be a positive number of GB/s, got {a.disk_gbps}")
        device = dataclasses.replace(device, disk_gbps=a.disk_gbps, disks=a.disks,
                                     disk_bytes=parse_size(a.disk_size, "--disk_size") if a.disk_size else None)
    return plan_training(shape, setup, gpu, host_b, host=host, require=require, raw_options=raw_options,
                         lossless_only=a.lossless_only, check_installed=not a.assume_installed, device=device)


def _arguments_text(args: dict) -> tuple[str, str]:
    py, cli = [], []
    for k, v in args.items():
        if v in (None, [], {}):
            continue
        if k == "lowmem_options":
            py.append(f"{k}={json.dumps(v)}")
            cli.append(f"--{k} '{json.dumps(v)}'")
        elif isinstance(v, list):
            py.append(f"{k}={v!r}")
            cli.append(f"--{k} {' '.join(v)}")
        else:
            py.append(f"{k}={v!r}")
            cli.append(f"--{k} {v}")
    return "LowMemTrainingArguments(" + ", ".join(py) + ")", " ".join(cli) or "(no lowmem flag: the defaults)"


def _table(title: str, rows: dict[str, int], total_label: str, extra: dict[str, int] | None = None,
           grand_label: str | None = None) -> list[str]:
    from hf_lowmem.planner import gib

    w = max([len(title), len(total_label), len(grand_label or "")] + [len(k) + 2 for k in rows]
            + [len(k) + 2 for k in (extra or {})])
    out = [f"{title.ljust(w)}  {'GiB':>8}"]
    for k, v in rows.items():
        out.append(f"  {k.ljust(w - 2)}  {gib(v):8.2f}")
    out.append(f"{total_label.ljust(w)}  {gib(sum(rows.values())):8.2f}")
    if extra:
        for k, v in extra.items():
            out.append(f"  {k.ljust(w - 2)}  {gib(v):8.2f}")
        out.append(f"{(grand_label or '').ljust(w)}  {gib(sum(rows.values()) + sum(extra.values())):8.2f}")
    return out


def render(plan, show_all: bool = False) -> str:
    from hf_lowmem.planner import GPU_COMPONENTS, fmt_gib
    from hf_lowmem.sizes import fmt_count, fmt_seconds

    su, sh = plan.setup, plan.shape
    lines = [f"model:    {sh.describe()}", f"training: {su.describe()}",
             f"budget:   GPU {fmt_gib(plan.gpu_budget)} GiB, host RAM {fmt_gib(plan.host_budget)} GiB"]
    if plan.constraints:
        lines.append(f"required: {', '.join(n for v in plan.constraints.values() for n in v)}")
    lines.append("speed:    relative to the same run with unlimited GPU memory (plain Trainer, fused AdamW, no "
                 "recompute), from a step-time model at the rates of " + plan.candidates[0].inp.device.name
                 if plan.candidates else "")
    lines.append("")
    c = plan.chosen
    if c is None:
        lines.append("NO PLAN FITS.")
        lines.append(str(plan.budget_error()))
        show = plan.smallest
        if show is not None:
            lines.append("")
            lines.append(f"The plan with the smallest GPU need: {show.label}")
    else:
        show = c
        e = c.estimate
        tok_s = su.window_tokens / e.seconds_per_step if e.seconds_per_step else None
        lossy = "lossless" if c.lossless else "lossy (changes the results slightly: see `hf-lowmem plugins`)"
        lines.append(f"PLAN: {c.label}")
        rate = (f"{tok_s:,.0f}" if tok_s < 1e6 else fmt_count(tok_s)) if tok_s else ""
        lines.append(f"  speed {e.speed:.2f}" + (f" (~{fmt_seconds(e.seconds_per_step)} per optimizer step, ~{rate} "
                                                 "tokens/s modelled)" if tok_s else "") + f"; {lossy}")
        py, cli = _arguments_text(c.lowmem_arguments())
        lines.append(f"  Python: {py}")
        lines.append(f"  CLI:    hf-lowmem train ... {cli}")
    if show is not None:
        e = show.estimate
        lines.append("")
        gpu_rows = {k: e.gpu.get(k, 0) for k in GPU_COMPONENTS}
        gpu_rows.update({k: v for k, v in e.gpu.items() if k not in gpu_rows})
        lines += _table(f"GPU memory at the peak ({e.peak_phase})", gpu_rows,
                        "= peak allocated (torch.cuda.max_memory_allocated)", e.gpu_extra,
                        f"= GPU total (budget {fmt_gib(plan.gpu_budget)})")
        lines.append("")
        lines += _table("Host memory", e.host, f"= host total (budget {fmt_gib(plan.host_budget)})")
        if e.speed_notes:
            lines.append("")
            lines.append("Speed: " + "; ".join(e.speed_notes))
        if e.notes:
            lines.append("Notes: " + "; ".join(e.notes))
    rejected = plan.rejected(frontier=not show_all) if c is not None else plan.rejected(limit=None if show_all else 12)
    if rejected:
        lines.append("")
        head = ("Rejected alternatives at least as fast (each either faster or smaller than the ones above it):"
                if c is not None and not show_all else "Candidates:")
        lines.append(head)
        w = max(len(r.label) for r in rejected)
        lines.append(f"  {'speed':>5}  {'GPU GiB':>8}  {'host GiB':>8}  {'plugins'.ljust(w)}  why not")
        for r in rejected:
            lines.append(f"  {r.estimate.speed or 0:5.2f}  {r.estimate.gpu_total / 2**30:8.2f}  "
                         f"{r.estimate.host_total / 2**30:8.2f}  {r.label.ljust(w)}  {r.why_not(plan.gpu_budget, plan.host_budget)}")
    lines.append("")
    lines.append(f"({len(plan.candidates)} plans considered" + ("" if show_all else "; --all lists every one") + ")")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    from hf_lowmem.errors import LowMemError

    try:
        plan = make_plan(a)
    except LowMemError as e:
        print(f"hf-lowmem plan: {e}", file=sys.stderr)
        return 1
    if a.json:
        d = plan.to_dict()
        if not plan.ok:
            d["error"] = str(plan.budget_error())
        print(json.dumps(d, indent=2))
    else:
        print(render(plan, show_all=a.all))
    return 0 if plan.ok else 2
