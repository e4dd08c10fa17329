"""The step-time model: FLOPs at the device's rate, recompute, optimizer memory traffic, and the host<->GPU
copies compute cannot hide. Speeds are relative to the same run with unlimited GPU memory."""

from __future__ import annotations

from hf_lowmem.planner.inputs import MemoryEstimate, PlanInput, TrainSetup
from hf_lowmem.planner.shapes import ModelShape
from hf_lowmem.planner.step import Step
from hf_lowmem.sizes import gib


def matmul_params(sh: ModelShape) -> int:
    """Parameters that take part in matmuls (everything but the embedding lookup; a tied head counts)."""
    return sh.params_total - sh.embed_params + (sh.embed_params if sh.tied else 0)


def attn_flops(sh: ModelShape, su: TrainSetup) -> float:
    """Attention score/value FLOPs of a micro-batch, forward + backward (causal: half of the square)."""
    return 6 * sh.n_layers * sh.n_heads * sh.head_dim * su.seq_len * su.tokens


def ceiling_seconds(inp: PlanInput) -> float:
    sh, su, dev = inp.shape, inp.setup, inp.device
    flops = (6 * matmul_params(sh) * su.tokens + attn_flops(sh, su)) * su.grad_accum
    pb = su.param_bytes
    opt = sh.params_total * (7 * pb) / (dev.hbm_gbps * 1e9 * 0.7)
    return flops / dev.flops_rate(su) + opt


def speed(inp: PlanInput, st: Step, est: MemoryEstimate) -> None:
    sh, su, dev = inp.shape, inp.setup, inp.device
    rate = dev.flops_rate(su)
    G = su.grad_accum
    matmul = matmul_params(sh)
    base_flops = (6 * matmul * su.tokens + attn_flops(sh, su)) * G
    layer_fwd = (2 * (sum(sh.layer_params) / max(1, sh.n_layers)) * su.tokens
                 + attn_flops(sh, su) / 3 / max(1, sh.n_layers))
    n_re = sum(st.recompute)
    re_flops = n_re * layer_fwd * G
    t_compute = (base_flops + re_flops) / rate
    t_opt = sh.params_total * st.opt_bytes_per_param * st.opt_kernel_factor / (dev.hbm_gbps * 1e9 * 0.7)
    t_opt += st.opt_extra_seconds
    t_clip = sh.params_total * su.param_bytes / (dev.hbm_gbps * 1e9 * 0.7) if su.max_grad_norm else 0.0
    t_deq = st.dequant_bytes * G / (dev.hbm_gbps * 1e9 * 0.5)
    # offloaded activations: forward copies out, backward copies in; each overlaps its pass's compute
    t_fwd, t_bwd = t_compute / 3, t_compute * 2 / 3
    t_copy_fwd = st.d2h_bytes / (dev.d2h_gbps * 1e9)
    t_copy_bwd = st.h2d_bytes / (dev.h2d_gbps * 1e9)
    exposed = max(0.0, t_copy_fwd - t_fwd) + max(0.0, t_copy_bwd - t_bwd)
    paged = 0.0
    step = t_compute + t_opt + t_clip + t_deq + exposed + paged
    ceiling = ceiling_seconds(inp)
    est.seconds_per_step = step
    est.speed = min(1.0, ceiling / step)
    if n_re:
        est.speed_notes.append(f"recompute of {n_re}/{sh.n_layers} layers: +{re_flops / base_flops:.0%} FLOPs")
    if st.opt_kernel_factor > 1 or st.opt_extra_seconds:
        est.speed_notes.append(f"optimizer step ~{t_opt * 1e3:.0f} ms (fused AdamW: "
                               f"{sh.params_total * 7 * su.param_bytes / (dev.hbm_gbps * 1e9 * 0.7) * 1e3:.0f} ms)")
    if t_deq:
        est.speed_notes.append(f"int8 dequantise/requantise: ~{t_deq * 1e3:.0f} ms per step")
    if st.d2h_bytes:
        est.speed_notes.append(f"activation copies {gib(st.d2h_bytes):.1f} GiB each way per step; "
                               f"{exposed * 1e3:.0f} ms not hidden by compute")
    if not est.speed_notes:
        est.speed_notes.append("no recompute, no copies: the speed of unlimited memory")
