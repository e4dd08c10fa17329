"""The streaming engine's optimizer: AdamW whose states live in host memory (one flat buffer per block and
state, see :mod:`hf_lowmem.engine.store`) and whose update runs on the compute device one block at a time,
while that block is being streamed in.

State formats:

``fp32``
    exact AdamW: fp32 ``exp_avg`` and ``exp_avg_sq`` (8 bytes/param), updated with PyTorch's fused AdamW
    kernel, so the result equals ``torch.optim.AdamW(fused=True)`` (the Trainer's default).
``8bit``
    bitsandbytes' block-wise 8-bit AdamW states (2 bytes/param plus one fp32 scale per 256 values), updated
    with bitsandbytes' fused 8-bit kernel (the arithmetic of ``bnb.optim.AdamW8bit``).
``4bit``
    block-wise 4-bit moments (~1.06 bytes/param, :mod:`hf_lowmem.engine.lowbit`; the second moment stored
    as ``sqrt(v)``), dequantized to fp32 for the update and quantized again with stochastic rounding, in
    chunks of 4M values.

Tensors under ``min_quant_size`` values (norm weights, biases) keep fp32 states in every format, as
bitsandbytes does. bf16 master weights are updated in fp32 and written back with stochastic rounding (and
4-bit moments quantized with it) from a seeded generator whose state is part of :meth:`StreamAdamW.state_dict`,
so a resumed run draws the same numbers.

``step()`` does not touch the weights: it records the learning rates and the clipping coefficient, and the
engine applies the update the next time each block is brought to the device (or at
:meth:`StreamEngine.flush`). The arithmetic is the same as an immediate update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_lowmem.engine import lowbit
from hf_lowmem.engine.dist import GEN_SLOT, fp32_pos, state_range, used
from hf_lowmem.engine.store import ALIGN, BlockStore, Slot
from hf_lowmem.hyperparams import check_adam_group

CHUNK = 1 << 22  # values per chunk of a chunked update (a multiple of both quantization blocks)
FORMAT = "hf_lowmem.stream/2"


class StreamAdamW(torch.optim.Optimizer):
    """The optimizer object the Trainer sees: param groups (for the LR scheduler), ``step`` (defers to the
    engine), ``state_dict``/``load_state_dict`` (host states, for checkpoints and resume)."""

    def __init__(self, param_groups, engine, store: BlockStore, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        check_adam_group(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            check_adam_group(lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
        self.engine, self.store = engine, store
        self.formats = store.formats
        self.state_format = self.formats.states
        self.steps = [0] * len(store.layouts)  # updates applied to each block
        self._qmaps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.generator: torch.Generator | None = None
        if self.formats.master == "bf16" or self.formats.states == "4bit":  # stochastic rounding
            self.generator = torch.Generator(device=engine.dev.device)
            self.generator.manual_seed(int(seed) + 0x5EED + 7919 * store.rank)
        # each rank's generator state, readable by rank 0 when it writes a checkpoint (see publish_generator); one
        # process keeps it out of the arena (whose size the SSD tier's tests bound by its window)
        self._gen_slots = store.arena.shared_buffers([(store.world * GEN_SLOT, torch.uint8)])[0] \
            if store.world > 1 else torch.zeros(GEN_SLOT, dtype=torch.uint8)
        for k, lay in enumerate(store.layouts):  # views for inspection (``optimizer.state[p]``)
            for s in lay.slots:
                self.state[s.param] = store.param_state_views(k, s)

    # ---- the Trainer-facing API ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.engine.record_optimizer_step(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # gradients never live in .grad
        return None

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, per block its step count and state buffers (the host buffers themselves: saving
        copies nothing), the stochastic-rounding generator's state, and, when checkpoints store the model's
        weights in a narrower dtype than the masters (fp32 masters of a bf16 model), the masters."""
        if getattr(self.store, "file_backed", False):  # the SSD tier: the states are the block files
            return self.store.optimizer_state(self)
        self.engine.apply_pending()  # this rank's; under several ranks the Trainer's save flushed every rank first
        groups = []
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]})
        with_masters = self.store.master_dtype != self.store.save_dtype  # the weights file cannot restore them
        blocks = []
        for k in range(len(self.store.layouts)):
            entry = {"step": self.steps[k], "numel": self.store.layouts[k].numel, "states": dict(self.store.states(k))}
            if with_masters:
                entry["master"] = self.store.master(k)
            blocks.append(entry)
        gens = self.generator_states()
        return {"format": FORMAT, "formats": self.formats.stored(),
                "param_groups": groups, "blocks": blocks, "state": {}, "world_size": self.store.world,
                "generator": gens[0] if gens else None, "generators": gens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a checkpoint's states into the host buffers the engine streams from, in place (collective under
        several ranks: each copies what it owns). Each buffer must have the dtype of the one it replaces (8-bit
        states stay uint8) and hold the same parameters; only the tail padding of the shards may differ, so a
        checkpoint written by any number of ranks resumes on any other. A checkpoint of another optimizer, state
        format or model is refused with one line naming the first difference."""
        from hf_lowmem.errors import PluginError

        if getattr(self.store, "file_backed", False):
            return self.store.load_optimizer_state(self, state_dict)
        fix = ("resume with the optimizer and stream options the checkpoint was written with, or start without "
               "resume_from_checkpoint")
        if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
            raise PluginError(f"the optimizer state in this checkpoint was not written by the stream engine ({FORMAT}); {fix}")
        why = self.formats.mismatch(state_dict.get("formats") or {})
        if why:
            raise PluginError(why)
        blocks = state_dict["blocks"]
        if len(blocks) != len(self.store.layouts) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise PluginError(f"the checkpoint's optimizer state has {len(blocks)} blocks and "
                              f"{len(state_dict['param_groups'])} parameter groups, this model "
                              f"{len(self.store.layouts)} and {len(self.param_groups)}; {fix}")
        copies = []  # (source, destination) of what this rank owns
        for k, entry in enumerate(blocks):  # check everything before changing anything
            lay, mine = self.store.layouts[k], self.store.states(k)
            if set(entry["states"]) != set(mine):
                raise PluginError(f"block {k}: the checkpoint has states {sorted(entry['states'])}, this run "
                                  f"{sorted(mine)}; {fix}")
            theirs = int(entry.get("numel", lay.numel))  # the block's padded length in the checkpoint
            lo, hi = self.store.shard(k)
            pairs = [(f"state {n!r}", n, entry["states"][n], mine[n]) for n in mine]
            if "master" in entry:
                pairs.append(("master weights", None, entry["master"], self.store.master(k)))
            for what, name, src, dst in pairs:
                packed = name in ("exp_avg", "exp_avg_sq")  # fp32 states are packed: no padding at all
                want = dst.numel() if packed or not lay.numel else dst.numel() * theirs // lay.numel
                if not torch.is_tensor(src) or src.dtype != dst.dtype or src.numel() != want or theirs < used(lay):
                    got = f"{src.dtype} x {src.numel()}" if torch.is_tensor(src) else type(src).__name__
                    raise PluginError(f"block {k}, {what}: the checkpoint has {got}, this run keeps "
                                      f"{dst.dtype} x {dst.numel()}; {fix}")
                a, b = state_range(lay, name, dst, lo, hi) if name else (lo, hi)
                end = state_range(lay, name, dst, 0, used(lay))[1] if name else used(lay)  # beyond: padding
                b = min(b, end)
                if a < b:
                    copies.append((src.reshape(-1)[a:b], dst[a:b]))
        self.engine.discard_pending()
        dist = getattr(self.store, "dist", None)
        if dist is not None:
            dist.barrier()  # every rank has loaded the checkpoint's weights (which write every shard) by now
        for src, dst in copies:
            dst.copy_(src)
        for k, entry in enumerate(blocks):
            self.steps[k] = int(entry["step"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, v in saved.items():
                if key != "params":
                    group[key] = tuple(v) if key == "betas" else v
        gens = state_dict.get("generators") or ([state_dict["generator"]] if state_dict.get("generator") is not None
                                                 else [])
        if self.generator is not None and gens:
            self.generator.set_state(gens[self.store.rank] if len(gens) == self.store.world else gens[0])
        if dist is not None:
            dist.barrier()

    def publish_generator(self) -> None:
        """Write this rank's stochastic-rounding generator state into its slot of the shared buffer, where rank 0
        reads it when it writes the optimizer state (:meth:`generator_states`)."""
        if self.generator is None:
            return
        state = self.generator.get_state()
        n = state.numel()
        if n + 8 > GEN_SLOT:
            raise RuntimeError(f"a generator state of {n} bytes does not fit its {GEN_SLOT}-byte slot")
        slot = self._gen_slots[self.store.rank * GEN_SLOT: (self.store.rank + 1) * GEN_SLOT]
        slot[:8].view(torch.int64).fill_(n)
        slot[8: 8 + n].copy_(state)

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's generator state as last published (rank 0's first); empty without stochastic rounding."""
        if self.generator is None:
            return []
        self.publish_generator()
        out = []
        for r in range(self.store.world):
            slot = self._gen_slots[r * GEN_SLOT: (r + 1) * GEN_SLOT]
            n = int(slot[:8].view(torch.int64).item())
            out.append(slot[8: 8 + n].clone() if n else self.generator.get_state())
        return out

    # ---- the update, on the device -------------------------------------------------------------------
    def qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._qmaps:
            import bitsandbytes.functional as F

            self._qmaps[key] = (F.create_dynamic_map(signed=True).to(device),
                                F.create_dynamic_map(signed=False).to(device))
        return self._qmaps[key]

    @torch.no_grad()
    def update_block(self, k: int, master: torch.Tensor, states: dict[str, torch.Tensor], grad: torch.Tensor,
                     lrs: list[float], clip: float, shard: tuple[int, int] | None = None) -> None:
        """One AdamW step of flat elements ``shard = (lo, hi)`` of block ``k`` (default: all of them) on the device,
        in place: ``master`` (those elements, master dtype), ``states`` (device copies of their part of each state
        buffer), ``grad`` (their stored gradient region: compute dtype, or 8-bit codes followed by their scales);
        ``clip`` scales the gradient (the clipping coefficient). The arithmetic is elementwise within quantization
        blocks, so an update split between ranks equals one of the whole block."""
        self.steps[k] += 1
        lay = self.store.layouts[k]
        lo, hi = shard or (0, lay.numel)
        pos = fp32_pos(lay, lo)
        for s in lay.slots:
            if s.offset >= hi or s.offset + s.padded <= lo:
                continue
            g = self.param_groups[s.group]
            self._update_slot(s, master, states, grad, (lo, hi, pos), step=self.steps[k], lr=lrs[s.group], clip=clip,
                              betas=g["betas"], eps=g["eps"], wd=g["weight_decay"])

    def _grad_chunk(self, grad: torch.Tensor, n: int, lo: int, hi: int) -> torch.Tensor:
        """fp32 gradient of elements [lo, hi) of a stored gradient region of ``n`` elements."""
        if self.formats.grads == "8bit":
            absmax = grad[n: n + n // lowbit.BLOCK_8BIT * 4].view(torch.float32)
            return lowbit.dequantize_8bit(grad[lo:hi], absmax[lo // lowbit.BLOCK_8BIT: hi // lowbit.BLOCK_8BIT])
        return grad.view(self.engine.compute_dtype)[lo:hi].float()

    def _update_slot(self, s: Slot, master, states, grad, shard, *, step, lr, clip, betas, eps, wd) -> None:
        fm = self.formats
        lo, hi, pos = shard  # the buffers hold flat elements [lo, hi); packed fp32 states from index pos
        chunked = fm.master != "fp32" or fm.grads != "compute" or (s.quantized and fm.states == "4bit")
        # the exact path works on the parameter itself (one chunk); chunked formats on aligned chunks of its
        # padded range (quantization blocks, 8-bit gradient blocks), at most CHUNK values each
        span = s.padded if (chunked or s.quantized) else s.numel
        step_len = CHUNK if chunked else span
        first, last = max(0, lo - s.offset), min(span, hi - s.offset)  # the part of the parameter in the shard
        for c in range(first, last, step_len):
            ce = min(last, c + step_len)
            a, b = s.offset + c - lo, s.offset + ce - lo
            real = max(0, min(ce, s.numel) - c)  # values of the parameter in this chunk (the rest is padding)
            g = self._grad_chunk(grad, hi - lo, a, b)
            w = master[a:b]
            w32 = w if w.dtype == torch.float32 else w.float()
            if not s.quantized:
                m = states["exp_avg"][s.soff + c - pos: s.soff + c - pos + real]
                v = states["exp_avg_sq"][s.soff + c - pos: s.soff + c - pos + real]
                if clip != 1.0:
                    g.mul_(clip)
                from torch.optim.adamw import adamw

                step_t = torch.tensor(float(step - 1), device=w.device)
                adamw([w32[:real]], [g[:real]], [m], [v], [], [step_t], fused=True, amsgrad=False, beta1=betas[0],
                      beta2=betas[1], lr=lr, weight_decay=wd, eps=eps, maximize=False)
            elif fm.states == "8bit":
                import bitsandbytes.functional as F

                q1, q2 = self.qmaps(w.device)
                blk = lowbit.BLOCK_8BIT
                F.optimizer_update_8bit_blockwise(
                    "adam", g[:real], w32[:real], states["state1"][a: a + real], states["state2"][a: a + real],
                    betas[0], betas[1], 0.0, 0.0, eps, step, lr, q1, q2, states["absmax1"][a // blk: b // blk],
                    states["absmax2"][a // blk: b // blk], weight_decay=wd, gnorm_scale=clip)
            else:
                self._update_4bit(w32, g, states, a, b, step=step, lr=lr, clip=clip, betas=betas, eps=eps, wd=wd)
            if w32 is not w:  # bf16 masters: stochastic rounding back
                lowbit.round_to_bf16_stochastic(w32, w, self.generator)

    def _update_4bit(self, w, g, states, a, b, *, step, lr, clip, betas, eps, wd) -> None:
        blk = lowbit.BLOCK_4BIT
        dev = w.device
        bm = lowbit.Codebook.get(lowbit.MAP_SIGNED_4BIT, dev)
        bv = lowbit.Codebook.get(lowbit.MAP_UNSIGNED_4BIT, dev)
        mc, vc = states["m"][a // 2: b // 2], states["v"][a // 2: b // 2]
        ms, vs = states["m_scale"][a // blk: b // blk], states["v_scale"][a // blk: b // blk]
        m = lowbit.dequantize_4bit(mc, ms, bm)
        v = lowbit.dequantize_4bit(vc, vs, bv).square_()  # the codes hold sqrt(v) (lowbit.SECOND_MOMENT)
        if clip != 1.0:
            g.mul_(clip)
        b1, b2 = betas
        m.lerp_(g, 1 - b1)
        r = v.mul_(b2).addcmul_(g, g, value=1 - b2).sqrt_()  # sqrt(v): the denominator's root and what is stored
        w.mul_(1 - lr * wd)
        w.addcdiv_(m, r.div(math.sqrt(1 - b2**step)).add_(eps), value=-lr / (1 - b1**step))  # no name: freed here
        lowbit.quantize_4bit(m, bm, mc, ms, self.generator)  # stochastic rounding: the averages do not stick
        lowbit.quantize_4bit(r, bv, vc, vs, self.generator)


assert CHUNK % ALIGN == 0


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s coefficient, computed the same way (fp32):
    ``max_norm / (norm + 1e-6)``, at most 1."""
    if not max_norm or max_norm <= 0 or math.isinf(max_norm):
        return 1.0
    coef = torch.tensor(max_norm, dtype=torch.float32) / (total_norm.detach().float().cpu() + 1e-6)
    return float(torch.clamp(coef, max=1.0))
