"""The SSD tier (issue 14): master weights and optimizer states in files on a local disk, one file per block.

A :class:`FileBlockStore` is a :class:`~hf_lowmem.engine.store.BlockStore` with the same ``acquire`` /
``release`` interface, so the engine's schedule does not change:

* **One file per block** (``offload_dir/block-00012.bin``): the flat master buffer, then each optimizer-state
  buffer, every region starting at a multiple of 4 KiB, so a block moves with a few large aligned direct-I/O
  requests (:mod:`hf_lowmem.engine.aio`) straight into a page-locked host buffer and from there to the GPU.
* **A window of host buffers** (``offload_window``, default 4 blocks) is all the host memory the tier holds.
  The schedule's order is known in advance: forward 0..N (applying each block's deferred update, which needs
  its states too), backward N..0 (masters only), then forward again. The store follows that cycle and, after
  every ``acquire`` and ``release``, starts reads of the next blocks into buffers whose blocks are needed
  furthest in the future (never evicting one needed sooner than the block it would fetch). An updated block is
  written back behind the engine: a thread waits for its device-to-host copy (a CUDA event), checksums it and
  writes it; the buffer is reusable when the write is done. A buffer is reused for a read only after the GPU
  has finished copying from it (an event recorded on the host-to-device stream at ``release``).
* **The model's parameters** become read-only views of each file's master region (``mmap``, private): a
  ``state_dict`` reads the weights from the disk through the page cache when someone asks, the engine never
  does. Writing into them changes nothing on the disk.
* **Checksums**: every region's digest (XXH3 or CRC32 per 32 MiB chunk) is computed as it is written and kept
  in memory; a checkpoint records them, and blocks read back from a checkpoint are checked before use.
* **Checkpoints hold the files themselves**: after the pending writes are synced, each block file is hard-
  linked into ``checkpoint-N/offload/`` (an in-kernel copy across file systems) with ``index.json`` (layout,
  digests, generations); no byte goes through this process's memory. A file shared with a checkpoint is never
  written in place again: its next write goes to a new file renamed over the old name, so the checkpoint keeps
  the old contents (copy on write at file granularity: every update rewrites the whole block anyway). Resuming
  links the checkpoint's files back; each block's checksums are checked when it is first read, and a mismatch
  stops training with a :class:`~hf_lowmem.errors.CheckpointError` naming the block.

Checkpoints, resume and export of these files: :mod:`hf_lowmem.engine.filecheckpoint`. Over 400 lines: the
window's prediction, eviction and read/write tasks share the per-buffer state and its ordering rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hf_lowmem.engine import aio
from hf_lowmem.engine.filecheckpoint import (
    PARTS,
    FileCheckpoints,
    save_pretrained_files,
)
from hf_lowmem.engine.filegrads import FileGrads
from hf_lowmem.engine.fileparts import LazyStates, Region, WindowBuffer, block_regions
from hf_lowmem.engine.store import BlockStore, _trim_heap
from hf_lowmem.errors import CheckpointError, PluginError

logger = logging.getLogger("hf_lowmem")



_OWNERS: dict[str, weakref.ref] = {}  # offload folder -> the engine's store of this process that holds it


def _shutdown(pools, fd_lists, locks) -> None:
    for p in pools:
        p.shutdown(wait=True)
    for fds in fd_lists:
        for i, fd in enumerate(fds):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                fds[i] = None
    for fd in locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    locks.clear()


class FileBlockStore(FileGrads, FileCheckpoints, BlockStore):
    """Masters and optimizer states of every block in files (see the module docstring)."""

    file_backed = True
    late_prefetch = True

    def __init__(self, blocks, formats, arena, group_of, min_quant_size=4096, fp32_state_params=None, *,
                 options, device, pending=None, compute_bytes: int = 2):
        super().__init__(blocks, formats, arena, group_of, min_quant_size, fp32_state_params)
        from hf_lowmem.engine.stream_options import offload_dirs

        self.options, self.dev = options, device
        self.pending = pending or (lambda k: False)
        self.dirs = [os.path.abspath(os.path.expanduser(d)) for d in offload_dirs(options)]
        nb = len(self.layouts)
        self._fds: list[int | None] = [None] * nb
        self._locks: list[int] = []
        self._wfut: dict[int, Future] = {}  # each block's last write
        self._io = ThreadPoolExecutor(int(options.io_threads), thread_name_prefix="hf-lowmem-io")
        self._tasks = ThreadPoolExecutor(max(2, int(options.io_threads)), thread_name_prefix="hf-lowmem-blk")
        self._finalizer_fds = [self._fds]
        self._finalizer = weakref.finalize(self, _shutdown, (self._tasks, self._io), self._finalizer_fds, self._locks)
        for d in self.dirs:
            self._locks.append(self._lock(d))
        self.direct = self._choose_direct()
        self.regions, self.split, self.block_bytes = [], [], []
        for lay in self.layouts:
            r, s, n = block_regions(lay, formats.states, self.master_dtype)
            self.regions.append(r)
            self.split.append(s)
            self.block_bytes.append(n)
        self.paths = [os.path.join(self.dirs[k % len(self.dirs)], f"block-{k:05d}.bin") for k in range(nb)]
        self._init_grads(compute_bytes)
        self.buf_bytes = max(n + g for n, g in zip(self.block_bytes, self.grad_size))
        self._maps: list[mmap.mmap | None] = [None] * nb
        self.algorithm = aio.checksum_name()
        self.digests: list[dict[str, str | None]] = [dict.fromkeys(PARTS) for _ in range(nb)]
        self.generation = [0] * nb
        self._verify: set[tuple[int, str]] = set()
        self._remap: set[int] = set()
        self._bufs: list[WindowBuffer] = []
        self.window = int(options.offload_window)
        self._pos: int | None = None
        self._trained = False
        self._said_grow = False
        self._scratch: dict[int, torch.Tensor] = {}
        self._loaded_index: dict | None = None
        self._error: BaseException | None = None
        self._stats_lock = threading.Lock()
        self.stats = {"read_bytes": 0, "write_bytes": 0, "read_busy_s": 0.0, "write_busy_s": 0.0, "wait_s": 0.0,
                      "reads": 0, "writes": 0, "hits": 0, "misses": 0}

    # ---- setup ----------------------------------------------------------------------------------------------
    def _lock(self, folder: str) -> int:
        """Own ``folder`` for this run: an exclusive ``flock`` (another process's run is refused); an older engine
        of this process that still holds it (a trainer built again in a notebook) hands it over."""
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise PluginError(f"offload_dir {folder!r} cannot be created ({e.strerror}); give a folder on a local "
                              "disk with room for the master weights and optimizer states") from None
        old = _OWNERS.get(folder)
        old = old() if old is not None else None
        if old is not None and old is not self:
            logger.warning("hf-lowmem: offload_dir %s was used by another engine of this process; this one takes it "
                           "over (the older engine can no longer train)", folder)
            old.close()
        fd = os.open(os.path.join(folder, ".hf_lowmem.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PluginError(f"offload_dir {folder!r} is in use by another training process; give each run its "
                              "own folder") from None
        _OWNERS[folder] = weakref.ref(self)
        return fd

    def close(self) -> None:
        """Finish the writes in flight, close the files and give the folders up (the files stay)."""
        with contextlib.suppress(Exception):
            for f in list(self._wfut.values()):
                f.result()
        self._finalizer()

    def _choose_direct(self) -> bool:
        mode = self.options.direct_io
        ok = all(aio.direct_io_supported(d) for d in self.dirs)
        if mode == "on" and not ok:
            raise PluginError(f"direct_io='on', but the file system of offload_dir {self.dirs} does not support "
                              "O_DIRECT; use direct_io='auto' (buffered I/O with the page cache dropped) or another disk")
        direct = ok and mode != "off"
        logger.info("hf-lowmem: SSD tier in %s with %s", ", ".join(self.dirs),
                    "direct I/O (O_DIRECT: no page cache)" if direct else
                    "buffered I/O, each transfer's pages dropped from the page cache afterwards (posix_fadvise "
                    "DONTNEED)" + ("" if mode == "off" else ": this file system does not support O_DIRECT"))
        return direct

    def file_bytes(self) -> int:
        return sum(self.block_bytes)

    def _new_file(self, k: int, path: str | None = None, size: int | None = None) -> int:
        path = path or self.paths[k]
        size = size or self.block_bytes[k]
        try:
            os.unlink(path)  # never write into an inode a checkpoint may share
        except FileNotFoundError:
            pass
        fd = aio.open_file(path, self.direct, create=True)
        try:
            aio.preallocate(fd, size)
        except OSError as e:
            os.close(fd)
            raise PluginError(f"offload_dir: cannot reserve {size / 2**30:.2f} GiB for block {k} in "
                              f"{os.path.dirname(path)!r} ({e.strerror}); free space on that disk") from None
        return fd

    def _map_params(self, k: int) -> None:
        """Point block ``k``'s parameters at its file's master region (read-only private mapping)."""
        lay = self.layouts[k]
        n = aio.round_up(lay.numel * self.master_dtype.itemsize)
        if not lay.slots or n == 0:
            return
        mm = mmap.mmap(self._fds[k], n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        flat = torch.frombuffer(mm, dtype=torch.uint8)[: lay.numel * self.master_dtype.itemsize].view(self.master_dtype)
        for s in lay.slots:
            s.param.data = flat[s.offset: s.offset + s.numel].view(s.shape)
        self._maps[k] = mm

    def adopt(self) -> None:
        """Write each block's parameters into its new file (states start as zeros: reserved, never written), block
        by block through the window, freeing each original as it goes; the parameters become views of the files."""
        self._bufs = [WindowBuffer(self.arena.empty(self.buf_bytes, torch.uint8)) for _ in range(self.window)]
        for k, lay in enumerate(self.layouts):
            b = self._bufs[k % len(self._bufs)]
            if b.writing is not None:
                b.writing.result()
            b.t[: self.block_bytes[k]].zero_()
            master = self._region(b, k, self.regions[k][0])
            for s in lay.slots:
                src = s.param.data
                if self.original_dtype is None and src.is_floating_point():
                    self.original_dtype = src.dtype
                master[s.offset: s.offset + s.numel].copy_(src.reshape(-1))
                del src
            self._fds[k] = self._new_file(k)
            self._create_grad_file(k)
            b.block, b.master, b.states = k, True, True
            b.writing = self._wfut[k] = self._tasks.submit(self._adopt_task, b, k)
            self._map_params(k)
            _trim_heap()
        for b in self._bufs:
            if b.writing is not None:
                b.writing.result()
        logger.info("hf-lowmem: SSD tier: %d block files, %.2f GiB on disk, %d host buffers of %.2f GiB",
                    len(self.layouts), self.file_bytes() / 2**30, len(self._bufs), self.buf_bytes / 2**30)

    def _adopt_task(self, b: WindowBuffer, k: int) -> None:
        split, end = self.split[k], self.block_bytes[k]
        self.digests[k]["master"] = self._write_part(self._fds[k], b, 0, split)
        self.digests[k]["states"] = aio.digest_of(self._io, b.t[split:end], self.algorithm) if end > split else None

    def allocate_states(self) -> None:  # reserved in the files by adopt (zeros)
        return None

    # ---- views ---------------------------------------------------------------------------------------------
    @staticmethod
    def _region(b: WindowBuffer, k: int, r: Region) -> torch.Tensor:
        return b.t[r.offset: r.offset + r.nbytes].view(r.dtype)

    def _views(self, b: WindowBuffer, k: int, states: bool) -> dict[str, torch.Tensor]:
        regs = self.regions[k][1:] if states else self.regions[k][:1]
        return {r.name: self._region(b, k, r) for r in regs}

    def master(self, k: int) -> torch.Tensor:
        """Block ``k``'s masters for a tied weight's copy to the GPU: a copy in a scratch buffer of its own (from
        the window, or read from the file without moving the schedule's position), valid until the next call for
        ``k``, which first waits for the GPU's copies out of it."""
        split = self.split[k]
        if k in self._scratch:
            self.dev.h2d.synchronize()
        else:
            self._scratch[k] = self.arena.empty(max(split, aio.IO_ALIGN), torch.uint8)
        scratch = self._scratch[k]
        b = self._find(k)
        if b is not None and (b.master or b.reading is not None):
            self._wait_read(b)
            if b.writing is not None and not b.writing.done():
                b.writing.result()  # its device-to-host copy is done: the buffer holds the update
            scratch[:split].copy_(b.t[:split])
        elif split:
            f = self._wfut.get(k)
            if f is not None:
                f.result()
            aio.read_into(self._io, self._fds[k], scratch[:split], 0, direct=self.direct)
        r = self.regions[k][0]
        return scratch[: r.nbytes].view(r.dtype)

    def states(self, k: int) -> dict[str, torch.Tensor]:
        raise PluginError("the SSD tier keeps optimizer states on the disk; acquire the block first")

    def param_state_views(self, k, s) -> dict[str, torch.Tensor]:
        return {}

    def nbytes(self) -> dict[str, int]:
        es = self.master_dtype.itemsize
        masters = sum(lay.numel for lay in self.layouts) * es
        return {"master_weights": 0, "optimizer_states": 0, "ssd_window": len(self._bufs) * self.buf_bytes,
                "master_weights_on_disk": masters, "optimizer_states_on_disk": self.file_bytes() - masters}

    # ---- the schedule's order ------------------------------------------------------------------------------
    def _block_at(self, pos: int) -> int:
        nb = len(self.layouts)
        pos %= max(1, 2 * nb - 1)
        return pos if pos < nb else 2 * nb - 2 - pos

    def _advance(self, k: int) -> None:
        """Follow the cycle forward 0..N, backward N-1..0 (the head is not fetched again), forward again."""
        nb = len(self.layouts)
        L = max(1, 2 * nb - 1)
        if self._pos is not None:
            for step in (1, 0, 2):
                p = (self._pos + step) % L
                if self._block_at(p) == k:
                    self._pos = p
                    break
            else:
                self._pos = k
        else:
            self._pos = k
        if self._pos >= nb:
            self._trained = True

    def _upcoming(self, n: int) -> list[tuple[int, bool]]:
        """The next ``n`` distinct blocks the schedule will fetch, with whether each will need its states."""
        nb = len(self.layouts)
        L = max(1, 2 * nb - 1)
        if self._pos is None:
            return [(j, False) for j in range(min(n, nb))]
        fwd_now = self._pos < nb
        out, seen = [], set()
        for i in range(1, L + 1):
            p = (self._pos + i) % L
            j = self._block_at(p)
            if j in seen:
                continue
            seen.add(j)
            if p < nb:  # a forward fetch: an update is pending, or will be after this backward
                st = self.pending(j) if (fwd_now and p > self._pos) else self._trained
            else:
                st = False
            out.append((j, st))
            if len(out) >= n:
                break
        return out

    # ---- the window -------------------------------------------------------------------------------------------
    def _find(self, k: int) -> WindowBuffer | None:
        for b in self._bufs:
            if b.block == k:
                return b
        return None

    def _collect(self) -> None:
        for k in list(self._remap):
            self._remap.discard(k)
            self._map_params(k)

    def _victim(self, nxt: dict[int, int], before: int | None) -> WindowBuffer | None:
        best, score = None, -1
        for b in self._bufs:
            if b.pins or (b.reading is not None and not b.reading.done()):
                continue
            s = math.inf if b.block is None else nxt.get(b.block, len(nxt) + 1)
            if s > score:
                best, score = b, s
        if best is None or (before is not None and score <= before):
            return None
        return best

    def _start_read(self, b: WindowBuffer, k: int, states: bool) -> None:
        self._settle(b)
        prev = [f for f in (b.writing, self._wfut.get(k)) if f is not None and not f.done()] + self._grad_deps(k)
        ev, b.gpu_ev = b.gpu_ev, None
        b.block, b.master, b.states, b.ggen = k, False, False, -1
        parts = (PARTS if states else ("master",)) + self._grads_part(k, states)
        b.reading = self._tasks.submit(self._read_task, b, k, parts, prev, ev, self._ggen[k])

    def _more(self, b: WindowBuffer, k: int) -> tuple:
        """The parts an update of resident block ``k`` still lacks: its states, its current gradients."""
        return (() if b.states else ("states",)) + (() if self._grads_ok(b, k) else self._grads_part(k, True))

    def _read_more(self, b: WindowBuffer, k: int, parts: tuple) -> None:
        b.reading = self._tasks.submit(self._read_task, b, k, parts, self._grad_deps(k), None, self._ggen[k])

    def _settle(self, b: WindowBuffer) -> None:
        """Record a finished read's result."""
        if b.reading is not None and b.reading.done():
            f, b.reading = b.reading, None
            parts, ggen = f.result()
            b.master = b.master or "master" in parts
            b.states = b.states or "states" in parts
            if "grads" in parts:
                b.ggen = ggen

    def _wait_read(self, b: WindowBuffer) -> None:
        if b.reading is not None:
            if not b.reading.done():
                t0 = time.perf_counter()
                try:
                    b.reading.result()
                finally:
                    with self._stats_lock:
                        self.stats["wait_s"] += time.perf_counter() - t0
            self._settle(b)

    def _prefetch(self) -> None:
        if not self._bufs:
            return
        up = self._upcoming(len(self._bufs))
        nxt: dict[int, int] = {}
        for i, (j, _) in enumerate(up):
            nxt.setdefault(j, i)
        for i, (j, st) in enumerate(up):
            b = self._find(j)
            if b is not None:
                self._settle(b)
                if st and b.reading is None and (b.writing is None or b.writing.done()):
                    more = self._more(b, j)
                    if more:
                        self._read_more(b, j, more)
                continue
            v = self._victim(nxt, i)
            if v is None:
                break
            self._start_read(v, j, st)

    def _check(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def acquire(self, k: int) -> tuple[torch.Tensor, LazyStates]:
        """Block ``k``'s masters in a host buffer (waiting for its read), and its states on demand."""
        self._check()
        self._collect()
        self._advance(k)
        b = self._find(k)
        if b is None:
            with self._stats_lock:
                self.stats["misses"] += 1
            b = self._demand_buffer(k)
            self._start_read(b, k, False)
        else:
            with self._stats_lock:
                self.stats["hits"] += 1
        b.pins += 1
        try:
            self._wait_read(b)
        except BaseException:
            b.pins -= 1
            b.block = None
            raise
        self._prefetch()
        return self._region(b, k, self.regions[k][0]), LazyStates(self, k, b)

    def _demand_buffer(self, k: int) -> WindowBuffer:
        while True:
            up = self._upcoming(len(self._bufs))
            nxt: dict[int, int] = {}
            for i, (j, _) in enumerate(up):
                nxt.setdefault(j, i)
            v = self._victim(nxt, None)
            if v is not None:
                return v
            busy = [b for b in self._bufs if not b.pins and b.reading is not None]
            if busy:
                self._wait_read(busy[0])
                continue
            b = WindowBuffer(self.arena.empty(self.buf_bytes, torch.uint8))  # every buffer is on the GPU's way
            self._bufs.append(b)
            if not self._said_grow:
                logger.info("hf-lowmem: SSD tier: the schedule holds %d blocks at once; the window grows to %d "
                            "buffers (%.2f GiB)", len(self._bufs) - 1, len(self._bufs),
                            len(self._bufs) * self.buf_bytes / 2**30)
                self._said_grow = True
            return b

    def _need_states(self, k: int, b: WindowBuffer) -> dict[str, torch.Tensor]:
        if b.writing is not None and not b.writing.done():
            b.writing.result()  # the engine is about to write the update into this buffer
        self._wait_read(b)
        more = self._more(b, k)
        if more:
            self._read_more(b, k, more)
            self._wait_read(b)
        return self._views(b, k, states=True)

    def release(self, k: int, after=None) -> None:
        """Done with block ``k``: with ``after`` (the event of its updated masters' and states' copy back into
        the buffer) it is written behind; without, the buffer is reusable once the GPU's copies out of it end."""
        self._check()
        b = self._find(k)
        if b is None or b.pins <= 0:
            return
        b.pins -= 1
        if after is not None:
            prev = [f for f in (b.writing,) if f is not None]
            b.writing = self._wfut[k] = self._tasks.submit(self._write_task, b, k, after, prev)
        elif self.dev.cuda:
            b.gpu_ev = self.dev.record(self.dev.h2d)
        self._prefetch()

    # ---- the I/O tasks (threads) -----------------------------------------------------------------------------
    def _part(self, k: int, part: str) -> tuple[int, int]:
        return (0, self.split[k]) if part == "master" else (self.split[k], self.block_bytes[k])

    def _read_task(self, b: WindowBuffer, k: int, parts, prev: list, ev, ggen: int = 0) -> tuple:
        for f in prev:
            f.result()
        if ev is not None:
            ev.synchronize()
        t0 = time.perf_counter()
        n = 0
        for part in parts:
            if part == "grads":
                n += self._read_grads(b, k)
                continue
            lo, hi = self._part(k, part)
            if hi <= lo:
                continue
            check = (k, part) in self._verify
            digest = aio.read_into(self._io, self._fds[k], b.t[lo:hi], lo, direct=self.direct,
                                   algorithm=self.algorithm if check else None)
            n += hi - lo
            if check:
                if digest != self.digests[k][part]:
                    src = (self._loaded_index or {}).get("folder", "the checkpoint")
                    raise CheckpointError(
                        f"block {k}'s {'master weights' if part == 'master' else 'optimizer states'} read from "
                        f"{self.paths[k]} (linked from {src}) do not match the checksum written with them: the file "
                        "was changed or damaged after it was saved. Resume from an earlier checkpoint")
                self._verify.discard((k, part))
        with self._stats_lock:
            self.stats["read_bytes"] += n
            self.stats["read_busy_s"] += time.perf_counter() - t0
            self.stats["reads"] += 1
        return tuple(parts), ggen

    def _write_part(self, fd: int, b: WindowBuffer, lo: int, hi: int) -> str | None:
        if hi <= lo:
            return None
        return aio.write_from(self._io, fd, b.t[lo:hi], lo, direct=self.direct, algorithm=self.algorithm)

    def _write_task(self, b: WindowBuffer, k: int, after, prev: list) -> None:
        try:
            self._write(b, k, after, prev)
        except BaseException as e:
            self._error = e  # raised at the next acquire or release, and by whoever waits for this write
            raise

    def _write(self, b: WindowBuffer, k: int, after, prev: list) -> None:
        for f in prev:
            f.result()
        after.synchronize()
        t0 = time.perf_counter()
        fd = self._fds[k]
        shared = os.fstat(fd).st_nlink > 1  # a checkpoint holds this inode: write a new file
        target = self.paths[k] + ".new" if shared else None
        if shared:
            fd = self._new_file(k, target)
        try:
            digests = {p: self._write_part(fd, b, *self._part(k, p)) for p in PARTS}
        except OSError as e:
            raise PluginError(f"writing block {k} to {self.paths[k]!r} failed: {e.strerror or e}"
                              + ("; the disk is full: free space or move offload_dir" if e.errno == 28 else "")) from e
        if shared:
            os.replace(target, self.paths[k])
            old, self._fds[k] = self._fds[k], fd
            os.close(old)
            self._remap.add(k)
        self.digests[k] = digests
        self.generation[k] += 1
        with self._stats_lock:
            self.stats["write_bytes"] += self.block_bytes[k]
            self.stats["write_busy_s"] += time.perf_counter() - t0
            self.stats["writes"] += 1

    def sync(self) -> None:
        """Wait for every write in flight, then flush the files to the disk."""
        for f in list(self._wfut.values()):
            f.result()
        self._sync_grads()
        self._check()
        for b in self._bufs:
            if b.reading is not None and b.reading.done():
                self._settle(b)
        self._collect()
        for fd in self._fds:
            if fd is not None:
                os.fdatasync(fd)
        for d in self.dirs:
            aio.fsync_dir(d)

    def _drop_window(self) -> None:
        for b in self._bufs:
            if b.reading is not None:
                with contextlib.suppress(Exception):  # its contents are dropped anyway
                    b.reading.result()
            if b.gpu_ev is not None:
                b.gpu_ev.synchronize()
            b.reading, b.gpu_ev, b.block, b.master, b.states, b.pins, b.ggen = None, None, None, False, False, 0, -1
        self._pos = None

    # ---- weights out -----------------------------------------------------------------------------------------------
    def bind_save(self, model, original=None, flush=None):
        import functools

        return functools.partial(save_pretrained_files, model, store=self, flush=flush, original=original)
