"""One training step as tensor classes (:class:`Step`), filled with what the Trainer does by default: the
input of the replay. The activation formulas follow a Llama-style decoder layer as transformers
implements it, operation by operation (checked against autograd's saved tensors in tests/test_planner.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_lowmem.planner.inputs import PlanInput, TrainSetup
from hf_lowmem.planner.shapes import ModelShape
from hf_lowmem.sizes import GiB, MiB


@dataclass
class Step:
    """The tensor classes of one training step, in bytes: what a plugin's memory model changes
    (:meth:`hf_lowmem.spec.Plugin.memory_model`) and what :func:`hf_lowmem.planner.replay.replay` then walks,
    moment by moment, to find the GPU peak. Filled first with the Trainer's defaults (:func:`base_step`).
    Per-layer lists have one entry per decoder layer. Host memory (``host``) is a component -> bytes dict
    like :attr:`MemoryEstimate.host`; ``notes`` are shown with the plan. The last group of fields feeds the
    speed model (:mod:`hf_lowmem.planner.speed`)."""

    weights: float = 0.0  # resident on the GPU
    states: float = 0.0  # optimizer states on the GPU (allocated at the first step)
    states_paged: float = 0.0  # paged states: in managed memory, outside torch's allocated count
    grad_layer: list[float] = field(default_factory=list)
    grad_embed: float = 0.0
    grad_head: float = 0.0  # LM head (0 when tied: the embedding's gradient is allocated there)
    grad_other: float = 0.0
    grad_free_per_param: bool = False  # layer-wise optimizers: a gradient is freed as soon as it is used
    largest_grad: float = 0.0
    largest_grad_layer: float = 0.0  # the largest weight gradient of a decoder layer
    acts: list[float] = field(default_factory=list)  # saved activations per layer
    ckpt: list[float] = field(default_factory=list)  # per layer: checkpoint bytes if checkpointed, else 0
    recompute: list[bool] = field(default_factory=list)
    cache: list[float] = field(default_factory=list)  # autocast bf16 weight copies per layer
    head_acts: float = 0.0  # final norm + LM-head input cast + cos/sin + ids
    head_cache: float = 0.0
    logits_fwd: float = 0.0
    logits_bwd: float = 0.0
    bwd_ws: list[tuple[float, float]] = field(default_factory=list)  # (MLP stage, attention stage)
    mlp_frac: float = 0.5  # share of a layer's saved activations in its MLP half
    grad_mlp_frac: float = 0.5  # share of a layer's weight gradients in its MLP
    first_mlp_grad: float = 0.0
    first_attn_grad: float = 0.0
    fwd_ws: list[float] = field(default_factory=list)
    embed_bwd_ws: float = 0.0
    opt_ws: float = 0.0  # optimizer-step temporaries
    clip_ws: float = 0.0
    offload_acts: bool = False  # saved activations go to host memory
    offload_window: float = 0.0  # bytes of offloaded tensors on the GPU at a time (in flight / prefetched)
    offload_pending: float = 0.0  # in forward, at most this many bytes of GPU tensors wait for their copy out
    overhead: float = 0.0  # allocated framework memory (cuBLAS workspaces)
    transfer: float = 0.0
    host: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # what the speed model needs
    opt_bytes_per_param: float = 0.0  # optimizer memory traffic per parameter
    opt_kernel_factor: float = 1.0
    opt_extra_seconds: float = 0.0
    h2d_bytes: float = 0.0  # host->GPU bytes per optimizer step that compute must hide
    d2h_bytes: float = 0.0
    dequant_bytes: float = 0.0


def layer_activation_parts(shape: ModelShape, setup: TrainSetup, tokens: int) -> tuple[float, float]:
    """Bytes autograd saves for one decoder layer over ``tokens`` tokens (one micro-batch), as
    (attention half, MLP half).

    Counted per operation of a Llama-style layer as transformers implements it (verified against
    ``torch.autograd.graph.saved_tensors_hooks`` byte counts in ``tests/test_planner.py``):
    each RMSNorm saves its input upcast to fp32 and its normalised output (residual dtype); the projections
    save their input (under autocast each projection casts it separately); attention saves q, k, v, the
    output and the fp32 log-sum-exp (eager attention: the fp32 softmax and its cast, S x S per head);
    the gated MLP saves gate, act(gate), up and their product."""
    H, I = shape.hidden, shape.intermediate
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    e, r, amp = setup.compute_bytes, (4 if setup.param_bytes == 4 else 2), setup.amp
    S = setup.seq_len
    norm = 4 * H + r * H + 4  # fp32 input, normalised output, rsqrt
    z_attn = 3 * 2 * H if amp else e * H
    z_mlp = 2 * 2 * H if amp else e * H
    if setup.attn_impl == "eager":
        attn = e * qd + 2 * e * qd + 4 * shape.n_heads * S + (e * shape.n_heads * S if e != 4 else 0) + e * qd
    else:
        attn = e * (2 * qd + 2 * kvd) + 4 * shape.n_heads
    mlp = (4 if shape.gated_mlp else 2) * I * e
    return (norm + z_attn + attn) * tokens, (norm + z_mlp + mlp) * tokens


def layer_activation_bytes(shape: ModelShape, setup: TrainSetup, tokens: int) -> float:
    a, m = layer_activation_parts(shape, setup, tokens)
    return a + m


def layer_backward_workspace(shape: ModelShape, setup: TrainSetup, tokens: int) -> tuple[float, float]:
    """Temporaries of one layer's backward beyond its saved activations and weight gradients, as
    (MLP stage, attention stage). MLP: the gradients of both factors of the gated product while those
    factors are still saved, and the incoming gradient of the residual stream. Attention: the gradients
    of q, k, v (FlashAttention's backward on CUDA expands k, v to every head and accumulates dq in fp32)
    and of the output."""
    e = setup.compute_bytes
    r = 4 if setup.param_bytes == 4 else 2
    H, I = shape.hidden, shape.intermediate
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    mlp = 2 * I * e + H * r
    if setup.device == "cuda" and setup.attn_impl != "eager":
        attn = e * 3 * qd + 4 * qd + e * qd + H * r
    else:
        attn = e * (qd + 2 * kvd) + e * qd + H * r
    return mlp * tokens, attn * tokens


def layer_forward_workspace(shape: ModelShape, setup: TrainSetup, tokens: int) -> float:
    """Temporaries of one layer's forward: the rotary-embedding products and the fp32 normalised input
    (under autocast, before its casts), or the MLP's intermediates of a layer whose activations are not
    kept (checkpointed)."""
    r = 4 if setup.param_bytes == 4 else 2
    qd, kvd = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return max(r * shape.hidden + 2 * r * (qd + kvd), 3 * shape.intermediate * setup.compute_bytes) * tokens


def base_step(inp: PlanInput) -> Step:
    """The Trainer's default step (no plugin): weights, gradients and AdamW states in the parameter dtype,
    every layer's activations kept for backward, the logits materialised by transformers' loss."""
    sh, su = inp.shape, inp.setup
    pb, T, L = su.param_bytes, su.tokens, sh.n_layers
    st = Step()
    st.weights = sh.params_total * pb
    st.grad_layer = [p * pb for p in sh.layer_params]
    st.grad_embed = sh.embed_params * pb
    st.grad_head = sh.head_params * pb
    st.grad_other = sh.other_params * pb
    st.largest_grad = sh.largest_param * pb
    st.largest_grad_layer = max((r * c for _, (r, c) in sh.layer_matrices), default=0) * pb
    a = layer_activation_bytes(sh, su, T)
    st.acts = [a] * L
    st.ckpt = [0.0] * L
    st.recompute = [False] * L
    st.cache = [2.0 * sh.linear_layer_params if su.amp else 0.0] * L
    r = 4 if pb == 4 else 2
    z_head = 2 * sh.hidden if su.amp else su.compute_bytes * sh.hidden
    st.head_acts = T * (4 * sh.hidden + r * sh.hidden + 4 + z_head + 16) + 2 * su.seq_len * sh.head_dim * r
    st.head_cache = 2.0 * sh.vocab * sh.hidden if su.amp else 0.0
    V = sh.vocab
    # loss forward: logits (compute dtype), their fp32 copy, the fp32 log-softmax;
    # loss backward: the saved log-softmax, its incoming gradient and the gradient of the logits (all fp32)
    st.logits_fwd = T * V * (4 + 4 + (su.compute_bytes if su.compute_bytes != 4 else 0))
    st.logits_bwd = T * V * 12
    st.bwd_ws = [layer_backward_workspace(sh, su, T)] * L
    a_attn, a_mlp = layer_activation_parts(sh, su, T)
    st.mlp_frac = a_mlp / max(1.0, a_attn + a_mlp)
    mlp_mats, attn_mats = sh.mlp_matrices(), sh.attention_matrices()
    st.grad_mlp_frac = (sum(mlp_mats) * pb / max(1.0, st.grad_layer[0])) if st.grad_layer else 0.0
    st.first_mlp_grad = (mlp_mats[-1] if mlp_mats else 0) * pb  # down_proj: the first one backward meets
    st.first_attn_grad = (attn_mats[-1] if attn_mats else 0) * pb  # o_proj
    st.fwd_ws = [layer_forward_workspace(sh, su, T)] * L
    st.embed_bwd_ws = T * sh.hidden * 4
    if su.gradient_checkpointing:
        checkpoint_layers(inp, st, every_n=1)
    st.overhead = 64 * MiB if su.device == "cuda" else 0
    st.clip_ws = 0.0
    # host: the process itself, and the model while it is loaded and before the Trainer moves it
    st.host["framework (Python, PyTorch, CUDA libraries)"] = (3 * GiB) if su.device == "cuda" else 1 * GiB
    st.host["weights while loading (before the move to the GPU)"] = sh.params_total * pb if su.device == "cuda" else 0
    if su.device == "cpu":
        st.notes.append("device cpu: everything is host memory; 'GPU' figures are the training tensors")
    if not sh.llama_like:
        st.notes.append(f"{sh.model_type}: activations counted as for a Llama-style layer (q/k/v/o, gated MLP);"
                        " this architecture differs, so treat them as approximate")
    return st


def checkpoint_layers(inp: PlanInput, st: Step, every_n: int) -> None:
    """Layers 0, n, 2n, ... are recomputed in backward and keep only their input hidden state (the Trainer's
    ``gradient_checkpointing``, or a checkpointing plugin)."""
    sh, su = inp.shape, inp.setup
    r = 4 if su.param_bytes == 4 else 2
    for i in range(sh.n_layers):
        if i % every_n == 0:
            st.recompute[i] = True
            st.ckpt[i] = su.tokens * sh.hidden * r


def adamw_states(inp: PlanInput, st: Step) -> None:
    """``torch.optim.AdamW``: two states per parameter in the parameter dtype (the Trainer's default optimizer)."""
    pb = inp.setup.param_bytes
    st.states = 2 * inp.shape.params_total * pb
    st.opt_bytes_per_param = 3 * pb + 4 * pb  # read p, g, m, v; write p, m, v
    if inp.setup.device == "cpu":
        st.opt_ws = 2 * inp.shape.largest_param * pb  # single-tensor kernel: sqrt(v) and the update


def trainer_default_optimizer(inp: PlanInput, st: Step) -> None:
    """What the Trainer uses when no optimizer plugin is selected: ``adamw_torch_fused`` (fused on the CPU too)."""
    adamw_states(inp, st)
    if inp.setup.device == "cpu":
        st.opt_ws = 0.0


def bnb8_state_bytes(n: int, min_8bit: int = 4096, states: int = 2) -> float:
    """Bytes of ``states`` bitsandbytes optimizer states for a tensor of ``n`` elements: 1 byte each plus a
    fp32 absmax per 256-element block; tensors under ``min_8bit`` elements keep fp32 states."""
    if n < min_8bit:
        return 4.0 * states * n
    return states * (n + 4 * math.ceil(n / 256))
