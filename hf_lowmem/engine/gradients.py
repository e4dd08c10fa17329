"""The stream engine's gradient hand-off (a mixin of :class:`~hf_lowmem.engine.stream.StreamEngine`): a block's
fp32 gradient sums on the device (:class:`_Acc`), summed over the micro-batches of a window, reduced over the
ranks (:class:`~hf_lowmem.engine.dist.GradientReducer`: a reduce-scatter, the identity with one process), and this
rank's shard counted into the clipping norm and moved to its host slot (compute dtype, or 8-bit block-wise).
Split from ``stream.py`` (the schedule) with no change of behaviour."""

from __future__ import annotations

import torch

from hf_lowmem.engine import lowbit


class _Acc:
    """A block's fp32 gradient sums on the device: one flat buffer (allocated at the first gradient) and the
    gradients of tied weights it uses but does not own."""

    def __init__(self, numel: int, device: torch.device):
        self.numel, self.device = numel, device
        self.flat: torch.Tensor | None = None
        self.shared: dict[str, torch.Tensor] = {}


class GradientHandoff:
    """Gradient methods of the engine (they use its ``store``, ``pool``, ``dev``, ``reducer`` and event maps)."""

    # ---- gradients -----------------------------------------------------------------------------------
    def _new_acc(self, k: int) -> _Acc:
        lay = self.store.layouts[k]
        acc = _Acc(lay.numel, self.dev.device)
        waiting = [(s, self._shared_acc.pop(id(s.param))) for s in lay.slots if id(s.param) in self._shared_acc]
        for s, g in waiting:  # a tied weight: the head's gradient sum is waiting here
            if len(lay.slots) == 1 and g.numel() == lay.numel:  # it can be the block's buffer itself
                acc.flat = g.view(-1)
            else:
                self._accumulate(k, acc, s.name, g)
        return acc

    def _accumulate(self, k: int, acc: _Acc, name: str, g: torch.Tensor) -> None:
        lay = self.store.layouts[k]
        if name in lay.shared:
            prev = acc.shared.get(name)
            acc.shared[name] = g.float() if prev is None and g.dtype != torch.float32 else (
                g.clone() if prev is None else prev.add_(g))
            return
        s = lay.by_name[name]
        if acc.flat is None:
            acc.flat = torch.zeros(acc.numel, device=acc.device, dtype=torch.float32)
        acc.flat[s.offset: s.offset + s.numel].view(s.shape).add_(g)

    def _store_grads(self, k: int, acc: _Acc) -> None:
        """Reduce block ``k``'s summed gradients over the ranks and store this rank's shard (:meth:`_store_shard`;
        see :class:`~hf_lowmem.engine.dist.GradientReducer`). A tied weight's gradient from the head waits on the
        device for its owner."""
        lay = self.store.layouts[k]
        for name, g in acc.shared.items():
            p = lay.shared[name][1].param
            prev = self._shared_acc.get(id(p))
            self._shared_acc[id(p)] = g if prev is None else prev.add_(g)
        if lay.numel == 0:  # a block that owns nothing (a tied head without a final norm)
            return
        flat = acc.flat if acc.flat is not None else torch.zeros(lay.numel, device=self.dev.device, dtype=torch.float32)
        self.reducer.start(k, flat)

    def _store_shard(self, k: int, shard: torch.Tensor) -> None:
        """This rank's reduced shard of block ``k``'s gradients: add its squared norms to the window's sum (clipping
        sees the true norm) and move it to host memory (its slot region), encoded as the formats say."""
        lay = self.store.layouts[k]
        lo, hi = self.store.shard(k)
        for s in lay.slots:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                self._sumsq += torch.linalg.vector_norm(shard[a - lo: b - lo], dtype=torch.float32) ** 2
        slot, region = self.pool.grad_out(k)
        after = self._slot_read_ev.get(slot)  # the previous tenant (a group's stashed input) has been read
        n = hi - lo
        if self.formats.grads == "8bit":
            codes = torch.empty(n, dtype=torch.uint8, device=shard.device)
            absmax = torch.empty(n // lowbit.BLOCK_8BIT, dtype=torch.float32, device=shard.device)
            lowbit.quantize_8bit(shard, codes, absmax)
            self.dev.to_host(codes, region[:n], after=after)
            ev = self.dev.to_host(absmax, region[n: n + absmax.numel() * 4].view(torch.float32))
        else:
            enc = shard if shard.dtype == self.compute_dtype else shard.to(self.compute_dtype)
            ev = self.dev.to_host(enc, region.view(self.compute_dtype)[:n], after=after)
        self._slot_write_ev[slot] = ev
        self.pool.grad_stored(k, ev)
