"""The weight-streaming engine: full-parameter training of a model much larger than the GPU.

Where things live
    * master weights: the model's own parameters, fp32, in pinned host memory;
    * optimizer states: pinned host memory, fp32 (exact AdamW) or 8-bit block-wise (bitsandbytes);
    * on the GPU: one block (decoder layer) of weights in the compute dtype plus the next one in flight,
      the hidden states of the accumulation window, one layer's activations, one block's fp32 gradients.

One optimizer step (an accumulation window of ``B`` micro-batches)
    1. forward, block by block, *every micro-batch through one block before the next*: the weights are
       streamed once per window, not once per micro-batch. Each block's inputs are copied to host memory
       (the "stash") for the backward pass; the hidden states themselves stay on the GPU.
    2. the LM head computes the loss in token chunks (the full logits never exist) and its gradient at once.
    3. backward, block by block in reverse, recomputing each block's forward from the stashed inputs; the
       block's parameter gradients are summed over the micro-batches in fp32 on the GPU, their norm is
       taken, and they leave the GPU (into the stash slot the block no longer needs).
    4. ``optimizer.step()`` records the learning rate and the clipping coefficient (the global norm is
       known only now); the update of each block is applied on the GPU the next time that block's weights
       are streamed in (next forward, evaluation, or :meth:`StreamEngine.flush`), with its states streamed in
       and out alongside. Same arithmetic as an immediate update; the update costs no extra pass.

All copies run on two side streams (host-to-device, device-to-host), ordered with events, so they overlap
compute. On a CPU-only run the same code path runs with plain copies, which is what the tests compare
against a plain ``Trainer``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_lowmem.engine.anatomy import Anatomy, Block, find_anatomy
from hf_lowmem.engine.device import Device, cgroup_memory_limit
from hf_lowmem.engine.optim import StreamAdamW, clip_coefficient
from hf_lowmem.engine.stream_options import GiB, StreamOptions, parse_bytes
from hf_lowmem.errors import MemoryBudgetError, PluginError

logger = logging.getLogger("hf_lowmem")



class _Captured(Exception):
    pass


@dataclass
class _MicroBatch:
    ids: torch.Tensor  # (b, s) on the device
    shift_labels: torch.Tensor  # (b*s,) on the device
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    tokens: int
    kwargs: dict | None = None  # the decoder-layer keyword arguments (rotary embeddings, mask, ...)
    offset: int = 0  # element offset of this micro-batch's hidden states inside a stash slot


class _Fetch:
    """A block's tensors in flight to the device: per parameter, the fp32 master and (when an update is
    pending) its optimizer states and gradient, each with the event that marks its copy done."""

    def __init__(self, k: int, update: bool, lrs: list[float] | None = None, clip: float = 1.0):
        self.k, self.update, self.lrs, self.clip = k, update, lrs, clip
        self.items: list[tuple[str, torch.nn.Parameter, torch.Tensor, Any, dict, torch.Tensor | None, Any]] = []
        self.shared: list[tuple[str, torch.Tensor, Any]] = []


class StreamEngine:
    """See the module docstring. Created by the ``stream`` plugin; the Trainer talks to it through the
    :class:`~hf_lowmem.engine.interface.TrainingEngine` interface."""

    def __init__(self, model: torch.nn.Module, args: Any, trainer: Any = None, options: StreamOptions | None = None,
                 optimizer_name: str | None = None, param_groups: list[dict] | None = None):
        self.options = options or StreamOptions()
        self.args, self.trainer = args, trainer
        self.dev = Device(args.device, profile=self.options.profile)
        self.anat: Anatomy = find_anatomy(model)
        self.blocks: list[Block] = self.anat.blocks
        self.num_blocks = len(self.blocks)
        if getattr(args, "fp16", False):
            raise PluginError("the stream engine computes in bf16 or fp32; fp16 needs loss scaling it does not do. "
                              "Use --bf16 instead of --fp16")
        self.compute_dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float32
        self.grad_dtype = self.compute_dtype  # gradients kept between backward and the deferred update
        states = self.options.states
        if states == "auto":
            states = "8bit" if optimizer_name in ("bnb-adamw8bit", "adamw8bit") else "fp32"
        if states == "8bit":
            try:
                import bitsandbytes  # noqa: F401
            except Exception as e:
                from hf_lowmem.errors import MissingExtraError

                raise MissingExtraError("stream (8-bit states)", "bitsandbytes", "bnb", e) from e
        self.state_format = states
        self.hidden_size = self.anat.embed.embedding_dim
        self._slots: list[torch.Tensor] = []
        self._slot_elems_act = 0
        self._slot_read_ev: dict[int, Any] = {}
        self._slot_write_ev: dict[int, Any] = {}
        self._grad_layout: list[dict[str, tuple[int, torch.Size]]] = []
        self._master_ev: dict[int, Any] = {}
        self._shared_acc: dict[int, torch.Tensor] = {}
        self._prefetched: dict[int, _Fetch] = {}
        self.pending: dict | None = None
        self._window: list[_MicroBatch] | None = None
        self._losses: list[torch.Tensor] = []
        self._calls = 0
        self._sumsq: torch.Tensor | None = None
        self.total_norm: torch.Tensor | None = None
        self._clip_coef = 1.0
        self.stats = {"windows": 0, "tokens": 0}

        if self.options.check_memory:
            self.check_host_memory(window_tokens=0)
        self._place_masters(model)
        for m in self.anat.extras:  # e.g. rotary embeddings: buffers only
            m.to(self.dev.device)
        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.optimizer = StreamAdamW(param_groups, self, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                     eps=args.adam_epsilon, weight_decay=args.weight_decay, state_format=self.state_format)
        for b in self.blocks:
            for p in b.params.values():
                self.optimizer.ensure_state(p)
        self._build_grad_layout()

    # ---- setup -----------------------------------------------------------------------------------------
    def _place_masters(self, model: torch.nn.Module) -> None:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise PluginError(f"the stream engine trains every parameter; these are frozen: {frozen[:5]}")
        for p in model.parameters():
            t = p.data
            if t.device.type != "cpu":
                t = t.to("cpu")
            if t.dtype != torch.float32:
                t = t.float()
            p.data = self.dev.pin(t.contiguous())

    def _build_grad_layout(self) -> None:
        es = torch.empty((), dtype=self.grad_dtype).element_size()
        self._grad_layout = []
        for b in self.blocks:
            layout, off = {}, 0
            for name, p in b.params.items():
                layout[name] = (off, p.shape)
                off += p.numel() * es
            self._grad_layout.append(layout)
        self._grad_bytes = [sum(p.numel() for p in b.params.values()) * es for b in self.blocks]

    def _ensure_slots(self, window_tokens: int) -> None:
        """Host memory for the stash: slot ``k`` holds block ``k``'s outputs (the next block's inputs) during
        a window, then block ``k``'s gradients until the deferred update. Grows when a window is larger."""
        need = window_tokens * self.hidden_size
        if self._slots and need <= self._slot_elems_act:
            return
        if self._slots:
            self.flush()  # the slots hold pending gradients: apply them before reallocating
        if self.options.check_memory:
            self.check_host_memory(window_tokens=window_tokens)
        es = torch.empty((), dtype=self.compute_dtype).element_size()
        n_layers = self.anat.num_layers
        for old in self._slots:
            self.dev.release(old)
        self._slots = []
        for k in range(self.num_blocks):  # slot k: block k's outputs (k < N), then block k's gradients
            act = need * es if k < n_layers else 0
            nbytes = max(act, self._grad_bytes[k])
            self._slots.append(self.dev.empty_host(max(nbytes, 1), torch.uint8))
        self._slot_elems_act = need
        self._slot_read_ev.clear()
        self._slot_write_ev.clear()

    # ---- memory planning -------------------------------------------------------------------------------
    def estimate(self, tokens_per_micro_batch: int, micro_batches: int) -> dict[str, int]:
        """Bytes this engine needs on the GPU and in host memory for a window of ``micro_batches`` of
        ``tokens_per_micro_batch`` tokens."""
        return estimate_stream_memory(
            block_params=[sum(p.numel() for p in b.params.values()) for b in self.blocks],
            hidden_size=self.hidden_size,
            intermediate_size=getattr(self.anat.model.config, "intermediate_size", 4 * self.hidden_size),
            vocab_size=self.anat.head.out_features,
            tokens_per_micro_batch=tokens_per_micro_batch, micro_batches=micro_batches,
            compute_bytes=torch.empty((), dtype=self.compute_dtype).element_size(),
            state_format=self.state_format, loss_chunk_tokens=self.options.loss_chunk_tokens,
            masters_exist=True,
        )

    def check_host_memory(self, window_tokens: int) -> None:
        """Refuse, with both numbers, host memory the engine would not get.

        With a declared budget (``lowmem_host_memory``, or the plugin's ``host_memory`` option) the engine's
        whole host footprint (fp32 masters, optimizer states, activation stash) is compared with it. Without
        one, what is still to be allocated is compared with the memory the OS reports available now (some
        VMs grow their RAM as it is used and report less: declare the budget there)."""
        import psutil

        declared = parse_bytes(self.options.host_memory) or parse_bytes(getattr(self.args, "lowmem_host_memory", None))
        params = sum(p.numel() for b in self.blocks for p in b.params.values())
        state_b = 2.0 + 8 / 256 if self.state_format == "8bit" else 8.0
        es = torch.empty((), dtype=self.compute_dtype).element_size()
        parts = {"fp32 master weights": params * 4, "optimizer states": params * state_b,
                 "activation stash": self.anat.num_layers * window_tokens * self.hidden_size * es
                 + (self._grad_bytes[-1] if window_tokens else 0)}
        if declared:
            need, budget = int(sum(parts.values())), declared
            what = "in all (" + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in parts.items() if v) + ")"
            where = "the declared host budget"
        else:
            if window_tokens == 0:  # at start: master conversion + optimizer states
                need = int(parts["optimizer states"] + sum(
                    p.numel() * 4 for b in self.blocks for p in b.params.values() if p.dtype != torch.float32))
                what = "more for optimizer states and fp32 master weights"
            else:
                need = int(parts["activation stash"])
                what = f"more for the activation stash of {window_tokens} tokens per window"
            budget = _available_host_bytes()
            where = f"the memory available now (RSS {psutil.Process().memory_info().rss / GiB:.1f} GiB)"
        if need > budget:
            raise MemoryBudgetError(
                f"the stream engine needs {need / GiB:.1f} GiB of host memory {what}, but {where} is "
                f"{budget / GiB:.1f} GiB. Use 8-bit optimizer states (lowmem_options={{'stream': {{'states': '8bit'}}}}), "
                "fewer tokens per accumulation window, or more RAM (if this machine has more than it reports, "
                "declare it with lowmem_host_memory).")

    def check_gpu_memory(self, tokens_per_micro_batch: int, micro_batches: int) -> None:
        if not self.dev.cuda:
            return
        est = self.estimate(tokens_per_micro_batch, micro_batches)
        budget = parse_bytes(self.options.gpu_memory) or _gpu_budget_bytes(self.dev.device)
        if est["gpu_bytes"] > budget:
            raise MemoryBudgetError(
                f"the stream engine needs about {est['gpu_bytes'] / GiB:.2f} GiB of GPU memory for micro-batches of "
                f"{tokens_per_micro_batch} tokens ({micro_batches} per window), but {budget / GiB:.2f} GiB is available "
                f"to this process. Use a smaller per_device_train_batch_size (and more gradient_accumulation_steps) "
                f"or shorter sequences. Breakdown (GiB): "
                + ", ".join(f"{k}={v / GiB:.2f}" for k, v in est["gpu"].items()))

    # ---- the TrainingEngine interface -----------------------------------------------------------------
    def begin_window(self, batches: list[dict], num_items_in_batch: Any) -> None:
        self._window_batches = batches
        self._window_items = num_items_in_batch
        self._calls = 0
        self._losses = []

    def training_step(self, inputs: dict, num_items_in_batch: Any) -> torch.Tensor:
        if self._calls == 0:
            self._run_window(self._window_batches, self._window_items)
        loss = self._losses[self._calls]
        self._calls += 1
        return loss.to(self.args.device)

    def clip_grad_norm(self, max_norm: float):
        if self.total_norm is None:
            raise RuntimeError("clip_grad_norm before any backward")
        self._clip_coef = clip_coefficient(self.total_norm, max_norm)
        return self.total_norm.to(self.args.device)

    def record_optimizer_step(self, optimizer: StreamAdamW) -> None:
        if self.pending is not None:
            self.flush()
        self.pending = {"lrs": [g["lr"] for g in optimizer.param_groups], "clip": self._clip_coef,
                        "todo": set(range(self.num_blocks))}
        self._clip_coef = 1.0

    def profile_totals(self) -> dict[str, float]:
        """Seconds of copy-stream and compute-segment time, and GB copied, summed since the start
        (``options.profile`` only; synchronizes)."""
        return dict(self.dev.profile.collect()) if self.dev.profile is not None else {}

    def discard_pending(self) -> None:
        self.pending = None
        self._prefetched.clear()

    @torch.no_grad()
    def flush(self) -> None:
        """Apply any deferred update, so the model's parameters and optimizer states are current."""
        for k in sorted(self._prefetched):  # fetched ahead, possibly with an update in flight
            self._materialize(self._prefetched.pop(k))
        while self.pending is not None:
            self._materialize(self._fetch(min(self.pending["todo"])))
        self.dev.synchronize()

    @torch.no_grad()
    def eval_loss(self, inputs: dict) -> torch.Tensor:
        mb = self._micro_batch(inputs)
        W = self._load(0)
        self._prefetch(1)
        h = self._embed(W, mb)
        for k in range(1, self.anat.num_layers + 1):
            W = self._load(k)
            self._prefetch(k + 1)
            h = self._layer(k, W, h, mb)
        W = self._load(self.num_blocks - 1)
        y = self._norm(W, h).flatten(0, -2)
        total = torch.zeros((), device=self.dev.device, dtype=torch.float32)
        for lo, hi in self._chunks(mb.tokens):
            logits = self._head_logits(W, y[lo:hi]).float()
            total += F.cross_entropy(logits, mb.shift_labels[lo:hi], ignore_index=-100, reduction="sum")
        count = (mb.shift_labels != -100).sum()
        return total / count

    # ---- pieces of a block's computation ----------------------------------------------------------------
    def _micro_batch(self, inputs: dict) -> _MicroBatch:
        d = self.dev.device
        ids = inputs["input_ids"].to(d, non_blocking=True)
        if "shift_labels" in inputs:
            sl = inputs["shift_labels"]
        else:
            labels = inputs.get("labels", inputs["input_ids"])
            sl = F.pad(labels, (0, 1), value=-100)[..., 1:]
        am = inputs.get("attention_mask")
        pos = inputs.get("position_ids")
        return _MicroBatch(ids=ids, shift_labels=sl.reshape(-1).to(d, non_blocking=True),
                           attention_mask=am.to(d) if am is not None else None,
                           position_ids=pos.to(d) if pos is not None else None, tokens=ids.numel())

    def _embed(self, W: dict, mb: _MicroBatch) -> torch.Tensor:
        e = functional_call(self.anat.embed, W, (mb.ids,))
        if mb.kwargs is None:
            mb.kwargs = self._capture_layer_kwargs(e, mb)
        return e

    def _capture_layer_kwargs(self, e: torch.Tensor, mb: _MicroBatch) -> dict:
        """Run the decoder's own forward up to its first layer (with the embeddings given) and keep the
        keyword arguments it passes to the layer: rotary embeddings, causal mask, positions."""
        captured: dict = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        handle = self.anat.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.anat.base(inputs_embeds=e, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                               use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "kwargs" not in captured:
            raise PluginError(f"{type(self.anat.base).__name__} did not call its first decoder layer")
        kwargs = dict(captured["kwargs"])
        hidden = captured["args"][0] if captured["args"] else kwargs.pop("hidden_states")
        if hidden is not e:
            raise PluginError(f"{type(self.anat.model).__name__} transforms the embeddings before its first layer; "
                              "the stream engine does not support that yet")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        return kwargs

    def _layer(self, k: int, W: dict, h: torch.Tensor, mb: _MicroBatch) -> torch.Tensor:
        out = functional_call(self.blocks[k].module, W, (h,), mb.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _norm(self, W: dict, h: torch.Tensor) -> torch.Tensor:
        if self.anat.norm is None:
            return h
        return functional_call(self.anat.norm, {n[5:]: t for n, t in W.items() if n.startswith("norm.")}, (h,))

    def _head_logits(self, W: dict, y: torch.Tensor) -> torch.Tensor:
        return functional_call(self.anat.head, {n[5:]: t for n, t in W.items() if n.startswith("head.")}, (y,))

    def _chunks(self, n: int):
        step = int(self.options.loss_chunk_tokens)
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)]

    # ---- streaming weights in (and deferred updates) ----------------------------------------------------
    def _fetch(self, k: int) -> _Fetch:
        """Start copying block ``k`` to the device (masters; states and gradients when an update is pending)."""
        update = self.pending is not None and k in self.pending["todo"]
        f = _Fetch(k, update, self.pending["lrs"] if update else None, self.pending["clip"] if update else 1.0)
        b = self.blocks[k]
        layout = self._grad_layout[k]
        for name, p in b.params.items():
            master, ev = self.dev.to_device(p.data, after=self._master_ev.get(id(p)))
            states, grad, gev = {}, None, None
            if update:
                st = self.optimizer.state[p]
                for key, v in st.items():  # queued before the gradient, so its event covers them (FIFO stream)
                    if key != "step":
                        states[key] = self.dev.to_device(v)[0]
                off, shape = layout[name]
                n = p.numel() * torch.empty((), dtype=self.grad_dtype).element_size()
                host = self._grad_host(k)[off:off + n].view(self.grad_dtype).view(shape)
                grad, gev = self.dev.to_device(host, after=self._slot_write_ev.get(k))
            f.items.append((name, p, master, ev, states, grad, gev))
        for name, p in b.shared.items():
            master, ev = self.dev.to_device(p.data, after=self._master_ev.get(id(p)))
            f.shared.append((name, master, ev))
        if update:
            self.pending["todo"].discard(k)
            self._slot_read_ev[k] = self.dev.record(self.dev.h2d)
            if not self.pending["todo"]:
                self.pending = None
        return f

    def _grad_host(self, k: int) -> torch.Tensor:
        return self._slots[k]

    def _materialize(self, f: _Fetch) -> dict[str, torch.Tensor]:
        """Wait for a fetch, apply its pending update on the device, write the new masters and states back
        (device-to-host, in the background), and return the block's weights in the compute dtype."""
        W: dict[str, torch.Tensor] = {}
        for name, p, master, ev, states, grad, gev in f.items:
            self.dev.wait(ev)
            if f.update:
                self.dev.wait(gev)
                lr = f.lrs[self.optimizer._group_of[id(p)]]
                with self.dev.segment("optimizer"):
                    self.optimizer.update(p, master, grad.float(), states, lr, f.clip)
                self._master_ev[id(p)] = self.dev.to_host(master, p.data)
                st = self.optimizer.state[p]
                for key, t in states.items():
                    self.dev.to_host(t, st[key])
            W[name] = master.to(self.compute_dtype) if master.dtype != self.compute_dtype else master
        for name, master, ev in f.shared:
            self.dev.wait(ev)
            W[name] = master.to(self.compute_dtype) if master.dtype != self.compute_dtype else master
        return W

    def _prefetch(self, k: int) -> None:
        if 0 <= k < self.num_blocks and k not in self._prefetched:
            self._prefetched[k] = self._fetch(k)

    def _load(self, k: int) -> dict[str, torch.Tensor]:
        f = self._prefetched.pop(k, None) or self._fetch(k)
        return self._materialize(f)

    # ---- one accumulation window -------------------------------------------------------------------------
    def _run_window(self, batches: list[dict], num_items: Any) -> None:
        dev = self.dev
        mbs = [self._micro_batch(b) for b in batches]
        B = len(mbs)
        offset = 0
        for mb in mbs:
            mb.offset = offset
            offset += mb.tokens * self.hidden_size
        window_tokens = offset // self.hidden_size
        if self.stats["windows"] == 0 and self.options.check_memory:
            self.check_gpu_memory(max(mb.tokens for mb in mbs), B)
        self._ensure_slots(window_tokens)
        # loss scale: what the Trainer's compute_loss + training_step would do
        scaled = num_items is not None and getattr(self.trainer, "model_accepts_loss_kwargs", True)
        if scaled:
            n_items = float(num_items.item() if torch.is_tensor(num_items) else num_items)
            scales = [_inverse(n_items)] * B
        else:
            scales = [_inverse(float((mb.shift_labels != -100).sum().item()) * B) for mb in mbs]
        n_layers = self.anat.num_layers

        # 1. forward, block-major
        with torch.no_grad():
            self._prefetch(0)
            W = self._load(0)
            self._prefetch(1)
            with self.dev.segment("forward"):
                carry = [self._embed(W, mb) for mb in mbs]
            for k in range(1, n_layers + 1):
                self._stash(k - 1, carry, mbs)
                W = self._load(k)
                self._prefetch(k + 1)
                with self.dev.segment("forward"):
                    carry = [self._layer(k, W, h, mb) for h, mb in zip(carry, mbs)]
        # 2. head: loss and its gradient at once
        hk = self.num_blocks - 1
        W = self._load(hk)
        self._prefetch(n_layers)  # the last layer again, for backward
        leaves = {n: t.detach().requires_grad_(True) for n, t in W.items()}
        accs = self._new_accs(hk)
        losses, sumsq = [], torch.zeros((), device=dev.device, dtype=torch.float32)
        for i, (h, mb) in enumerate(zip(carry, mbs)):
            with self.dev.segment("head"):
                loss_i, dx = self._head_fwd_bwd(leaves, h, mb, scales[i], accs)
            losses.append(loss_i)
            carry[i] = dx
        sumsq = self._store_grads(hk, accs, sumsq)
        # 3. backward, block-major in reverse, recomputing each block
        for k in range(n_layers, 0, -1):
            W = self._load(k)
            self._prefetch(k - 1)
            leaves = {n: t.detach().requires_grad_(True) for n, t in W.items()}
            accs = self._new_accs(k)
            names = list(leaves)
            for i, mb in enumerate(mbs):
                h = self._unstash(k - 1, mb).requires_grad_(True)
                with self.dev.segment("backward"), torch.enable_grad():
                    out = self._layer(k, leaves, h, mb)
                    grads = torch.autograd.grad(out, [h] + [leaves[n] for n in names], carry[i])
                    carry[i] = grads[0]
                    for n, g in zip(names, grads[1:]):
                        self._accumulate(accs, n, g)
                del out, grads, h
            sumsq = self._store_grads(k, accs, sumsq)
        W = self._load(0)
        leaves = {n: t.detach().requires_grad_(True) for n, t in W.items()}
        accs = self._new_accs(0)
        for i, mb in enumerate(mbs):
            with torch.enable_grad():
                e = functional_call(self.anat.embed, leaves, (mb.ids,))
                (g,) = torch.autograd.grad(e, [leaves["weight"]], carry[i])
            self._accumulate(accs, "weight", g)
        carry = None
        sumsq = self._store_grads(0, accs, sumsq)
        self.total_norm = sumsq.sqrt()
        self._losses = [l.detach() for l in losses]
        self.stats["windows"] += 1
        self.stats["tokens"] += window_tokens

    def _head_fwd_bwd(self, leaves: dict, h: torch.Tensor, mb: _MicroBatch, scale: float, accs: dict):
        x = h.detach().requires_grad_(True)
        norm_leaves = {n: t for n, t in leaves.items() if n.startswith("norm.")}
        head_leaves = {n: t for n, t in leaves.items() if n.startswith("head.")}
        with torch.enable_grad():
            y = self._norm(norm_leaves, x)
        y_flat = y.detach().flatten(0, -2)
        dy = torch.empty_like(y_flat)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        hw = [head_leaves[n] for n in head_leaves]
        for lo, hi in self._chunks(mb.tokens):
            yc = y_flat[lo:hi].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self._head_logits(head_leaves, yc).float()
                lc = F.cross_entropy(logits, mb.shift_labels[lo:hi], ignore_index=-100, reduction="sum") * scale
                g = torch.autograd.grad(lc, [yc] + hw)
            dy[lo:hi] = g[0]
            for n, gw in zip(head_leaves, g[1:]):
                self._accumulate(accs, n, gw)
            loss += lc.detach()
            del logits, lc, g
        if norm_leaves:
            with torch.enable_grad():
                g = torch.autograd.grad(y, [x] + list(norm_leaves.values()), dy.view_as(y))
            dx = g[0]
            for n, gw in zip(norm_leaves, g[1:]):
                self._accumulate(accs, n, gw)
        else:
            dx = dy.view_as(x)
        return loss, dx

    def _new_accs(self, k: int) -> dict[str, torch.Tensor | None]:
        accs: dict[str, torch.Tensor | None] = {n: None for n in self.blocks[k].params}
        for n, p in self.blocks[k].params.items():  # a tied weight: the head's gradient is waiting here
            if id(p) in self._shared_acc:
                accs[n] = self._shared_acc.pop(id(p))
        for n in self.blocks[k].shared:
            accs[n] = None
        return accs

    @staticmethod
    def _accumulate(accs: dict, name: str, g: torch.Tensor) -> None:
        if accs.get(name) is None:
            accs[name] = g.float() if g.dtype != torch.float32 else g.clone()
        else:
            accs[name].add_(g)

    def _store_grads(self, k: int, accs: dict, sumsq: torch.Tensor) -> torch.Tensor:
        """Move block ``k``'s summed gradients to host memory (its stash slot, or the head's buffer); add their
        squared norms to ``sumsq``. A tied weight's gradient from the head waits on the device for its owner."""
        b = self.blocks[k]
        for n, p in b.shared.items():
            if accs.get(n) is not None:
                prev = self._shared_acc.get(id(p))
                self._shared_acc[id(p)] = accs[n] if prev is None else prev.add_(accs[n])
        host = self._grad_host(k)
        layout = self._grad_layout[k]
        after = self._slot_read_ev.get(k)
        for n, p in b.params.items():
            g = accs[n]
            if g is None:
                g = torch.zeros(p.shape, device=self.dev.device, dtype=torch.float32)
            sumsq = sumsq + torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
            off, shape = layout[n]
            nbytes = p.numel() * torch.empty((), dtype=self.grad_dtype).element_size()
            dst = host[off:off + nbytes].view(self.grad_dtype).view(shape)
            self._slot_write_ev[k] = self.dev.to_host(g.to(self.grad_dtype), dst, after=after)
        return sumsq

    def _stash(self, k: int, carry: list[torch.Tensor], mbs: list[_MicroBatch]) -> None:
        """Copy block ``k``'s outputs (the next block's inputs) for every micro-batch into slot ``k``."""
        slot = self._slots[k].view(self.compute_dtype)
        after = self._slot_read_ev.get(k)  # the pending update read this slot's gradients
        for h, mb in zip(carry, mbs):
            dst = slot[mb.offset: mb.offset + h.numel()].view(h.shape)
            self._slot_write_ev[k] = self.dev.to_host(h, dst, after=after)

    def _unstash(self, k: int, mb: _MicroBatch) -> torch.Tensor:
        slot = self._slots[k].view(self.compute_dtype)
        n = mb.tokens * self.hidden_size
        src = slot[mb.offset: mb.offset + n].view(*mb.ids.shape, self.hidden_size)
        t, ev = self.dev.to_device(src, after=self._slot_write_ev.get(k))
        self._slot_read_ev[k] = ev
        self.dev.wait(ev)
        return t


def _inverse(n: float) -> float:
    """The loss scale of ``n`` labelled tokens. A window (or micro-batch) whose labels are all masked gets a zero
    loss and zero gradients, as a plain Trainer does, instead of a division by zero."""
    return 1.0 / n if n > 0 else 0.0


def _available_host_bytes() -> int:
    """RAM the OS reports available now, capped by what the cgroup limit leaves this process."""
    import psutil

    avail = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit is not None:
        avail = min(avail, limit - psutil.Process().memory_info().rss)
    return avail


def _gpu_budget_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    try:
        frac = torch.cuda.get_per_process_memory_fraction(device)
    except (AttributeError, RuntimeError):
        frac = 1.0
    cap = int(total * frac) - torch.cuda.memory_allocated(device)
    return min(free, cap)


def estimate_stream_memory(*, block_params: list[int], hidden_size: int, intermediate_size: int, vocab_size: int,
                           tokens_per_micro_batch: int, micro_batches: int, compute_bytes: int = 2,
                           state_format: str = "8bit", loss_chunk_tokens: int = 2048,
                           masters_exist: bool = False) -> dict:
    """The stream engine's memory model, in bytes: ``gpu_bytes`` (peak allocated, as
    ``torch.cuda.max_memory_allocated`` counts it) and ``host_bytes``, each with a breakdown, plus the total
    of every phase (``gpu_phases``) and the one that sets the peak (``gpu_peak_phase``).
    ``block_params``: parameters of [embedding, layer 1..N, norm+head] (a tied LM head's weight belongs to
    the embedding, so the last block is then only the norm).

    Each phase counts the device tensors :meth:`StreamEngine._run_window` holds at that moment (a tensor
    counts from its allocation until the last Python reference to it goes, which is when the caching
    allocator stops counting it even if a copy stream still reads it). Nothing depends on the number of
    layers: only one or two blocks are on the device at a time. Decoder layers are counted as Llama-style
    layers (q/k/v/o projections, gated MLP, RMSNorm) with full-width k and v, an upper bound for grouped KV
    heads. The peak of a Llama-2-7B-shaped layer is the backward of a decoder layer; checked against
    ``torch.cuda.max_memory_allocated`` on an H200 in ``tests/test_stream_estimate.py``."""
    emb, layers, head = block_params[0], list(block_params[1:-1]), block_params[-1]
    T, H, I, V = tokens_per_micro_batch, hidden_size, intermediate_size, vocab_size
    B = micro_batches
    window = T * B
    cb = compute_bytes
    gb = cb  # the engine keeps gradients between backward and the deferred update in the compute dtype
    sb = 2.0 + 8 / 256 if state_format == "8bit" else 8.0
    lay = max(layers, default=0)
    mat = max(H * I, H * H)  # the largest matrix of a decoder layer
    tied = head < V * H  # the head block owns only the final norm; it computes with the embedding's weight
    head_w = head + (V * H if tied else 0)  # parameters the head block computes with
    C = min(loss_chunk_tokens, T)

    def cast(n):  # the compute-dtype copy made from an fp32 master on the device (none in fp32)
        return n * cb if cb != 4 else 0

    def fetch(n):  # an update's inputs copied in: fp32 master, optimizer states, the stored gradient
        return n * (4 + sb + gb)

    head_fetch = fetch(head) + (V * H * 4 if tied else 0)  # plus the tied weight's master (no update of its own)

    def upcast(n):  # grad.float() of the parameter being updated (none when gradients are kept in fp32)
        return n * 4 if gb != 4 else 0

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
    # forward, block k's deferred update on arrival (_load -> _materialize): the previous block's weights (the
    # name W still holds them), block k's fp32 masters, states and stored gradients, its compute-dtype copy, the
    # upcast gradient of one parameter, the window's hidden states (none yet for the embedding)
    phases["forward update (embedding)"] = {
        "weights": cast(emb), "update_staging": fetch(emb) + upcast(V * H), "inputs": inputs}
    phases["forward update (layer)"] = {
        "weights": max(lay, emb) * cb + cast(lay), "update_staging": fetch(lay) + upcast(mat),
        "hidden_states": hid, "inputs": inputs}
    phases["forward update (head)"] = {
        "weights": lay * cb + cast(head_w), "update_staging": head_fetch + upcast(H if tied else V * H),
        "hidden_states": hid, "inputs": inputs}
    # forward, block k computing every micro-batch, block k+1's update inputs in flight: the old carry and the
    # new one being built (two copies of the window's hidden states), one micro-batch's no-grad temporaries
    phases["forward"] = {
        "weights": lay * cb, "transfer_buffers": max(fetch(lay), head_fetch),
        "hidden_states": 2 * hid, "activations": T * (2 * H + 3 * I) * cb, "inputs": inputs,
    }
    # LM head: its weights and fp32 gradient sums, the last layer's masters prefetched for backward, per
    # micro-batch the final norm's saved tensors, its output, dy and dx; per chunk of tokens the fp32 logits,
    # their log-softmax and two gradients of that size, or (later in the chunk) the logits' gradient in the
    # compute dtype and the head weight's gradient
    phases["head"] = {
        "weights": head_w * cb, "transfer_buffers": lay * 4, "gradients": head_w * 4,
        "hidden_states": hid + T * H * (4 + 4 * cb),
        "logits": max(16 * C * V, C * V * (4 + cb) + V * H * cb), "inputs": inputs,
    }
    # backward of decoder layer k, micro-batch i: its weights, block k-1's fp32 masters prefetched, the fp32
    # gradient sums (from the second micro-batch on), the window's output gradients, the stashed input h and
    # the recomputed output; at the start of its backward all saved activations + the MLP temporaries + the
    # first weight gradient; at the end of autograd.grad all its weight gradients (compute dtype) + dh
    base = {"weights": lay * cb, "transfer_buffers": max(lay, emb) * 4, "hidden_states": hid + 2 * one,
            "gradients": shared, "inputs": inputs}
    accs = lay * 4 if B > 1 else 0
    starts = {
        "mlp": {"activations": T * (acts_attn + acts_mlp + ws_mlp), "gradients": accs + H * I * cb},
        "attention": {"activations": T * (acts_attn + ws_attn), "gradients": accs + (3 * H * I + H * H) * cb},
        "end": {"hidden_states": one, "gradients": lay * 4 + lay * cb},
    }
    for name, extra in starts.items():
        ph = dict(base)
        for k, v in extra.items():
            ph[k] = ph.get(k, 0) + v
        phases[f"backward ({name})"] = ph
    # loading block k in backward: block k+1's weights and fp32 gradient sums are still referenced
    phases["backward load"] = {
        "weights": max(lay * cb, head_w * cb) + cast(max(lay, emb)),
        "gradients": max(lay * 4, head_w * 4) + shared, "transfer_buffers": max(lay, emb) * 4,
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
    gpu["framework"] = int(64 * 2**20)  # cuBLAS workspaces (allocated through the caching allocator)
    # host: pinned fp32 masters (the model's own parameters when they are already fp32), states, and the stash:
    # slot k holds block k's outputs during a window (k < N), then block k's gradients until the update
    n_layers = len(layers)
    slots = [max(window * H * cb if k < n_layers else 0, n * gb) for k, n in enumerate(block_params)]
    stash = n_layers * window * H * cb
    host = {
        "master_weights": 0 if masters_exist else int(sum(block_params) * 4),
        "optimizer_states": int(sum(block_params) * sb),
        "activation_stash": int(stash),
        "gradients": int(sum(slots) - stash),
    }
    return {"gpu_bytes": sum(gpu.values()), "host_bytes": sum(host.values()), "gpu": gpu, "host": host,
            "gpu_peak_phase": peak_phase,
            "gpu_phases": {k: int(v + gpu["framework"]) for k, v in totals.items()}}
