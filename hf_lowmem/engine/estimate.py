"""The stream engine's memory model (GPU peak and host memory), used by its preflight checks, by
``stash_every="auto"`` and by the planner. Pure arithmetic: no torch import."""

from __future__ import annotations

import math

CHUNK = 1 << 22  # values per chunk of a chunked update (hf_lowmem.engine.optim.CHUNK)
BLOCK_8BIT, BLOCK_4BIT = 256, 128
GiB = 2**30


def state_bytes(state_format: str) -> float:
    return {"fp32": 8.0, "8bit": 2.0 + 8 / BLOCK_8BIT, "4bit": 1.0 + 8 / BLOCK_4BIT}[state_format]


def estimate_stream_memory(*, block_params: list[int], hidden_size: int, intermediate_size: int, vocab_size: int,
                           tokens_per_micro_batch: int, micro_batches: int, compute_bytes: int = 2,
                           state_format: str = "8bit", loss_chunk_tokens: int = 2048,
                           masters_exist: bool = False, master_format: str = "fp32", grad_format: str = "compute",
                           stash_every: int = 1, offload_window: int | None = None,
                           offload_grads: bool = False, world: int = 1) -> dict:
    """The stream engine's memory model, in bytes: ``gpu_bytes`` (peak allocated, as
    ``torch.cuda.max_memory_allocated`` counts it) and ``host_bytes``, each with a breakdown, plus the total
    of every phase (``gpu_phases``) and the one that sets the peak (``gpu_peak_phase``).
    ``block_params``: parameters of [embedding, layer 1..N, norm+head] (a tied LM head's weight belongs to
    the embedding, so the last block is then only the norm). ``master_format`` (fp32/bf16), ``state_format``
    (fp32/8bit/4bit), ``grad_format`` (compute/8bit) and ``stash_every`` as the engine's options; the defaults
    are the exact tier with 8-bit states. ``offload_window``: the SSD tier with that many host buffers (masters
    and states on the disk: see :func:`ssd_traffic`, whose figures are returned as ``disk``); ``offload_grads``:
    its stored gradients on the disk too.

    Each phase counts the device tensors :meth:`StreamEngine._run_window` holds at that moment (a tensor
    counts from its allocation until the last Python reference to it goes, which is when the caching
    allocator stops counting it even if a copy stream still reads it). Nothing depends on the number of
    layers: only one group of ``stash_every`` layers (and the next one's masters) is on the device at a time.
    Decoder layers are counted as Llama-style layers (q/k/v/o projections, gated MLP, RMSNorm) with full-width
    k and v, an upper bound for grouped KV heads. The peak of a Llama-2-7B-shaped layer is the backward of a
    decoder layer; checked against ``torch.cuda.max_memory_allocated`` on an H200 in
    ``tests/test_stream_estimate.py``.

    ``world`` ranks of one machine (:mod:`hf_lowmem.engine.dist`): per GPU, the same phases (each rank computes
    its own micro-batches with the whole block's weights, gathered; the transfer buffers are counted as for one
    process, which covers the rank's shard and the shard being gathered) plus, while a group's weights are loaded
    in backward, the fp32 gradient sums of the block whose reduction is in flight (a layer's or the head's; the
    engine ends that reduction before the recompute, so it is in no micro-batch phase); NCCL's buffers are outside
    the allocator and not counted (the engine creates its communicators before reading free memory); in host
    memory, masters and states once and, per rank, its
    stash and the stored gradients of its shards (``host`` is the machine's total)."""
    emb, layers, head = block_params[0], list(block_params[1:-1]), block_params[-1]
    T, H, I, V = tokens_per_micro_batch, hidden_size, intermediate_size, vocab_size
    B = micro_batches
    window = T * B
    cb = compute_bytes
    n = max(1, min(int(stash_every), max(len(layers), 1)))
    mw = 4 if master_format == "fp32" else 2  # bytes of a master weight
    gb = cb if grad_format == "compute" else 1 + 4 / BLOCK_8BIT  # a stored gradient
    sb = state_bytes(state_format)
    chunked = master_format != "fp32" or grad_format != "compute" or state_format == "4bit"
    lay = max(layers, default=0)
    mat = max(H * I, H * H)  # the largest matrix of a decoder layer
    tied = head < V * H  # the head block owns only the final norm; it computes with the embedding's weight
    head_w = head + (V * H if tied else 0)  # parameters the head block computes with
    C = min(loss_chunk_tokens, T)

    def cast(n_):  # the compute-dtype copy made from a master on the device (none when the dtypes agree)
        return n_ * cb if mw != cb else 0

    def fetch(n_):  # an update's inputs copied in: master, optimizer states, the stored gradient
        return n_ * (mw + sb + gb)

    head_fetch = fetch(head) + (V * H * mw if tied else 0)  # plus the tied weight's master (no update of its own)

    def update_ws(n_):  # the update's temporaries for one parameter of n_ values
        if not chunked:  # grad.float() of the parameter being updated (none when gradients are kept in fp32)
            return n_ * 4 if gb != 4 else 0
        c = min(CHUNK, n_)  # per chunk: fp32 gradient, fp32 master copy, fp32 moments, noise / codes
        return c * (4 + (4 if mw != 4 else 0) + (8 if state_format == "4bit" else 0) + 8)

    hid = window * H * cb  # one copy of the window's hidden states (forward) or of their gradients (backward)
    one = T * H * cb  # one micro-batch's hidden state
    shared = V * H * 4 if tied else 0  # the head's fp32 gradient of a tied weight, kept until the embedding block
    inputs = window * (8 + 8 + 2 * 128 * cb)  # ids, shifted labels, rotary cos/sin (head_dim <= 128) per token
    # autograd's saved tensors of one decoder layer per token (recompute with grad, compute dtype, no autocast):
    # two RMSNorms (fp32 input, normalised output, rsqrt), the inputs of q/k/v and of gate/up, q, k, v and the
    # attention output plus the fp32 log-sum-exp (fused SDPA; heads of >= 64), gate, act(gate), up, their product
    acts_attn = (4 * H + cb * H + 4) + cb * H + 4 * cb * H + 4 * H // 64
    acts_mlp = (4 * H + cb * H + 4) + cb * H + 4 * cb * I
    # backward temporaries: the gradients of both factors of the gated product and of the residual stream
    # (MLP); the gradients of q, k, v (fp32 accumulation of dq) and of the attention output (attention)
    ws_mlp = 2 * cb * I + cb * H
    ws_attn = 3 * cb * H + 4 * H + 2 * cb * H

    phases: dict[str, dict[str, float]] = {}
    # forward, block k's deferred update on arrival: the previous block's weights (the name W still holds them),
    # block k's masters, states and stored gradients, its compute-dtype copy, the update's temporaries, the
    # window's hidden states (none yet for the embedding)
    phases["forward update (embedding)"] = {
        "weights": cast(emb), "update_staging": fetch(emb) + update_ws(V * H), "inputs": inputs}
    phases["forward update (layer)"] = {
        "weights": max(lay, emb) * cb + cast(lay), "update_staging": fetch(lay) + update_ws(mat),
        "hidden_states": hid, "inputs": inputs}
    phases["forward update (head)"] = {
        "weights": lay * cb + cast(head_w), "update_staging": head_fetch + update_ws(H if tied else V * H),
        "hidden_states": hid, "inputs": inputs}
    # forward, block k computing every micro-batch, block k+1's update inputs in flight: the old carry and the
    # new one being built (two copies of the window's hidden states), one micro-batch's no-grad temporaries
    phases["forward"] = {
        "weights": lay * cb, "transfer_buffers": max(fetch(lay), head_fetch),
        "hidden_states": 2 * hid, "activations": T * (2 * H + 3 * I) * cb, "inputs": inputs,
    }
    # LM head: its weights and fp32 gradient sums, the top group's masters prefetched for backward, per
    # micro-batch the final norm's saved tensors, its output, dy and dx; per chunk of tokens the fp32 logits,
    # their log-softmax and two gradients of that size, or (later in the chunk) the logits' gradient in the
    # compute dtype and the head weight's gradient
    n_top = len(layers) - (math.ceil(len(layers) / n) - 1) * n if layers else 0
    phases["head"] = {
        "weights": head_w * cb, "transfer_buffers": n_top * lay * mw, "gradients": head_w * 4,
        "hidden_states": hid + T * H * (4 + 4 * cb),
        "logits": max(16 * C * V, C * V * (4 + cb) + V * H * cb), "inputs": inputs,
    }
    # backward of a group of n layers, micro-batch i, differentiating layer j (0 = the top one): the group's
    # weights, the next group's first masters prefetched (the others follow after the micro-batches), the fp32
    # gradient sums of the group (from the second
    # micro-batch on), the window's output gradients, the stashed input h and the recomputed output; the saved
    # activations of the n - j layers not yet differentiated + that layer's temporaries, the weight gradients
    # of the j layers above it (held until autograd.grad returns) and its first weight gradient; at the end of
    # autograd.grad all the group's weight gradients (compute dtype) + dh
    # a block's fp32 gradient sums being reduced (the head's or a layer's) while the next group loads
    inflight = max(lay, head) * 4 if world > 1 else 0
    base = {"weights": n * lay * cb, "transfer_buffers": max(lay, emb) * mw, "hidden_states": hid + 2 * one,
            "gradients": shared, "inputs": inputs}
    accs = n * lay * 4 if B > 1 else 0
    starts = {}
    for j in range(n):
        tag = "" if n == 1 else f", layer {j + 1} of {n}"
        below = (n - 1 - j) * (acts_attn + acts_mlp)
        held = j * lay * cb
        starts[f"mlp{tag}"] = {"activations": T * (below + acts_attn + acts_mlp + ws_mlp),
                               "gradients": accs + held + H * I * cb}
        starts[f"attention{tag}"] = {"activations": T * (below + acts_attn + ws_attn),
                                     "gradients": accs + held + (3 * H * I + H * H) * cb}
    starts["end"] = {"hidden_states": one, "gradients": n * lay * 4 + n * lay * cb}
    for name, extra in starts.items():
        ph = dict(base)
        if offload_window is not None and name != "end":  # the SSD tier fetches the next group after the micro-batches
            ph.pop("transfer_buffers")
        for k, v in extra.items():
            ph[k] = ph.get(k, 0) + v
        phases[f"backward ({name})"] = ph
    # loading a group in backward: the group above's weights and fp32 gradient sums are still referenced
    phases["backward load"] = {
        "weights": max(n * lay * cb, head_w * cb) + cast(max(lay, emb)),
        "gradients": max(n * lay * 4, head_w * 4) + shared + inflight, "transfer_buffers": n * max(lay, emb) * mw,
        "hidden_states": hid, "inputs": inputs,
    }
    # the embedding's backward: its weights, fp32 gradient sums (a tied weight's include the head's), the dense
    # gradient of one micro-batch (compute dtype), the embedding output
    phases["embedding backward"] = {
        "weights": emb * cb, "gradients": emb * 4 + V * H * cb, "hidden_states": hid + one, "inputs": inputs,
        "activations": T * H * 4,  # the CUDA kernel's fp32 partial sums per index segment (at most one per token)
    }
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    gpu: dict[str, int] = {}
    for k, v in phases[peak_phase].items():  # per-token inputs are reported with the hidden states
        key = "hidden_states" if k == "inputs" else k
        gpu[key] = gpu.get(key, 0) + int(v)
    gpu = {k: v for k, v in gpu.items() if v}
    gpu["framework"] = 64 * 2**20  # cuBLAS workspaces (allocated through the caching allocator)
    per_rank = stash_host_bytes(block_params, window * H * cb, grad_bytes_per_param=gb / world, stash_every=n)
    host = {
        "master_weights": 0 if masters_exist else int(sum(block_params) * mw),
        "optimizer_states": int(sum(block_params) * sb),
        **{k: v * world for k, v in per_rank.items()},
    }
    disk = None
    if offload_window is not None:
        disk = ssd_traffic(block_params, master_format=master_format, state_format=state_format,
                           window=offload_window, stash_every=n, grad_format=grad_format if offload_grads else None,
                           compute_bytes=cb)
        host["master_weights"] = host["optimizer_states"] = 0
        host["ssd_window"] = disk["window_bytes"]
        if offload_grads:
            no_grads = stash_host_bytes(block_params, window * H * cb, grad_bytes_per_param=0, stash_every=n)
            host.update({k: v * world for k, v in no_grads.items()})
    out = {"gpu_bytes": sum(gpu.values()), "host_bytes": sum(host.values()), "gpu": gpu, "host": host,
           "gpu_peak_phase": peak_phase,
           "gpu_phases": {k: int(v + gpu["framework"]) for k, v in totals.items()}}
    if disk is not None:
        out["disk"] = disk
    return out


IO_ALIGN = 4096


def _aligned(n: float) -> int:
    return -(-math.ceil(n) // IO_ALIGN) * IO_ALIGN


def ssd_block_bytes(n_params: int, *, master_format: str, state_format: str) -> tuple[int, int]:
    """Bytes of one block's master region and of its states in its file (each region 4 KiB-aligned; the
    parameters' 256-value alignment inside a block is not counted: a few KiB per block)."""
    mw = 4 if master_format == "fp32" else 2
    return _aligned(n_params * mw), _aligned(n_params * state_bytes(state_format))


def ssd_traffic(block_params: list[int], *, master_format: str, state_format: str, window: int = 4,
                stash_every: int = 1, grad_format: str | None = None, compute_bytes: int = 2) -> dict:
    """Bytes the SSD tier moves per optimizer step (steady state: every block's update deferred to the next
    forward) and keeps on the disk.

    Forward: each block's masters and states are read and, updated, written back. Backward: each decoder layer's
    and the embedding's masters are read again, except those still in the window of host buffers when backward
    starts (the top ``window - 2`` layers: the head and one block in flight take two). With ``grad_format``
    (``compute`` / ``8bit``: the stored gradients on the disk too) each block's gradients are written in backward
    and read with the block in the next forward. Returns ``read_bytes``, ``write_bytes``, ``file_bytes`` (the live
    files; each checkpoint adds its masters and states once training moves on), ``window_bytes`` (host buffers: the
    window, grown to hold a ``stash_every`` group and the next block, plus two gradient staging buffers) and
    ``window`` (buffers)."""
    parts = [ssd_block_bytes(p, master_format=master_format, state_format=state_format) for p in block_params]
    gb = 0.0 if grad_format is None else (compute_bytes if grad_format == "compute" else 1 + 4 / BLOCK_8BIT)
    grads = [_aligned(p * gb) if gb else 0 for p in block_params]
    masters = [m for m, _ in parts]
    full = [m + s for m, s in parts]
    layers = masters[1:-1]
    hits = max(0, min(len(layers), window - 2))
    backward = sum(layers[: len(layers) - hits]) + masters[0]
    bufs = max(window, stash_every + 2)
    return {"read_bytes": sum(full) + backward + sum(grads), "write_bytes": sum(full) + sum(grads),
            "file_bytes": sum(full) + sum(grads), "window_bytes": bufs * max(f + g for f, g in zip(full, grads))
            + 2 * max(grads), "window": bufs, "master_bytes": sum(masters), "state_bytes": sum(full) - sum(masters),
            "grad_bytes": sum(grads)}


def disk_seconds(traffic: dict, read_gbps: float, write_gbps: float | None = None, disks: int = 1) -> float:
    """Seconds of disk transfer per step: reads and writes share each disk (its reads at ``read_gbps``, its writes
    at ``write_gbps``, default the same), blocks spread evenly over ``disks``."""
    w = write_gbps or read_gbps
    return (traffic["read_bytes"] / (read_gbps * 1e9) + traffic["write_bytes"] / (w * 1e9)) / max(1, disks)


def stash_host_bytes(block_params: list[int], act_bytes: float, *, grad_bytes_per_param: float,
                     stash_every: int) -> dict[str, int]:
    """Host bytes of the stash and stored gradients in :class:`~hf_lowmem.engine.store.StashPool`'s slots:
    G = ceil(N / n) stash slots of ``act_bytes`` (one layer input for the whole window), each shared with the
    gradients of the group below (slot 0 with the embedding's), plus one slot for the last group's gradients
    and one for the head's."""
    emb, layers, head = block_params[0], list(block_params[1:-1]), block_params[-1]
    n = max(1, stash_every)
    G = math.ceil(len(layers) / n)
    grads = [emb] + [sum(layers[g * n:(g + 1) * n]) for g in range(G)] + [head]  # slot 0 .. G+1
    gb = grad_bytes_per_param
    slots = [max(act_bytes if s < G else 0, grads[s] * gb) for s in range(G + 2)]
    stash = G * act_bytes
    return {"activation_stash": int(stash), "gradients": int(sum(slots) - stash)}


def smallest_stash_every(fits, n_layers: int) -> int | None:
    """The smallest n in 1..n_layers for which ``fits(n)`` is true, or ``None``."""
    for n in range(1, max(n_layers, 1) + 1):
        if fits(n):
            return n
    return None
