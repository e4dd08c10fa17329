"""The SSD tier's stored gradients on the disk (``offload_grads``): for models whose gradients alone outgrow the
host RAM (70B: ~70 GB in 8 bits).

Between backward and the deferred update each block's gradients live in a file of their own
(``offload_dir/grad-00012.bin``): backward copies them from the GPU into one of two staging buffers, a thread
writes them once that copy is done; the next forward reads them with the block's optimizer states into the
block's window buffer, where the update finds them. They are never part of a checkpoint (a save applies the
pending updates first). :class:`DiskGradPool` is the :class:`~hf_lowmem.engine.store.StashPool` of such a run:
its slots hold only the activation stash.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future

import torch

from hf_lowmem.engine import aio
from hf_lowmem.engine.store import StashPool, grad_bytes


class DiskGradPool(StashPool):
    """Stash slots only; gradient regions come from the store (see the module docstring)."""

    def __init__(self, store, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store
        self.grad_at = {}
        self.grad_slot_bytes = [0] * (self.groups + 2)

    def grad_region(self, k: int):
        """Block ``k``'s gradients for its update: in its (acquired) window buffer, read with its states."""
        return ("ssd", k), self.store.grad_view(k)

    def grad_out(self, k: int):
        return ("ssd", k), self.store.grad_out(k)

    def grad_stored(self, k: int, event) -> None:
        self.store.grad_stored(k, event)


class FileGrads:
    """The gradient half of :class:`~hf_lowmem.engine.filestore.FileBlockStore` (mixed in)."""

    def _init_grads(self, compute_bytes: int) -> None:
        self.offload_grads = bool(self.options.offload_grads)
        self.grad_size = [aio.round_up(grad_bytes(lay.numel, self.formats.grads, compute_bytes)) if self.offload_grads
                          else 0 for lay in self.layouts]
        self.grad_paths = [p.replace("block-", "grad-") for p in self.paths]
        self._gfds: list[int | None] = [None] * len(self.layouts)
        self._gfut: dict[int, Future] = {}
        self._gstage: list[list] = []  # [buffer, future of its write or None]
        #: each block's stored-gradient generation (one per backward); a window buffer's copy is current when its
        #: ``ggen`` equals it
        self._ggen = [0] * len(self.layouts)
        self._finalizer_fds.append(self._gfds)

    def stash_pool(self, arena, n_layers, hidden, compute_dtype, grads, stash_every) -> StashPool:
        if not self.offload_grads:
            return super().stash_pool(arena, n_layers, hidden, compute_dtype, grads, stash_every)
        return DiskGradPool(self, arena, self.layouts, n_layers, hidden, compute_dtype, grads, stash_every)

    def _create_grad_file(self, k: int) -> None:
        if self.grad_size[k]:
            self._gfds[k] = self._new_file(k, self.grad_paths[k], self.grad_size[k])

    def _grads_part(self, k: int, want: bool) -> tuple:
        return ("grads",) if want and self.offload_grads and self._ggen[k] > 0 else ()

    def _grads_ok(self, b, k: int) -> bool:
        return not self.offload_grads or self._ggen[k] == 0 or b.ggen == self._ggen[k]

    def grad_view(self, k: int) -> torch.Tensor:
        """Block ``k``'s gradients in its acquired window buffer (read by its states access)."""
        b = self._find(k)
        self._wait_read(b)
        if not self._grads_ok(b, k):  # (the states access reads them: only a direct call gets here)
            self._read_more(b, k, ("grads",))
            self._wait_read(b)
        lo = self.block_bytes[k]
        return b.t[lo: lo + self.grad_size[k]]

    def grad_out(self, k: int) -> torch.Tensor:
        """A staging buffer for block ``k``'s gradients coming off the GPU (waits for a free one)."""
        if not self.grad_size[k]:
            return torch.empty(0, dtype=torch.uint8)
        if not self._gstage:
            n = max(self.grad_size)
            self._gstage = [[self.arena.empty(n, torch.uint8), None] for _ in range(2)]
        free = [s for s in self._gstage if s[1] is None or s[1].done()]
        if not free:
            t0 = time.perf_counter()
            self._gstage[0][1].result()
            with self._stats_lock:
                self.stats["wait_s"] += time.perf_counter() - t0
            free = [self._gstage[0]]
        slot = free[0]
        if slot[1] is not None:
            slot[1].result()  # raises a failed write here
        self._gstage.remove(slot)
        self._gstage.append(slot)  # the oldest write is waited for first next time
        slot[1] = "pending"  # taken until grad_stored
        return slot[0][: self.grad_size[k]]

    def grad_stored(self, k: int, event) -> None:
        """The gradients of block ``k`` are on their way into the staging buffer: write them once ``event`` fires."""
        if not self.grad_size[k]:
            return
        self._ggen[k] += 1  # a window buffer's copy of the previous ones is stale now
        slot = next(s for s in self._gstage if isinstance(s[1], str))
        prev = [f for f in (self._gfut.get(k),) if f is not None]
        slot[1] = self._gfut[k] = self._tasks.submit(self._grad_task, slot[0], k, event, prev)

    def _grad_task(self, buf: torch.Tensor, k: int, event, prev: list) -> None:
        try:
            for f in prev:
                f.result()
            event.synchronize()
            t0 = time.perf_counter()
            aio.write_from(self._io, self._gfds[k], buf[: self.grad_size[k]], 0, direct=self.direct)
            with self._stats_lock:
                self.stats["write_bytes"] += self.grad_size[k]
                self.stats["write_busy_s"] += time.perf_counter() - t0
                self.stats["writes"] += 1
        except BaseException as e:
            self._error = e
            raise

    def _read_grads(self, b, k: int) -> int:
        """Into block ``k``'s buffer after its states (the caller waited for the gradients' write)."""
        n = self.grad_size[k]
        if not n:
            return 0
        lo = self.block_bytes[k]
        aio.read_into(self._io, self._gfds[k], b.t[lo: lo + n], 0, direct=self.direct)
        return n

    def _grad_deps(self, k: int) -> list:
        f = self._gfut.get(k)
        return [f] if f is not None and not f.done() else []

    def _sync_grads(self) -> None:
        for f in list(self._gfut.values()):
            f.result()
        for fd in self._gfds:
            if fd is not None:
                os.fdatasync(fd)
