"""The weight-streaming engine: full-parameter training of a model much larger than the GPU.

Where things live
    * host memory (:mod:`hf_lowmem.engine.store`, allocated by :mod:`hf_lowmem.engine.hostmem`: page-locked,
      never inherited by forked DataLoader workers): per block (embedding, each decoder layer, final norm +
      LM head) one flat buffer of master weights (the model's parameters are views into it), flat optimizer
      states, and a pool of slots for the activation stash and the stored gradients;
    * on the GPU: one group of ``stash_every`` blocks in the compute dtype plus the next one in flight, the
      hidden states of the accumulation window, one micro-batch's activations of a group, a group's fp32
      gradient sums.

One optimizer step (an accumulation window of ``B`` micro-batches)
    1. forward, block by block, *every micro-batch through one block before the next*: the weights are
       streamed once per window, not once per micro-batch. The inputs of every ``stash_every``-th layer are
       copied to host memory (the "stash") for the backward pass; the hidden states themselves stay on the GPU.
    2. the LM head computes the loss in token chunks (the full logits never exist) and its gradient at once.
    3. backward, group by group in reverse: for each micro-batch the group's layers are recomputed with
       autograd from the stashed input and differentiated; the parameter gradients are summed over the
       micro-batches in fp32 on the GPU, their norm is taken, and they leave the GPU (compute dtype, or 8-bit
       block-wise) into the stash slot the group no longer needs.
    4. ``optimizer.step()`` records the learning rate and the clipping coefficient (the global norm is
       known only now); the update of each block is applied on the GPU the next time that block's weights
       are streamed in (next forward, evaluation, or :meth:`StreamEngine.flush`), with its states streamed in
       and out alongside. Same arithmetic as an immediate update; the update costs no extra pass.

All copies run on two side streams (host-to-device, device-to-host), ordered with events, so they overlap
compute. On a CPU-only run the same code path runs with plain copies, which is what the tests compare
against a plain ``Trainer``.

Several processes of one machine (``torchrun`` / ``accelerate launch``): every rank runs this schedule on its own
micro-batches, streams and updates its shard of each block, all-gathers the block's weights and
reduce-scatters its gradients (:mod:`hf_lowmem.engine.dist`; with one process those are identities).

This module is the schedule only (over 400 lines because forward, head, grouped backward and the fetch/update
pipeline share the engine's event bookkeeping); the gradient hand-off (sums, reduction over the ranks, storing)
is in ``gradients``, storage in ``store`` and ``hostmem``, the ranks in ``dist``, the update in ``optim`` and
``lowbit``, memory checks in ``preflight`` and ``estimate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_lowmem.engine import dist as dist_mod
from hf_lowmem.engine import preflight
from hf_lowmem.engine.anatomy import Anatomy, Block, find_anatomy
from hf_lowmem.engine.config import EngineSpec
from hf_lowmem.engine.device import Device
from hf_lowmem.engine.estimate import estimate_stream_memory  # noqa: F401  (its historical import path)
from hf_lowmem.engine.gradients import GradientHandoff, _Acc
from hf_lowmem.engine.optim import StreamAdamW, clip_coefficient
from hf_lowmem.engine.store import StashPool, create_store
from hf_lowmem.engine.stream_options import resolve_formats
from hf_lowmem.errors import PluginError

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
    """A block's tensors in flight to the device: its flat masters and (when an update is pending) its states
    and stored gradients, with the events that mark the copies done; plus tied weights owned elsewhere."""

    def __init__(self, k: int, update: bool, lrs: list[float] | None = None, clip: float = 1.0):
        self.k, self.update, self.lrs, self.clip = k, update, lrs, clip
        self.master: torch.Tensor | None = None
        self.ev: Any = None
        self.states: dict[str, torch.Tensor] = {}
        self.host: tuple | None = None
        self.grad: torch.Tensor | None = None
        self.gev: Any = None
        self.shard: tuple[int, int] = (0, 0)  # the flat elements this rank streams (all of them with one process)


class StreamEngine(GradientHandoff):
    """See the module docstring. Created by the ``stream`` plugin from an :class:`~hf_lowmem.engine.config.
    EngineSpec`; the Trainer talks to it through the :class:`~hf_lowmem.engine.interface.TrainingEngine`
    interface."""

    def __init__(self, model: torch.nn.Module, spec: EngineSpec):
        self.spec = spec
        self.options = opts = spec.stream
        self.dev = Device(spec.device, profile=opts.profile)
        self.anat: Anatomy = find_anatomy(model)
        self.blocks: list[Block] = self.anat.blocks
        self.num_blocks = len(self.blocks)
        self.compute_dtype = spec.compute_dtype
        self.formats = resolve_formats(opts, spec.optimizer.name)
        self.state_format = self.formats.states
        if self.formats.states == "8bit" or self.formats.grads == "8bit":
            try:
                import bitsandbytes  # noqa: F401
            except Exception as e:
                from hf_lowmem.errors import MissingExtraError

                raise MissingExtraError("stream (8-bit states or gradients)", "bitsandbytes", "bnb", e) from e
        self.hidden_size = self.anat.embed.embedding_dim
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise PluginError(f"the stream engine trains every parameter; these are frozen: {frozen[:5]}")
        self._checkpointing_off(model)
        self._master_ev: dict[int, Any] = {}
        self._slot_read_ev: dict[int, Any] = {}
        self._slot_write_ev: dict[int, Any] = {}
        self._shared_acc: dict[int, torch.Tensor] = {}
        self._prefetched: dict[int, _Fetch] = {}
        self.pending: dict | None = None
        self._losses: list[torch.Tensor] = []
        self._calls = 0
        self.total_norm: torch.Tensor | None = None
        self._clip_coef = 1.0
        self.stats = {"windows": 0, "tokens": 0}
        self.pool: StashPool | None = None
        self.stash_every: int | None = self.formats.stash_every

        osp = spec.optimizer
        groups = osp.param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        keep32 = {id(self.anat.embed.weight)} if osp.embeddings_fp32 else set()
        # the ranks of this run (one: every collective is the identity) and host memory they share
        self.dist = dist_mod.Dist.current(self.dev.device)
        if self.dist.comm_bytes:
            logger.info("hf-lowmem: NCCL's communicators take %.2f GiB of this GPU outside PyTorch's allocator",
                        self.dist.comm_bytes / 2**30)
        self.reducer = dist_mod.GradientReducer(self.dist, self._store_shard)  # gradients over the ranks
        self._synced = True  # every rank's shards are current (no update deferred since the last flush)
        self.arena = dist_mod.SharedArena(self.dist, pin=self.dev.cuda)
        self.store = create_store(self, self.blocks, self.formats, self.arena, group_of, osp.min_quant_size, keep32)
        if opts.check_memory:
            preflight.check_host(self, "masters")
        self.store.adopt()
        if opts.check_memory:
            preflight.check_host(self, "states")
        self.store.allocate_states()
        dist_mod.share_buffers(model, self.dist)
        for m in self.anat.extras:  # e.g. rotary embeddings: buffers only
            m.to(self.dev.device)
        self.load_checkpoint_optimizer = dist_mod.load_optimizer_and_scheduler  # (trainer, folder): resume, mmap'd
        self.optimizer = StreamAdamW(groups, self, self.store, lr=osp.lr, betas=osp.betas, eps=osp.eps,
                                     weight_decay=osp.weight_decay, seed=spec.seed)
        # checkpoints and save_model: sharded safetensors in the original dtype, written from the host buffers
        model.save_pretrained = self.store.bind_save(model, original=model.save_pretrained, flush=self.flush)

    def _checkpointing_off(self, model: torch.nn.Module) -> bool:
        """The engine recomputes every layer in backward already; the model's own activation checkpointing
        (``gradient_checkpointing=True``, TRL's default) would wrap that recompute once more and fail."""
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        if on:
            for m in on:
                m.gradient_checkpointing = False
            if not getattr(self, "_said_checkpointing", False):
                logger.warning("hf-lowmem: the stream engine recomputes every layer in backward itself; the model's "
                               "gradient checkpointing is switched off (gradient_checkpointing=True has no effect)")
                self._said_checkpointing = True
        return bool(on)

    # ---- memory planning -------------------------------------------------------------------------------
    def estimate(self, tokens_per_micro_batch: int, micro_batches: int, stash_every: int | None = None) -> dict:
        """Bytes this engine needs on the GPU and in host memory for a window of ``micro_batches`` of
        ``tokens_per_micro_batch`` tokens (see :func:`hf_lowmem.engine.estimate.estimate_stream_memory`)."""
        return preflight.estimate(self, tokens_per_micro_batch, micro_batches, stash_every)

    # ---- the TrainingEngine interface -----------------------------------------------------------------
    def begin_window(self, batches: list[dict], num_items_in_batch: Any) -> None:
        self._checkpointing_off(self.anat.model)  # the Trainer enables it at the start of train()
        self._window_batches = batches
        self._window_items = num_items_in_batch
        self._calls = 0
        self._losses = []

    def training_step(self, inputs: dict, num_items_in_batch: Any) -> torch.Tensor:
        if self._calls == 0:
            self._run_window(self._window_batches, self._window_items)
        loss = self._losses[self._calls]
        self._calls += 1
        return loss.to(self.spec.device)

    def clip_grad_norm(self, max_norm: float):
        if self.total_norm is None:
            raise RuntimeError("clip_grad_norm before any backward")
        self._clip_coef = clip_coefficient(self.total_norm, max_norm)
        return self.total_norm.to(self.spec.device)

    def record_optimizer_step(self, optimizer: StreamAdamW) -> None:
        if self.pending is not None:
            self.apply_pending()
        self.pending = {"lrs": [g["lr"] for g in optimizer.param_groups], "clip": self._clip_coef,
                        "todo": set(range(self.num_blocks))}
        self._synced = False
        self._clip_coef = 1.0

    def profile_totals(self) -> dict[str, float]:
        """Seconds of copy-stream and compute-segment time, and GB copied, summed since the start
        (``options.profile`` only; synchronizes)."""
        return dict(self.dev.profile.collect()) if self.dev.profile is not None else {}

    def discard_pending(self) -> None:
        self.pending = None
        for f in self._prefetched.values():  # fetched ahead and never used: give the store its blocks back
            self.store.release(f.k)
        self._prefetched.clear()

    def load_checkpoint(self, folder: str) -> bool:
        """Restore a checkpoint's weights (the SSD tier links its block files back): ``True``; ``False`` when the
        Trainer loads them into the parameters itself."""
        return self.store.load_checkpoint(folder)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply any deferred update, so the model's parameters and optimizer states are current. Under several
        ranks every rank calls it while an update is deferred (``train()`` ends with it, saves do); once every
        rank's shards are current it returns at once."""
        if self._synced and self.pending is None and not any(f.update for f in self._prefetched.values()):
            return
        self.apply_pending()
        self.dist.barrier()
        self._synced = True

    @torch.no_grad()
    def apply_pending(self) -> None:
        """:meth:`flush` of this rank's shards only (no collective)."""
        for k in sorted(self._prefetched):  # fetched ahead, possibly with an update in flight
            self._materialize(self._prefetched.pop(k), gather=False)
        while self.pending is not None:
            self._materialize(self._fetch(min(self.pending["todo"])), gather=False)
        self.dev.synchronize()
        self.optimizer.publish_generator()

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
        f.host = self.store.acquire(k)
        master, states = f.host
        f.shard = lo, hi = self.store.shard(k)
        # the first copy waits for the block's last write-back; the others queue behind it on the same stream
        f.master, f.ev = self.dev.to_device(master[lo:hi], after=self._master_ev.get(k))
        if update:
            for name, t in dist_mod.shard_views(self.store.layouts[k], states, lo, hi).items():
                f.states[name] = self.dev.to_device(t)[0]
            slot, region = self.pool.grad_region(k)
            f.grad, f.gev = self.dev.to_device(region, after=self._slot_write_ev.get(slot))
            self._slot_read_ev[slot] = self.dev.record(self.dev.h2d)
            self.pending["todo"].discard(k)
            if not self.pending["todo"]:
                self.pending = None
        return f

    def _materialize(self, f: _Fetch, gather: bool = True) -> dict[str, torch.Tensor] | None:
        """Wait for a fetch, apply its pending update to this rank's shard on the device, write the shard's new
        masters and states back (device-to-host, in the background), and (``gather``) return the block's weights
        in the compute dtype: the ranks' shards all-gathered (collective; the shard itself with one process)."""
        k, cd = f.k, self.compute_dtype
        lo, hi = f.shard
        self.dev.wait(f.ev)
        if f.update:
            self.dev.wait(f.gev)
            with self.dev.segment("optimizer"):
                self.optimizer.update_block(k, f.master, f.states, f.grad, f.lrs, f.clip, shard=f.shard)
            master, states = f.host
            self.dev.to_host(f.master, master[lo:hi])
            host_states = dist_mod.shard_views(self.store.layouts[k], states, lo, hi)
            for name, t in f.states.items():
                self.dev.to_host(t, host_states[name])
            self._master_ev[k] = ev = self.dev.record(self.dev.d2h)
            self.store.release(k, after=ev)
        else:
            self.store.release(k)
        if not gather:
            return None
        flat = self.dist.all_gather(f.master if f.master.dtype == cd else f.master.to(cd))
        lay = self.store.layouts[k]
        W = {s.name: flat[s.offset: s.offset + s.numel].view(s.shape) for s in lay.slots}
        for name, (owner, s) in lay.shared.items():  # a tied weight: its owner's masters, every rank its shard
            t, ev = self.dev.to_device(self.store.master(owner)[slice(*self.store.shard(owner))],
                                       after=self._master_ev.get(owner))
            self.dev.wait(ev)
            W[name] = self.dist.all_gather(t.to(cd))[s.offset: s.offset + s.numel].view(s.shape)
        return W

    def _prefetch(self, k: int) -> None:
        if 0 <= k < self.num_blocks and k not in self._prefetched:
            self._prefetched[k] = self._fetch(k)

    def _load(self, k: int) -> dict[str, torch.Tensor]:
        f = self._prefetched.pop(k, None) or self._fetch(k)
        return self._materialize(f)

    # ---- one accumulation window -------------------------------------------------------------------------
    def _ensure_pool(self, tokens_per_micro_batch: int, micro_batches: int, window_tokens: int) -> None:
        """Slots for the stash and gradients of windows of ``window_tokens`` (chosen ``stash_every`` at the first
        window); a larger window later grows them, after applying the updates whose gradients they hold."""
        # every rank plans for the largest window of any rank: the same schedule (and collectives) everywhere
        tokens_per_micro_batch, micro_batches, window_tokens = (
            int(v) for v in self.dist.max(tokens_per_micro_batch, micro_batches, window_tokens))
        if self.pool is None:
            n = preflight.plan_window(self, tokens_per_micro_batch, micro_batches)
            self.stash_every = n
            self.pool = self.store.stash_pool(self.arena, self.anat.num_layers, self.hidden_size, self.compute_dtype,
                                              self.formats.grads, n)
        elif window_tokens > self.pool.window_tokens:
            self.apply_pending()  # the slots hold pending gradients: apply them before reallocating
            if self.options.check_memory:
                preflight.check_host(self, "stash", window_tokens=window_tokens)
        if self.pool.ensure(window_tokens):
            self._slot_read_ev.clear()
            self._slot_write_ev.clear()

    def _run_window(self, batches: list[dict], num_items: Any) -> None:
        dev = self.dev
        mbs = [self._micro_batch(b) for b in batches]
        B = len(mbs)
        offset = 0
        for mb in mbs:
            mb.offset = offset
            offset += mb.tokens * self.hidden_size
        window_tokens = offset // self.hidden_size
        self._ensure_pool(max(mb.tokens for mb in mbs), B, window_tokens)
        pool = self.pool
        # loss scale: what the Trainer's compute_loss + training_step would do; a window (or micro-batch) whose
        # labels are all masked gets zero loss and zero gradients, as a plain Trainer does
        if num_items is not None and self.spec.loss_over_window_items:
            n_items = float(num_items.item() if torch.is_tensor(num_items) else num_items)
            # as the Trainer's compute_loss: items counted over all ranks, times the ranks (gradients are averaged)
            ranks = self.dist.world if self.spec.average_tokens_across_devices else 1
            scales = [_inverse(n_items) * ranks] * B
        else:
            scales = [_inverse(float((mb.shift_labels != -100).sum().item()) * B) for mb in mbs]
        n_layers = self.anat.num_layers
        late = self.store.late_prefetch

        # 1. forward, block-major
        with torch.no_grad():
            self._prefetch(0)
            W = self._load(0)
            self._prefetch(1)
            with self.dev.segment("forward"):
                carry = [self._embed(W, mb) for mb in mbs]
            for k in range(1, n_layers + 1):
                slot = pool.stash_slot(k - 1)
                if slot is not None:
                    self._stash(slot, carry, mbs)
                W = self._load(k)
                if not late:
                    self._prefetch(k + 1)
                with self.dev.segment("forward"):
                    carry = [self._layer(k, W, h, mb) for h, mb in zip(carry, mbs)]
                if late:  # the SSD tier's fetch may wait for the disk: only once this layer's work is queued
                    self._prefetch(k + 1)
        # 2. head: loss and its gradient at once
        hk = self.num_blocks - 1
        W = self._load(hk)
        for k in reversed(pool.group_layers(pool.groups - 1)):  # the top group again, for backward
            self._prefetch(k)
        leaves = {n: t.detach().requires_grad_(True) for n, t in W.items()}
        acc = self._new_acc(hk)
        losses = []
        self._sumsq = torch.zeros((), device=dev.device, dtype=torch.float32)
        for i, (h, mb) in enumerate(zip(carry, mbs)):
            with self.dev.segment("head"):
                loss_i, dx = self._head_fwd_bwd(leaves, h, mb, scales[i], acc)
            losses.append(loss_i)
            carry[i] = dx
        self._store_grads(hk, acc)
        del W, leaves, acc  # the head's weights and fp32 sums are not needed in backward (under several ranks the
        # sums stay referenced by their reduction until the first group is loaded)
        # 3. backward, group by group in reverse, recomputing each group from its stashed input
        for g in range(pool.groups - 1, -1, -1):
            ks = pool.group_layers(g)
            Ws = {k: self._load(k) for k in reversed(ks)}
            nxt = list(reversed(pool.group_layers(g - 1))) if g > 0 else [0]
            if not late:
                self._prefetch(nxt[0])  # the rest of the next group after the micro-batches: less on the GPU at once
            # the reduction of the group above (started at its end) overlapped these loads' all-gathers and copies;
            # it ends here, so its fp32 buffer is gone before the micro-batches' recompute (the GPU peak)
            self.reducer.finish()
            leaves_of = {k: {n: t.detach().requires_grad_(True) for n, t in Ws[k].items()} for k in ks}
            del Ws
            accs = {k: self._new_acc(k) for k in ks}
            order = [(k, n) for k in ks for n in leaves_of[k]]
            for i, mb in enumerate(mbs):
                h = self._unstash(g, mb).requires_grad_(True)
                with self.dev.segment("backward"), torch.enable_grad():
                    out = h
                    for k in ks:
                        out = self._layer(k, leaves_of[k], out, mb)
                    grads = torch.autograd.grad(out, [h] + [leaves_of[k][n] for k, n in order], carry[i])
                    carry[i] = grads[0]
                    for (k, n), gr in zip(order, grads[1:]):
                        self._accumulate(k, accs[k], n, gr)
                del out, grads, h
            for k in nxt if late else nxt[1:]:
                self._prefetch(k)
            for k in reversed(ks):
                self._store_grads(k, accs[k])
            del leaves_of, accs
        W = self._load(0)
        self.reducer.finish()
        leaves = {n: t.detach().requires_grad_(True) for n, t in W.items()}
        acc = self._new_acc(0)
        for i, mb in enumerate(mbs):
            with torch.enable_grad():
                e = functional_call(self.anat.embed, leaves, (mb.ids,))
                (gr,) = torch.autograd.grad(e, [leaves["weight"]], carry[i])
            self._accumulate(0, acc, "weight", gr)
        carry = None
        self._store_grads(0, acc)
        self.reducer.finish()
        self.total_norm = self.dist.all_reduce_(self._sumsq).sqrt()  # the ranks' shards' sums of squares
        self._losses = [loss.detach() for loss in losses]
        self.stats["windows"] += 1
        self.stats["tokens"] += window_tokens

    def _head_fwd_bwd(self, leaves: dict, h: torch.Tensor, mb: _MicroBatch, scale: float, acc: _Acc):
        hk = self.num_blocks - 1
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
                self._accumulate(hk, acc, n, gw)
            loss += lc.detach()
            del logits, lc, g
        if norm_leaves:
            with torch.enable_grad():
                g = torch.autograd.grad(y, [x] + list(norm_leaves.values()), dy.view_as(y))
            dx = g[0]
            for n, gw in zip(norm_leaves, g[1:]):
                self._accumulate(hk, acc, n, gw)
        else:
            dx = dy.view_as(x)
        return loss, dx

    # ---- the stash -----------------------------------------------------------------------------------
    def _stash(self, slot: int, carry: list[torch.Tensor], mbs: list[_MicroBatch]) -> None:
        """Copy the hidden states of every micro-batch (a layer group's input) into stash slot ``slot``."""
        after = self._slot_read_ev.get(slot)  # the pending updates read the gradients this slot held
        for h, mb in zip(carry, mbs):
            dst = self.pool.stash_region(slot, mb.offset, h.numel()).view(h.shape)
            self._slot_write_ev[slot] = self.dev.to_host(h, dst, after=after)

    def _unstash(self, slot: int, mb: _MicroBatch) -> torch.Tensor:
        src = self.pool.stash_region(slot, mb.offset, mb.tokens * self.hidden_size).view(*mb.ids.shape, self.hidden_size)
        t, ev = self.dev.to_device(src, after=self._slot_write_ev.get(slot))
        self._slot_read_ev[slot] = ev
        self.dev.wait(ev)
        return t


def _inverse(n: float) -> float:
    """The loss scale of ``n`` labelled tokens: 0 (no loss, no gradient) when there are none."""
    return 1.0 / n if n > 0 else 0.0
