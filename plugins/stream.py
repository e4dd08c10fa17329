"""The ``stream`` offload plugin: the weight-streaming engine that trains every parameter of a model far
larger than the GPU (see :mod:`hf_lowmem.engine.stream`), and its memory model for the planner (the
engine's own, :func:`hf_lowmem.engine.stream.estimate_stream_memory`)."""

from __future__ import annotations

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.engine.stream_options import StreamOptions

#: optimizers the engine implements itself (exact fp32 AdamW; 8-bit AdamW through bitsandbytes' kernel)
ENGINE_OPTIMIZERS = ("adamw", "bnb-adamw8bit")


class Stream(Plugin):
    name, kind, engine, options, modes = "stream", "offload", True, StreamOptions, ("single", "ddp")
    help = ("weight-streaming engine: masters + optimizer states in host RAM (exact tier: fp32; compact tier: bf16 "
            "masters, 4-bit states), one layer at a time on the GPU, layer-major accumulation windows (7B in 8 GiB)")
    incompatible = {
        "gradient-checkpointing": "redundant: the engine already recomputes every layer in backward",
        "activation-offload": "redundant: the engine already keeps only each layer's inputs, in host memory",
    }

    def check_selection(self, by_kind):
        opt = (by_kind.get("optimizer") or [None])[0]
        if opt is not None and opt not in ENGINE_OPTIMIZERS:
            return (f"the engine runs the optimizer update itself, one block at a time on the GPU, and supports "
                    f"{', '.join(ENGINE_OPTIMIZERS)}; {opt!r} is not one of them")
        if by_kind.get("quantization"):
            return "the engine streams fp32 master weights and casts them on the GPU; quantized weights are not supported"
        return None

    def create_engine(self, ctx, model, trainer):
        import dataclasses

        from hf_lowmem.context import trainer_param_groups
        from hf_lowmem.engine.config import EngineSpec
        from hf_lowmem.engine.stream import StreamEngine

        options = ctx.options(self.name)
        if options.gpu_memory is None and getattr(ctx.args, "lowmem_gpu_memory", None):
            options = dataclasses.replace(options, gpu_memory=str(ctx.args.lowmem_gpu_memory))  # the planner's budget
        opt = ctx.selected("optimizer")
        spec = EngineSpec.from_training(ctx.args, trainer=trainer, options=options, optimizer_name=opt,
                                        optimizer_options=ctx.options(opt) if opt else None,
                                        param_groups=trainer_param_groups(trainer, model))
        return StreamEngine(model, spec)

    def formats(self, plan):
        """The host formats (masters, states, gradients, stash grouping) these options select: the engine's rule."""
        from hf_lowmem.engine.stream_options import resolve_formats

        return resolve_formats(self.options_for(plan), plan.selected("optimizer"))

    def lossless_in(self, plan):
        return self.formats(plan).lossless  # quantized states, bf16 masters or 8-bit gradients are lossy

    #: eval-loss gap of the compact formats (bf16 masters, 4-bit states as sqrt(v) codes rounded stochastically, 8-bit
    #: stored gradients) against AdamW: SmolLM2-135M fine-tuned 200 steps on the GPU, the mean of seeds 0-2 (+0.05,
    #: +0.10, +0.13%; the exact tier +0.03 to +0.06%), bench/results/quality_stream_tiers_seed{0,1,2}.json
    COMPACT_GAP_PCT = 0.09

    def quality_gap_in(self, plan):
        """Lossy formats: the compact tier's measured gap; 8-bit states alone (fp32 masters, stored gradients in the
        compute dtype) are the selected 8-bit optimizer's own approximation, whose gap that plugin states."""
        f = self.formats(plan)
        if f.master != "fp32" or f.grads != "compute" or f.states == "4bit":
            return self.COMPACT_GAP_PCT
        return 0.0 if plan.selected("optimizer") else None

    def plan_variants(self):
        """The RAM tier as configured, the compact RAM tier stashing every 1st, 2nd or 4th layer (the engine
        picks the smallest ``stash_every`` that fits the host budget; the planner tries the same ones), and the
        SSD tier (exact and compact formats) where the planner was given a disk (``hf-lowmem plan --disk_size ...
        --disk_gbps ...``); the plan names a placeholder folder."""
        from hf_lowmem.engine.stream_options import PLANNER_DIR

        return [{}, {"tier": "compact"}, {"tier": "compact", "stash_every": 2}, {"tier": "compact", "stash_every": 4},
                {"offload_dir": PLANNER_DIR}, {"tier": "compact", "offload_dir": PLANNER_DIR},
                {"tier": "compact", "offload_dir": PLANNER_DIR, "offload_grads": True}]

    def memory_model(self, plan, step):
        return stream_estimate(plan, self.formats(plan), self.options_for(plan).loss_chunk_tokens,
                               self.options_for(plan))


def stream_estimate(plan, fmt, chunk: int, opts=None):
    """The engine's memory (its own model) as a planner estimate, and its speed: per block, host<->GPU
    copies overlap compute, and the slower of the two sets the pace; in the SSD tier the disk's transfers
    overlap the whole step, and they set the pace when they take longer (:func:`ssd_speed`)."""
    from hf_lowmem.engine.estimate import state_bytes
    from hf_lowmem.engine.stream import estimate_stream_memory
    from hf_lowmem.engine.stream_options import PLANNER_DIR, offload_dirs
    from hf_lowmem.planner import (
        GiB,
        MemoryEstimate,
        PlanRefused,
        attn_flops,
        ceiling_seconds,
        matmul_params,
    )

    sh, su, dev = plan.shape, plan.setup, plan.device
    cb = 2 if su.precision != "fp32" else 4
    dirs = offload_dirs(opts) if opts is not None else []
    if dirs and dev.disk_bytes is None and dev.disk_gbps is None and dirs == [PLANNER_DIR]:
        raise PlanRefused("the SSD tier is planned only with a disk: hf-lowmem plan --disk_size ... --disk_gbps ...")
    if dirs and plan.mode != "single":  # as the engine: refused at start under several processes
        raise PlanRefused(f"the SSD tier runs on one process (this plan runs in {plan.mode} mode)")
    if not dirs and getattr(opts, "offload_grads", False):
        raise PlanRefused("offload_grads needs offload_dir")
    raw = estimate_stream_memory(
        block_params=sh.block_params(), hidden_size=sh.hidden, intermediate_size=sh.intermediate,
        vocab_size=sh.vocab, tokens_per_micro_batch=su.tokens, micro_batches=su.grad_accum, compute_bytes=cb,
        state_format=fmt.states, loss_chunk_tokens=chunk, masters_exist=False, master_format=fmt.master,
        grad_format=fmt.grads, stash_every=fmt.stash_every or 1,
        offload_window=int(opts.offload_window) if dirs else None,
        offload_grads=bool(dirs and opts.offload_grads))
    g, h = raw["gpu"], raw["host"]
    names = {"weights": "weights", "gradients": "gradients", "update_staging": "optimizer states",
             "activations": "activations", "hidden_states": "activations", "logits": "logits",
             "framework": "framework overhead"}
    gpu: dict[str, float] = dict.fromkeys(("weights", "gradients", "optimizer states", "activations", "logits",
                                           "framework overhead"), 0)
    for k, v in g.items():
        key = names.get(k, k.replace("_", " "))
        gpu[key] = gpu.get(key, 0) + v
    host_names = {"master_weights": f"master weights ({fmt.master}, pinned)", "optimizer_states": "optimizer states (pinned)",
                  "activation_stash": "activation stash (pinned)", "gradients": "gradients (pinned)",
                  "ssd_window": "SSD tier window of blocks (pinned)"}
    host = {**dict.fromkeys(host_names.values(), 0), **{host_names.get(k, k.replace("_", " ")): v for k, v in h.items()}}
    host["framework (Python, PyTorch, CUDA libraries)"] = 3 * GiB if su.device == "cuda" else 1 * GiB
    est = MemoryEstimate(gpu={k: int(v) for k, v in gpu.items() if v}, host={k: int(v) for k, v in host.items() if v},
                         peak_phase=f"{raw.get('gpu_peak_phase', 'backward')} phase of one block")
    est.notes.append(f"stream: {fmt.master} masters, {fmt.states} optimizer states, {fmt.grads} stored gradients, "
                     f"stash every {fmt.stash_every or 1} layer(s); memory from the stream engine's own memory model")
    sb = state_bytes(fmt.states)
    mb = 2 if fmt.master == "bf16" else 4
    rate = dev.flops_rate(su)
    P = sh.params_total
    fwd_flops = 2 * matmul_params(sh) * su.window_tokens + attn_flops(sh, su) * su.grad_accum / 3
    t_fwd_compute = fwd_flops / rate
    t_bwd_compute = 3 * fwd_flops / rate  # recompute + backward
    # forward streams masters (fp32) + states + bf16 gradients in, masters + states out; backward streams
    # bf16 weights in and bf16 gradients out
    t_fwd_copy = max(P * (mb + sb + cb) / (dev.h2d_gbps * 1e9), P * (mb + sb) / (dev.d2h_gbps * 1e9))
    t_bwd_copy = max(P * cb / (dev.h2d_gbps * 1e9), P * cb / (dev.d2h_gbps * 1e9))
    t_opt = P * (2 * mb + 2 * sb + cb) / (dev.hbm_gbps * 1e9 * 0.7)
    step = max(t_fwd_compute, t_fwd_copy) + max(t_bwd_compute, t_bwd_copy) + t_opt
    est.seconds_per_step = step
    est.speed = min(1.0, ceiling_seconds(plan) / step)
    est.speed_notes.append("full recompute: 8/6 of the plain FLOPs")
    if t_fwd_copy > t_fwd_compute or t_bwd_copy > t_bwd_compute:
        est.speed_notes.append(f"copy-bound: {t_fwd_copy + t_bwd_copy:.2f} s of host<->GPU copies per step against "
                               f"{t_fwd_compute + t_bwd_compute:.2f} s of compute (more tokens per window hides them)")
    else:
        est.speed_notes.append(f"copies ({t_fwd_copy + t_bwd_copy:.2f} s/step) hidden behind compute "
                               f"({t_fwd_compute + t_bwd_compute:.2f} s/step)")
    if dirs:
        ssd_speed(plan, est, raw["disk"], t_fwd_compute + t_bwd_compute + t_opt)
    return est


#: sequential GB/s assumed for a disk given without --disk_gbps (a mid-range PCIe Gen3/Gen4 NVMe)
ASSUMED_DISK_GBPS = 3.0


def ssd_speed(plan, est, disk: dict, t_compute: float) -> None:
    """The SSD tier's step time: its disk transfers run beside the whole step, so the step takes the longer of
    the two, plus the first block's read, which nothing hides. Refuses (``PlanRefused``) a disk too small."""
    from hf_lowmem.engine.estimate import disk_seconds
    from hf_lowmem.planner import PlanRefused, ceiling_seconds
    from hf_lowmem.sizes import fmt_size

    dev = plan.device
    n = max(1, int(dev.disks or 1))
    if dev.disk_bytes is not None and disk["file_bytes"] > dev.disk_bytes * n:
        raise PlanRefused(f"the SSD tier's files need {fmt_size(disk['file_bytes'])}, the disk(s) have "
                          f"{fmt_size(dev.disk_bytes * n)}")
    gbps = dev.disk_gbps or ASSUMED_DISK_GBPS
    t_disk = disk_seconds(disk, gbps, gbps, n)
    first = (disk["window_bytes"] / disk["window"]) / (gbps * 1e9)
    step = max(est.seconds_per_step, t_disk) + first
    est.seconds_per_step = step
    est.speed = min(1.0, ceiling_seconds(plan) / step)
    est.disk = {**disk, "disk_gbps": gbps, "disks": n, "disk_s": t_disk, "compute_s": t_compute,
                "tb_written_per_1000_steps": disk["write_bytes"] * 1000 / 1e12}
    where = f"{n} disk{'s' if n > 1 else ''} at {gbps:g} GB/s" + ("" if dev.disk_gbps else " (assumed: give --disk_gbps)")
    grads = f", gradients {fmt_size(disk['grad_bytes'])}" if disk.get("grad_bytes") else ""
    est.notes.append(f"SSD tier: {fmt_size(disk['file_bytes'])} of block files (masters {fmt_size(disk['master_bytes'])}, "
                     f"optimizer states {fmt_size(disk['state_bytes'])}{grads}), each checkpoint as much again once "
                     f"training moves on")
    est.speed_notes.append(f"disk: {disk['read_bytes'] / 1e9:.0f} GB read + {disk['write_bytes'] / 1e9:.0f} GB written "
                           f"per step on {where}: {t_disk:.1f} s against {t_compute:.1f} s of GPU work"
                           + (" (the disk sets the pace)" if t_disk > t_compute else " (hidden)")
                           + f"; {est.disk['tb_written_per_1000_steps']:.1f} TB written per 1,000 steps")


@hookimpl
def hf_lowmem_register(register):
    register(Stream())
