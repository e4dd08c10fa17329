"""The replay of one optimizer step: the GPU peak, its breakdown and when it happens, from a :class:`Step`."""

from __future__ import annotations

from hf_lowmem.planner.inputs import TrainSetup
from hf_lowmem.planner.step import Step


def replay(st: Step, setup: TrainSetup) -> tuple[int, dict[str, float], str]:
    """Walk one optimizer step and return the GPU peak, its breakdown and where it happens.

    Covers the first micro-batch of a window (gradients absent: the Trainer zeroes them with
    ``set_to_none``), a later micro-batch (all gradients present, new ones added in place) and the
    optimizer step (optimizer states are counted throughout: from the second step on they exist)."""
    L = len(st.acts)
    G_total = sum(st.grad_layer) + st.grad_embed + st.grad_head + st.grad_other
    best: tuple[float, dict[str, float], str] = (-1.0, {}, "")

    def cand(phase: str, **c: float) -> None:
        nonlocal best
        parts = {"weights": st.weights, "gradients": 0.0, "optimizer states": st.states, "activations": 0.0,
                 "logits": 0.0, "temporaries": 0.0, "transfer buffers": st.transfer, "framework overhead": st.overhead}
        for k, v in c.items():
            parts[k.replace("_", " ")] += v
        total = sum(parts.values())
        if total > best[0]:
            best = (total, parts, phase)

    def stored(i: int) -> float:
        return st.ckpt[i] if st.recompute[i] else st.acts[i]

    def resident(a: float) -> float:  # saved activations on the GPU (offloading keeps a window there)
        return min(a, st.offload_window) if st.offload_acts else a

    def in_forward(a: float, fast: float) -> float:
        """Saved activations on the GPU during forward: the resident ones, plus copies out not finished yet.
        Those pile up (to the cap) only where layers save faster than PCIe drains: ``fast``, the bytes saved
        by layers that are not checkpointed (a checkpointed layer saves one hidden state per layer's compute)."""
        return resident(a) + (min(max(fast - st.offload_window, 0.0), st.offload_pending) if st.offload_acts else 0.0)

    G = setup.grad_accum
    for first in ([True, False] if G > 1 else [True]):
        label = "first micro-batch" if first else "later micro-batch"
        frees = st.grad_free_per_param and (G == 1 or not first)  # layer-wise updates on the window's last one
        Gd = 0.0 if first else G_total
        A = cache = fast = 0.0
        for i in range(L):  # forward
            cand(f"forward, layer {i} ({label})", gradients=Gd, activations=in_forward(A, fast),
                 temporaries=st.fwd_ws[i], weights=cache + st.cache[i])
            A += stored(i)
            fast += 0.0 if st.recompute[i] else stored(i)
            cache += st.cache[i]  # autocast keeps every cast weight until the forward's autocast region ends
        cache += st.head_cache
        cand(f"loss forward ({label})", gradients=Gd, activations=in_forward(A, fast) + st.head_acts,
             logits=st.logits_fwd, weights=cache)
        # backward runs outside autocast: only the casts that autograd saved are still alive
        cache = st.head_cache + sum(c for c, r in zip(st.cache, st.recompute) if not r)
        cand(f"loss backward ({label})", gradients=Gd, activations=resident(A) + st.head_acts,
             logits=st.logits_bwd, weights=cache)
        head_g = st.grad_head + (st.grad_embed if st.grad_head == 0 else 0.0)  # tied: the embedding's, here
        if first and not frees:
            Gd += head_g + st.grad_other
        cache -= st.head_cache
        for i in reversed(range(L)):  # backward: the MLP half first, then the attention half
            g_mlp = st.grad_layer[i] * st.grad_mlp_frac
            full = st.acts[i]  # the layer's activations, kept or recomputed from its checkpoint
            others = max(A - stored(i), 0.0)
            others = min(others, st.offload_window) if st.offload_acts else others
            ck = st.ckpt[i] if st.recompute[i] else 0.0
            rc_cache = st.cache[i] if st.recompute[i] else 0.0
            ws_mlp, ws_attn = st.bwd_ws[i]
            extra = st.opt_ws if frees else 0.0
            if first:
                g1, g2 = st.first_mlp_grad, g_mlp + st.first_attn_grad
            else:  # computed, then added in place
                g1, g2 = st.first_mlp_grad, st.largest_grad_layer
            cand(f"backward, layer {i} ({label})", gradients=Gd + g1, activations=others + ck + full,
                 temporaries=ws_mlp + extra, weights=cache + rc_cache)
            cand(f"backward, layer {i} attention ({label})", gradients=Gd + g2,
                 activations=others + ck + full * (1 - st.mlp_frac), temporaries=ws_attn + extra,
                 weights=cache + rc_cache)
            A -= stored(i)
            if not st.recompute[i]:
                cache -= st.cache[i]
            if first and not frees:
                Gd += st.grad_layer[i]
            elif frees and not first:
                Gd -= st.grad_layer[i]
        # the embedding's gradient: allocated here, or (tied to the head, or a later micro-batch) computed
        # densely and then added in place
        cand(f"backward, embedding ({label})", gradients=Gd + st.grad_embed, temporaries=st.embed_bwd_ws)
    cand("optimizer step", gradients=0.0 if st.grad_free_per_param else G_total, temporaries=st.opt_ws + st.clip_ws)
    total, parts, phase = best
    return int(total), {k: v for k, v in parts.items() if v}, phase
