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
        f = self.formats(plan)  # the engine's own optimizer: quantized states, bf16 masters or 8-bit gradients are lossy
        return f.states == "fp32" and f.master == "fp32" and f.grads == "compute"

    def memory_model(self, plan, step):
        return stream_estimate(plan, self.formats(plan), self.options_for(plan).loss_chunk_tokens)


def stream_estimate(plan, fmt, chunk: int):
    """The engine's memory (its own model) as a planner estimate, and its speed: per block, host<->GPU
    copies overlap compute, and the slower of the two sets the pace."""
    from hf_lowmem.engine.stream import estimate_stream_memory
    from hf_lowmem.planner import GiB, MemoryEstimate, attn_flops, ceiling_seconds, matmul_params

    sh, su, dev = plan.shape, plan.setup, plan.device
    cb = 2 if su.precision != "fp32" else 4
    raw = estimate_stream_memory(
        block_params=sh.block_params(), hidden_size=sh.hidden, intermediate_size=sh.intermediate,
        vocab_size=sh.vocab, tokens_per_micro_batch=su.tokens, micro_batches=su.grad_accum, compute_bytes=cb,
        state_format=fmt.states, loss_chunk_tokens=chunk, masters_exist=False, master_format=fmt.master,
        grad_format=fmt.grads, stash_every=fmt.stash_every or 1)
    g, h = raw["gpu"], raw["host"]
    names = {"weights": "weights", "gradients": "gradients", "update_staging": "optimizer states",
             "activations": "activations", "hidden_states": "activations", "logits": "logits",
             "framework": "framework overhead"}
    gpu: dict[str, float] = dict.fromkeys(("weights", "gradients", "optimizer states", "activations", "logits",
                                           "framework overhead"), 0)
    for k, v in g.items():
        key = names.get(k, k.replace("_", " "))
        gpu[key] = gpu.get(key, 0) + v
    host_names = {"master_weights": "master weights (fp32, pinned)", "optimizer_states": "optimizer states (pinned)",
                  "activation_stash": "activation stash (pinned)", "gradients": "gradients (pinned)"}
    host = {**dict.fromkeys(host_names.values(), 0), **{host_names.get(k, k.replace("_", " ")): v for k, v in h.items()}}
    host["framework (Python, PyTorch, CUDA libraries)"] = 3 * GiB if su.device == "cuda" else 1 * GiB
    est = MemoryEstimate(gpu={k: int(v) for k, v in gpu.items() if v}, host={k: int(v) for k, v in host.items() if v},
                         peak_phase=f"{raw.get('gpu_peak_phase', 'backward')} phase of one block")
    est.notes.append(f"stream: {fmt.master} masters, {fmt.states} optimizer states, {fmt.grads} stored gradients, "
                     f"stash every {fmt.stash_every or 1} layer(s); memory from the stream engine's own memory model")
    sb = {"8bit": 2.0 + 8 / 256, "4bit": 1.0 + 8 / 128}.get(fmt.states, 8.0)
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
    return est


@hookimpl
def hf_lowmem_register(register):
    register(Stream())
