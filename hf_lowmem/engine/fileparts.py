"""Pieces of the SSD tier (:mod:`hf_lowmem.engine.filestore`): where a block's regions lie in its file (and in a
window buffer: the same offsets), a window buffer and what it holds, and the states of an acquired block, read
only when the engine asks for them."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from hf_lowmem.engine import aio
from hf_lowmem.engine.store import state_shapes


@dataclass(frozen=True)
class Region:
    name: str
    offset: int  # bytes from the start of the block (file and buffer alike)
    nbytes: int
    dtype: torch.dtype
    numel: int

    def to_json(self) -> list:
        return [self.name, self.offset, self.nbytes, str(self.dtype).replace("torch.", "")]


def block_regions(layout, states_format: str, master_dtype: torch.dtype) -> tuple[list[Region], int, int]:
    """A block's regions, the byte where its states start and its size (all multiples of :data:`aio.IO_ALIGN`)."""
    es = torch.empty((), dtype=master_dtype).element_size()
    regs = [Region("master", 0, layout.numel * es, master_dtype, layout.numel)]
    off = aio.round_up(layout.numel * es)
    split = off
    for name, (n, dt) in state_shapes(layout, states_format).items():
        nb = n * torch.empty((), dtype=dt).element_size()
        regs.append(Region(name, off, nb, dt, n))
        off += aio.round_up(nb)
    return regs, split, max(off, aio.IO_ALIGN)


class WindowBuffer:
    """One host buffer of the window and what it holds."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.block: int | None = None
        self.master = self.states = False  # which parts hold the block's current contents
        self.reading: Future | None = None
        self.ggen = -1  # generation of the stored gradients read into it (offload_grads)
        self.writing: Future | None = None
        self.gpu_ev = None  # the GPU's last copy out of this buffer
        self.pins = 0


class LazyStates:
    """The states of an acquired block: read from the disk the first time the engine asks (only an update
    does), after any write of the block still in flight."""

    def __init__(self, store, k: int, buf: WindowBuffer):
        self.store, self.k, self.buf = store, k, buf
        self._d: dict[str, torch.Tensor] | None = None

    def _get(self) -> dict[str, torch.Tensor]:
        if self._d is None:
            self._d = self.store._need_states(self.k, self.buf)
        return self._d

    def items(self):
        return self._get().items()

    def keys(self):
        return self._get().keys()

    def __getitem__(self, name):
        return self._get()[name]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())
