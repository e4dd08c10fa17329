"""The stream engine on several processes of one machine (``accelerate launch`` / ``torchrun``; NCCL on GPUs,
gloo on the CPU), with one copy of the model's host state for all of them (issue 15).

Who holds what
    Every block's flat buffers (:mod:`hf_lowmem.engine.store`) are padded to ``world * ALIGN`` elements and cut
    into ``world`` equal contiguous shards; rank ``r`` owns shard ``r`` of every block. The master weights and
    optimizer states live ONCE per machine, in shared memory (:class:`SharedArena`: a ``memfd`` of rank 0
    that the other ranks map): each rank page-locks only its own shard, copies only its shard to its GPU,
    applies the deferred update to its shard only and writes only its shard back. Because every rank maps
    every shard, the model's parameters stay full views of the masters on every rank, so ``save_model``,
    checkpoints (written by rank 0 after every rank has flushed), ``load_state_dict`` on resume, evaluation
    and export work as with one process, and a checkpoint does not depend on the number of processes
    (2 ranks resume on 1 and 1 on 2; the loader copies what each rank owns). What is per rank, because it
    is per rank's data: the activation stash and the stored gradients of its shard (private, page-locked).

One block, on each rank (:class:`Dist`; with one process every collective is the identity, so the single-GPU
run takes the same code path)
    * in: its shard of masters (and, when an update is pending, of states and stored gradients) is copied to
      its GPU, updated there, written back; the shards in the compute dtype are all-gathered into the
      block's weights;
    * out: the block's fp32 gradient sums are reduce-scattered (sum, then divided by the number of ranks,
      as DDP averages) on a second communicator with an asynchronous work handle, so the reduction runs
      beside the next block's all-gather and compute; the rank keeps its shard's norm and stores its shard;
    * the clipping norm is one all-reduce of the ranks' sums of squares at the end of the window.

The model as given
    Each rank may pass a model with real weights (each then copies its own shards, in parallel, and frees
    its copy block by block: while loading, every process holds one model, as ``from_pretrained`` made it),
    or ranks other than 0 may pass a model built on the ``meta`` device (rank 0 copies every shard and
    sends its buffers, e.g. rotary tables, to the others: one model in memory while loading).

What the ranks add on each GPU (counted per rank by :func:`hf_lowmem.engine.estimate.estimate_stream_memory`)
    * the all-gather: the rank's shard of a block (``1/world`` of its masters, cast to the compute dtype when the
      masters are fp32) beside the gathered block (the weights one process would hold anyway);
    * the reduce-scatter: one block's fp32 gradient sums stay referenced while their reduction runs (in place
      with NCCL); it overlaps the next group's loads and ends before that group's recompute, so it is not on the
      GPU at the backward peak;
    * the clipping norm and the schedule's agreements: a few scalars;
    * NCCL's own buffers, outside PyTorch's allocator (neither ``max_memory_allocated`` nor a
      ``set_per_process_memory_fraction`` cap counts them, the card does): both communicators are created when
      :class:`Dist` is, so the free memory the preflight check reads already excludes them (``comm_bytes``: what
      they took, logged).

Over 400 lines because the collectives, the shared host arena and the sharded store are one unit: the store's
layout, the arena's page-locking and the collectives all follow the same shard rule.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch

from hf_lowmem.engine.hostmem import PAGE, HostArena, _Region
from hf_lowmem.engine.store import BlockLayout, BlockStore, _trim_heap, state_shapes
from hf_lowmem.errors import PluginError

#: bytes of each rank's slot for its stochastic-rounding generator state (a CPU generator's is 5,056)
GEN_SLOT = 8192


class Dist:
    """The ranks of this run: ``world``, ``rank`` and the collectives the engine uses. With one process
    (no process group, or a group of one) every method is the identity and nothing is communicated."""

    def __init__(self, group: Any = None, device: torch.device | None = None):
        import torch.distributed as td

        self.on = td.is_available() and td.is_initialized() and td.get_world_size(group) > 1
        self.group = group
        self.world = td.get_world_size(group) if self.on else 1
        self.rank = td.get_rank(group) if self.on else 0
        self.backend = str(td.get_backend(group)) if self.on else None
        self.side = None  # the communicator of the gradient reductions (overlaps the all-gathers)
        self.comm_bytes = 0  # device memory NCCL's communicators took outside PyTorch's allocator
        self.nccl = self.on and "nccl" in self.backend  # e.g. "nccl", or "cpu:gloo,cuda:nccl"
        if self.on:
            self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.nccl else torch.device("cpu")
            if device is not None and torch.device(device).type != self.comm_device.type:
                raise PluginError(f"the stream engine computes on {device} but the process group uses {self.backend}, "
                                  f"which communicates {self.comm_device.type} tensors; launch with one GPU per process "
                                  "(NCCL) or on the CPU (gloo)")
            self.side = td.new_group(backend=self.backend)
            self.comm_bytes = self._start_communicators(td) if self.nccl else 0

    def _start_communicators(self, td) -> int:
        """Create both NCCL communicators now (one tiny all-reduce each; NCCL creates them lazily) and return the
        device memory they took outside PyTorch's allocator, so that later free-memory readings include it."""
        dev = self.comm_device
        free0, reserved0 = torch.cuda.mem_get_info(dev)[0], torch.cuda.memory_reserved(dev)
        t = torch.zeros(1, device=dev)
        td.all_reduce(t, group=self.group)
        td.all_reduce(t, group=self.side)
        torch.cuda.synchronize(dev)
        took = free0 - torch.cuda.mem_get_info(dev)[0] - (torch.cuda.memory_reserved(dev) - reserved0)
        return max(0, int(took))

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> Dist:
        """The run's default process group (what ``accelerate launch`` / ``torchrun`` + the Trainer set up)."""
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if env_world > 1 and local is not None and int(local) != env_world:
            raise PluginError(f"the stream engine shares host memory between the processes of ONE machine; this run "
                              f"spans several (WORLD_SIZE={env_world}, LOCAL_WORLD_SIZE={local}). Launch it on one "
                              "machine")
        d = cls(device=torch.device(device) if device is not None else None)
        if env_world > 1 and not d.on:
            raise PluginError(f"WORLD_SIZE={env_world} but no torch.distributed process group is initialised; launch "
                              "with `accelerate launch` or `torchrun` and build the TrainingArguments first (they "
                              "initialise it), or call torch.distributed.init_process_group")
        return d

    # ---- tensors on the compute device ---------------------------------------------------------------------
    def all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The ranks' shards, concatenated in rank order (``shard`` itself with one process, or when empty)."""
        if not self.on or not shard.numel():
            return shard
        import torch.distributed as td

        out = torch.empty(shard.numel() * self.world, dtype=shard.dtype, device=shard.device)
        gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, shard.contiguous(), group=self.group)
        return out

    def reduce_scatter(self, full: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start summing ``full`` over the ranks and keeping this rank's equal part: ``(shard, work)``; the shard
        is valid after ``work.wait()``. With NCCL the reduction is in place (the shard is a view of ``full``).
        One process: ``(full, None)``."""
        if not self.on:
            return full, None
        import torch.distributed as td

        n = full.numel() // self.world
        out = full[self.rank * n: (self.rank + 1) * n] if self.nccl else torch.empty(
            n, dtype=full.dtype, device=full.device)
        scatter = getattr(td, "reduce_scatter_single", None) or td.reduce_scatter_tensor  # renamed in torch 2.13
        work = scatter(out, full, op=td.ReduceOp.SUM, group=self.side, async_op=True)
        return out, work

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            import torch.distributed as td

            td.all_reduce(t, group=self.group)
        return t

    # ---- Python numbers (every rank gets the same answer) ---------------------------------------------------
    def _reduce(self, values: list[float], op: str) -> list[float]:
        if not self.on:
            return list(values)
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        td.all_reduce(t, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op],
                      group=self.group)
        return t.tolist()

    def sum(self, *values: float) -> list[float]:
        return self._reduce(list(values), "sum")

    def max(self, *values: float) -> list[float]:
        return self._reduce(list(values), "max")

    def min(self, *values: float) -> list[float]:
        return self._reduce(list(values), "min")

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.on:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as td

            if self.nccl:
                td.barrier(group=self.group, device_ids=[self.comm_device.index])
            else:
                td.barrier(group=self.group)


class GradientReducer:
    """The reduction of each block's fp32 gradient sums over the ranks, one block in flight: :meth:`start` begins
    block ``k``'s (asynchronous, on the second communicator) and finishes the previous one; the engine also calls
    :meth:`finish` once the next group's weights are loaded, so a reduction runs beside those all-gathers and
    copies but its buffer is gone before the next recompute (the GPU peak); :meth:`finish` waits for it, divides by the number of ranks
    (sum, then divide: DDP's average) and hands this rank's shard to ``store(k, shard)``. With one process the
    shard is the whole block and is handed over at once."""

    def __init__(self, dist: Dist, store):
        self.dist, self.store = dist, store
        self.inflight: tuple | None = None

    def start(self, k: int, full: torch.Tensor) -> None:
        shard, work = self.dist.reduce_scatter(full)
        self.finish()
        self.inflight = (k, shard, work, full)  # ``full`` stays referenced until the reduction is done
        if work is None:
            self.finish()

    def finish(self) -> None:
        if self.inflight is None:
            return
        k, shard, work, _full = self.inflight
        self.inflight = None
        if work is not None:
            work.wait()
            shard.div_(self.dist.world)
        self.store(k, shard)


# ---- host memory shared by the ranks ------------------------------------------------------------------------------
class SharedArena(HostArena):
    """:class:`~hf_lowmem.engine.hostmem.HostArena` plus buffers every rank of one machine maps
    (:meth:`shared_buffers`); each rank page-locks only the ranges it streams (:meth:`pin_range`). Private
    buffers (``empty``/``zeros``: the stash and stored gradients) are as in ``HostArena``. With one process the
    shared buffers are private buffers, page-locked whole."""

    def __init__(self, dist: Dist, pin: bool = False):
        super().__init__(pin=pin)
        self.dist = dist
        self.shared_nbytes = 0
        self._shared: list[mmap.mmap] = []  # the mappings of the shared buffers (they live as long as the arena)

    def shared_buffers(self, specs: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """One 1-D zero-filled tensor per ``(numel, dtype)``, in memory every rank maps (collective: every rank
        calls it with the same specs). Pages are allocated when first written, once for the machine."""
        if not self.dist.on:
            out = [self.empty(n, dt) for n, dt in specs]
            self.shared_nbytes += sum(t.numel() * t.element_size() for t in out)
            return out
        sizes = []
        for n, dt in specs:
            nbytes = max(int(n) * torch.empty((), dtype=dt).element_size(), 1)
            sizes.append(-(-nbytes // PAGE) * PAGE)
        total = sum(sizes)
        fd = _open_shared(self.dist, total)
        out = []
        try:
            off = 0
            for (n, dt), size in zip(specs, sizes):
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
                if hasattr(mmap, "MADV_DONTFORK"):
                    mm.madvise(mmap.MADV_DONTFORK)  # forked DataLoader workers get no mapping (see hostmem)
                raw = torch.frombuffer(mm, dtype=torch.uint8)
                self._shared.append(mm)
                es = torch.empty((), dtype=dt).element_size()
                out.append(raw[: int(n) * es].view(dt))
                off += size
        finally:
            self.dist.barrier()  # every rank has mapped the memory: the descriptor can go
            os.close(fd)
        self.shared_nbytes += total
        return out

    def pin_range(self, t: torch.Tensor, lo: int, hi: int) -> None:
        """Page-lock elements ``[lo, hi)`` of the shared buffer ``t`` in this process (rounded out to pages)."""
        if not self.pin or not self.dist.on or hi <= lo:
            return
        es = t.element_size()
        start = t.data_ptr() + lo * es
        end = t.data_ptr() + hi * es
        a, b = start - start % PAGE, -(-end // PAGE) * PAGE
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(a, b - a, 0)
        if err != cudart.cudaError.success:
            torch.cuda.synchronize()
            raise MemoryError(f"cudaHostRegister of {(b - a) / 2**30:.2f} GiB of shared host memory failed ({err}); the "
                              "system may limit locked memory (ulimit -l) or be out of memory")
        self._regions[a] = _Region(None, a, b - a, True)


def _open_shared(dist: Dist, size: int) -> int:
    """A file descriptor of ``size`` bytes of memory every rank of this machine opens: an anonymous ``memfd`` of
    rank 0, opened by the others through ``/proc/<pid>/fd`` (sizes are not limited by /dev/shm's mount); where a
    rank cannot open it, a file in /dev/shm reserved with ``posix_fallocate`` (so a full /dev/shm fails here,
    not with SIGBUS later), unlinked once every rank has opened it."""
    fd, where = -1, None
    if dist.rank == 0:
        fd = os.memfd_create("hf_lowmem_stream", getattr(os, "MFD_CLOEXEC", 1))
        os.ftruncate(fd, size)
        where = (os.getpid(), fd)
    where = dist.broadcast_object(where)
    err = None
    if dist.rank != 0:
        try:
            fd = os.open(f"/proc/{where[0]}/fd/{where[1]}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
    errors = dist.gather_objects(err)
    if not any(errors):
        return fd
    if fd >= 0:
        os.close(fd)
    path = dist.broadcast_object(f"/dev/shm/hf_lowmem_stream_{os.getpid()}_{size}")
    problem = None
    if dist.rank == 0:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
    problem = dist.broadcast_object(problem)
    if problem is None and dist.rank != 0:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    dist.barrier()
    if dist.rank == 0:
        try:
            os.unlink(path)
        except OSError:
            pass
    if problem is not None:
        raise PluginError(f"the ranks cannot share host memory: rank 0's memfd could not be opened by the others "
                          f"({next(e for e in errors if e)}) and {path} could not hold {size / 2**30:.1f} GiB ({problem}). "
                          "Give the container a larger /dev/shm (docker --shm-size) or allow /proc/<pid>/fd access")
    return fd


# ---- shards ---------------------------------------------------------------------------------------------------------
def used(lay: BlockLayout) -> int:
    """Elements of a block's flat buffers that hold parameters (the rest is the tail padding of the shards)."""
    return lay.slots[-1].offset + lay.slots[-1].padded if lay.slots else 0


def fp32_pos(lay: BlockLayout, e: int) -> int:
    """Index in the fp32 state buffers (parameters whose states are not quantized, packed without padding)
    of flat element ``e``: the states of elements below ``e`` come before it."""
    pos = 0
    for s in lay.slots:
        if s.offset >= e:
            break
        if not s.quantized:
            pos = s.soff + min(e - s.offset, s.numel)
    return pos


def state_range(lay: BlockLayout, name: str, t: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """The part of state buffer ``name`` (tensor ``t``) that belongs to flat elements ``[lo, hi)``: the packed fp32
    states by position, the others (codes and scales of quantization blocks) in proportion."""
    if name in ("exp_avg", "exp_avg_sq"):
        return fp32_pos(lay, lo), fp32_pos(lay, hi)
    if lay.numel == 0:
        return 0, 0
    n = t.numel()
    return lo * n // lay.numel, hi * n // lay.numel


def shard_views(lay: BlockLayout, states: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in states.items():
        a, b = state_range(lay, name, t, lo, hi)
        out[name] = t[a:b]
    return out


def make_store(blocks, formats, arena: SharedArena, dist: Dist, group_of, min_quant_size, keep32):
    """The engine's store: :class:`~hf_lowmem.engine.store.BlockStore` for one process, :class:`ShardedStore`
    for several (same layout rule, shards of ``world`` ranks)."""
    if not dist.on:
        return BlockStore(blocks, formats, arena, group_of, min_quant_size, keep32)
    return ShardedStore(blocks, formats, arena, group_of, min_quant_size, keep32, dist=dist)


class ShardedStore(BlockStore):
    """A :class:`~hf_lowmem.engine.store.BlockStore` whose masters and states are in memory every rank maps;
    each rank writes and page-locks only its shards (see the module docstring)."""

    def __init__(self, *args, dist: Dist, **kwargs):
        super().__init__(*args, world=dist.world, rank=dist.rank, **kwargs)
        self.dist = dist

    def adopt(self) -> None:
        dist = self.dist
        real = not any(s.param.device.type == "meta" for lay in self.layouts for s in lay.slots)
        flags = dist.gather_objects(real)
        if not flags[0]:
            raise PluginError("rank 0's model has weights on the meta device; rank 0 must pass the real model "
                              "(the other ranks may pass one built on the meta device)")
        every = all(flags)  # else rank 0 writes every shard
        masters = self.arena.shared_buffers([(lay.numel, self.master_dtype) for lay in self.layouts])
        for k, lay in enumerate(self.layouts):
            flat = masters[k]
            lo, hi = self.shard(k) if every else ((0, lay.numel) if dist.rank == 0 else (0, 0))
            for s in lay.slots:
                src = s.param.data
                if self.original_dtype is None and src.is_floating_point():
                    self.original_dtype = src.dtype
                a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
                if a < b:
                    flat[a:b].copy_(src.reshape(-1)[a - s.offset: b - s.offset])
                view = flat[s.offset: s.offset + s.numel].view(s.shape)
                if src.device.type == "meta":  # .data cannot change a meta tensor's type: swap, keeping the object
                    torch.utils.swap_tensors(s.param, torch.nn.Parameter(view, requires_grad=s.param.requires_grad))
                else:
                    s.param.data = view
                del src
            self._masters.append(flat)
            _trim_heap()  # this rank's copy of the block is gone: hand its pages back before the next block
        dist.barrier()  # every shard written before any rank reads one
        for k, t in enumerate(self._masters):
            self.arena.pin_range(t, *self.shard(k))

    def allocate_states(self) -> None:
        per_block = [list(state_shapes(lay, self.formats.states).items()) for lay in self.layouts]
        flat = iter(self.arena.shared_buffers([spec for per in per_block for _, spec in per]))
        for k, (lay, per) in enumerate(zip(self.layouts, per_block)):
            st = {name: next(flat) for name, _ in per}
            for name, t in st.items():
                self.arena.pin_range(t, *state_range(lay, name, t, *self.shard(k)))
            self._states.append(st)


def share_buffers(model: torch.nn.Module, dist: Dist) -> None:
    """Buffers a rank's model holds on the meta device (a model built there, e.g. its rotary tables) take rank 0's
    values (collective; nothing happens when no rank has any)."""
    meta = [(mn, bn) for mn, m in model.named_modules() for bn, b in m.named_buffers(recurse=False)
            if b is not None and b.device.type == "meta"]
    if not any(dist.gather_objects(bool(meta))):
        return
    values = dist.broadcast_object({f"{mn}.{bn}" if mn else bn: b for mn, m in model.named_modules()
                                    for bn, b in m.named_buffers(recurse=False) if b is not None}
                                   if dist.rank == 0 else None)
    modules = dict(model.named_modules())
    for mn, bn in meta:
        modules[mn]._buffers[bn] = values[f"{mn}.{bn}" if mn else bn].clone()


def load_optimizer_and_scheduler(trainer: Any, checkpoint: str) -> bool:
    """The Trainer's ``_load_optimizer_and_scheduler`` for the stream engine: ``optimizer.pt`` is read memory-mapped
    on the CPU (the Trainer of several ranks would put the whole state on every rank's GPU; mapped, the ranks read
    one copy from the page cache and each copies what it owns), then the LR scheduler. ``False`` when the
    checkpoint has no optimizer or scheduler state (the Trainer then starts them afresh, as it does)."""
    import warnings

    opt, sched = os.path.join(checkpoint, "optimizer.pt"), os.path.join(checkpoint, "scheduler.pt")
    if not (os.path.isfile(opt) and os.path.isfile(sched)):
        return False
    trainer.optimizer.load_state_dict(torch.load(opt, map_location="cpu", mmap=True, weights_only=True))
    with warnings.catch_warnings(record=True):
        trainer.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
    return True
