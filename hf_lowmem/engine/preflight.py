"""The stream engine's memory checks, before it allocates: refuse, with both numbers and the way out, memory
the run would not get, and choose ``stash_every`` when it is ``auto``.

Host memory is compared the way the OOM killer counts it: what the process tree (the training process and
its DataLoader workers, page-locked memory included) uses now plus what the engine is about to allocate,
against the declared budget (``host_memory`` option, else ``lowmem_host_memory``); without a declared budget,
what is about to be allocated against the memory the OS reports available (capped by the cgroup limit).

The SSD tier (``offload_dir``) needs only its window of host buffers; :func:`check_disk` checks the disk instead:
the space the block files take (refused, with both numbers, when it is not free) and its bandwidth (declared
``disk_gbps``, else a short direct-I/O probe cached per device), and, at the first window,
:func:`disk_step_note` says how long a step's disk transfers take and whether the disk sets the pace.

Under several ranks of one machine (:mod:`hf_lowmem.engine.dist`) every check is about the machine: the
process trees of all ranks are summed, what they share (masters, optimizer states) is counted once, what each
rank allocates for itself (its stash and stored gradients) once per rank, and every rank reaches the same
verdict from the same all-reduced figures (a refusal on one rank only would leave the others waiting)."""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import TYPE_CHECKING

import torch

from hf_lowmem.engine import hostmem
from hf_lowmem.engine.estimate import (
    disk_seconds,
    estimate_stream_memory,
    smallest_stash_every,
    ssd_traffic,
    state_bytes,
)
from hf_lowmem.engine.store import DTYPES, grad_bytes
from hf_lowmem.engine.stream_options import parse_bytes
from hf_lowmem.errors import MemoryBudgetError

if TYPE_CHECKING:  # pragma: no cover
    from hf_lowmem.engine.stream import StreamEngine

logger = logging.getLogger("hf_lowmem")
GiB = 2**30
FIX = ("Use the compact tier (lowmem_options={'stream': {'tier': 'compact'}}: bf16 masters, 4-bit states, 8-bit "
       "gradients), a larger stash_every, fewer tokens per accumulation window, or more RAM (if this machine has "
       "more than it reports, declare it with lowmem_host_memory)")


def declared_budget(engine: StreamEngine) -> int | None:
    return parse_bytes(engine.options.host_memory, "host_memory") or parse_bytes(engine.spec.host_memory,
                                                                                "lowmem_host_memory")


def host_now(engine: StreamEngine) -> tuple[int, int]:
    """``(used, available)``: the Pss of this run's process trees (every rank's, summed) and the host memory still
    available to them (the smallest any rank sees; the cgroup's headroom counts every rank)."""
    dist = engine.dist
    tree = int(dist.sum(hostmem.tree_memory()["pss"])[0])
    avail = hostmem.available_bytes()
    limit = hostmem.cgroup_memory_limit()
    if dist.world > 1 and limit is not None:
        avail = min(avail, max(0, limit - tree))
    return tree, int(dist.min(avail)[0])


def _fits(engine: StreamEngine, extra: int, now: tuple[int, int]) -> bool:
    declared = declared_budget(engine)
    if declared:
        return now[0] + extra <= declared
    return extra <= now[1]


def _refuse(engine: StreamEngine, parts: dict[str, float], extra: int, now: tuple[int, int]) -> None:
    what = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in parts.items() if v)
    declared = declared_budget(engine)
    ranks = f" ({engine.dist.world} ranks: their process trees summed)" if engine.dist.world > 1 else ""
    if declared:
        tree = now[0]
        msg = (f"the stream engine needs {(tree + extra) / GiB:.1f} GiB of host memory in all: {extra / GiB:.1f} GiB "
               f"more ({what}) on top of the {tree / GiB:.1f} GiB this process tree uses{ranks}, but the declared host "
               f"budget is {declared / GiB:.1f} GiB")
    else:
        msg = (f"the stream engine needs {extra / GiB:.1f} GiB more host memory ({what}{ranks}), but the memory "
               f"available now is {now[1] / GiB:.1f} GiB")
    raise MemoryBudgetError(f"{msg}. {FIX}.")


def check_host(engine: StreamEngine, stage: str, window_tokens: int = 0) -> None:
    """``masters``: before adopting the weights (counts what the master buffers add to the model as given);
    ``states``: before allocating optimizer states; ``stash``: before (re)allocating the stash slots."""
    store = engine.store
    if getattr(store, "file_backed", False) and stage != "stash":  # masters and states live on the disk
        if stage == "masters":
            check_disk(engine)
            extra = store.window * store.buf_bytes
            now = host_now(engine)
            if not _fits(engine, extra, now):
                _refuse(engine, {f"SSD tier window ({store.window} blocks)": extra}, extra, now)
        return
    world = engine.dist.world
    n = sum(lay.numel for lay in store.layouts)
    if stage == "masters":  # shared by the ranks: once; the models as given: every rank's
        es = torch.empty((), dtype=DTYPES[engine.formats.master]).element_size()
        given = sum(p.numel() * p.element_size() for b in engine.blocks for p in b.params.values() if p.device.type == "cpu")
        given = int(engine.dist.sum(given)[0])
        extra = max(0, sum(s.numel for lay in store.layouts for s in lay.slots) * es - given)
        parts = {f"{engine.formats.master} master weights (beyond the model as given)": extra}
    elif stage == "states":  # shared: once
        extra = int(n * state_bytes(engine.formats.states))
        parts = {f"{engine.formats.states} optimizer states": extra}
    else:  # each rank's own
        pool_bytes = engine.pool.nbytes(window_tokens)
        old = sum(t.numel() for t in engine.pool.slots)
        extra = world * max(0, sum(pool_bytes.values()) - old)
        parts = {"activation stash": world * pool_bytes["activation_stash"],
                 "stored gradients": world * pool_bytes["gradients"]}
    now = host_now(engine)
    if not _fits(engine, extra, now):
        _refuse(engine, parts, extra, now)


def check_disk(engine: StreamEngine) -> None:
    """Before the SSD tier writes its files: refuse when a folder's disk lacks the space (both numbers), warn when
    a checkpoint's copy would not fit beside them, and find each disk's bandwidth (``engine.disk_rates``)."""
    from hf_lowmem.engine import aio

    store = engine.store
    need: dict[str, int] = {}
    for k, path in enumerate(store.paths):
        need[os.path.dirname(path)] = need.get(os.path.dirname(path), 0) + store.block_bytes[k] + store.grad_size[k]
    rates: dict[str, tuple[float, float, str]] = {}
    for d, n in need.items():
        mine = 0  # this folder's old block files, replaced (their space comes back unless a checkpoint links them)
        for name in os.listdir(d):
            if name.startswith(("block-", "grad-")) and name.endswith(".bin"):
                st = os.stat(os.path.join(d, name))
                mine += st.st_size if st.st_nlink == 1 else 0
        free = shutil.disk_usage(d).free + mine
        if n > free:
            raise MemoryBudgetError(
                f"the SSD tier needs {n / GiB:.1f} GiB in {d!r} (master weights and optimizer states of "
                f"{sum(1 for p in store.paths if os.path.dirname(p) == d)} blocks) but its disk has {free / GiB:.1f} GiB "
                "free. Free space there, give several folders on several disks (offload_dir=[...]), or use the compact "
                "tier (tier='compact': bf16 masters, 4-bit states)")
        if 2 * n > free:
            logger.warning("hf-lowmem: the SSD tier's files take %.1f GiB of the %.1f GiB free in %s; a checkpoint links "
                           "them and keeps its own copy once training moves on (%.1f GiB more each: set "
                           "save_total_limit, or save checkpoints where there is room)", n / GiB, free / GiB, d, n / GiB)
        if engine.options.disk_gbps:
            g = float(engine.options.disk_gbps)
            rates[d] = (g, g, "declared disk_gbps")
        else:
            m = aio.measure_bandwidth(d, nbytes=256 << 20, threads=int(engine.options.io_threads))
            rates[d] = (m["read_gbps"], m["write_gbps"], "probed" + (" (cached)" if m.get("cached") else ""))
    engine.disk_rates = rates


def disk_step_note(engine: StreamEngine, tokens_per_micro_batch: int, micro_batches: int, stash_every: int) -> dict:
    """The SSD tier's traffic per optimizer step and the seconds it takes on these disks, logged; on a GPU, beside
    the window's compute at the planner's rates, with a warning when the disk sets the pace."""
    from hf_lowmem.engine import aio

    store = engine.store
    params = [sum(s.numel for s in lay.slots) for lay in store.layouts]
    traffic = ssd_traffic(params, master_format=engine.formats.master, state_format=engine.formats.states,
                          window=store.window, stash_every=stash_every,
                          grad_format=engine.formats.grads if store.offload_grads else None,
                          compute_bytes=engine.compute_dtype.itemsize)
    rates = getattr(engine, "disk_rates", None) or {d: (engine.options.disk_gbps or 1.0,) * 2 + ("assumed",)
                                                  for d in store.dirs}
    disks = len({aio.device_key(d) for d in rates})
    r = min(v[0] for v in rates.values())
    w = min(v[1] for v in rates.values())
    t_disk = disk_seconds(traffic, r, w, disks=disks)
    note = {**traffic, "read_gbps": r, "write_gbps": w, "disks": disks, "disk_s": t_disk}
    msg = (f"hf-lowmem: SSD tier: each optimizer step reads {traffic['read_bytes'] / 1e9:.1f} GB and writes "
           f"{traffic['write_bytes'] / 1e9:.1f} GB on {disks} disk(s) at {r:.2f} GB/s read, {w:.2f} GB/s write "
           f"({next(iter(rates.values()))[2]}): {t_disk:.1f} s of disk time per step")
    if engine.dev.cuda:
        from hf_lowmem.planner import DEFAULT_DEVICE, TrainSetup

        rate = DEFAULT_DEVICE.flops_rate(TrainSetup(precision="bf16" if engine.compute_dtype == torch.bfloat16 else "fp32"))
        t_comp = 8 * sum(params) * tokens_per_micro_batch * micro_batches / rate  # forward, recompute, backward
        note["compute_s"] = t_comp
        if t_disk > t_comp:
            hide = math.ceil(micro_batches * t_disk / t_comp)
            logger.warning("%s, against ~%.1f s of compute (the planner's H200 rates): the disk sets the pace, a step "
                           "takes about %.1f s. gradient_accumulation_steps=%d (more tokens per window) would hide "
                           "it, or a faster disk / more disks (offload_dir=[...])", msg, t_comp, t_disk, hide)
        else:
            logger.info("%s, hidden behind ~%.1f s of compute", msg, t_comp)
    else:
        logger.info("%s", msg)
    engine.disk_note = note
    return note


def estimate(engine: StreamEngine, tokens_per_micro_batch: int, micro_batches: int, stash_every: int | None,
             world: int | None = None) -> dict:
    """The engine's memory model for this model and these formats; ``world`` ranks (default: this run's)."""
    fm = engine.formats
    cfg = engine.anat.model.config
    return estimate_stream_memory(
        block_params=[sum(p.numel() for p in b.params.values()) for b in engine.blocks],
        hidden_size=engine.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 4 * engine.hidden_size),
        vocab_size=engine.anat.head.out_features,
        tokens_per_micro_batch=tokens_per_micro_batch, micro_batches=micro_batches,
        compute_bytes=torch.empty((), dtype=engine.compute_dtype).element_size(),
        state_format=fm.states, loss_chunk_tokens=engine.options.loss_chunk_tokens, masters_exist=True,
        master_format=fm.master, grad_format=fm.grads, stash_every=stash_every or engine.stash_every or 1,
        offload_window=getattr(engine.store, "window", None) if getattr(engine.store, "file_backed", False) else None,
        offload_grads=getattr(engine.store, "offload_grads", False), world=world or engine.dist.world)


def _pool_bytes(engine: StreamEngine, window_tokens: int, n: int) -> int:
    """Host bytes of one rank's stash pool with ``stash_every=n`` (see :class:`~hf_lowmem.engine.store.StashPool`):
    the stash of its own tokens and the stored gradients of its shards."""
    from hf_lowmem.engine.estimate import stash_host_bytes

    cb = torch.empty((), dtype=engine.compute_dtype).element_size()
    lays = engine.store.layouts
    # per-parameter bytes from the padded layout, so the figure is what StashPool allocates (to a few KiB)
    per = [grad_bytes(lay.numel // engine.dist.world, engine.formats.grads, cb) for lay in lays]
    on_disk = getattr(engine.store, "offload_grads", False)  # the SSD tier keeps them in files
    parts = stash_host_bytes([max(1, p) for p in per], window_tokens * engine.hidden_size * cb,
                             grad_bytes_per_param=0.0 if on_disk else 1.0, stash_every=n)
    return sum(parts.values())


def gpu_budget(engine: StreamEngine) -> int | None:
    if not engine.dev.cuda:
        return None
    declared = parse_bytes(engine.options.gpu_memory, "gpu_memory")
    if declared:
        return declared
    device = engine.dev.device
    free, total = torch.cuda.mem_get_info(device)
    try:
        frac = torch.cuda.get_per_process_memory_fraction(device)
    except (AttributeError, RuntimeError):
        frac = 1.0
    return int(engine.dist.min(min(free, int(total * frac) - torch.cuda.memory_allocated(device)))[0])  # every rank's


def plan_window(engine: StreamEngine, tokens_per_micro_batch: int, micro_batches: int) -> int:
    """``stash_every`` for this run (the option, or the smallest n whose stash fits the host budget) after
    checking host and GPU memory for it (when ``check_memory``)."""
    window_tokens = tokens_per_micro_batch * micro_batches
    n_layers = engine.anat.num_layers
    fixed = engine.stash_every
    check = engine.options.check_memory

    world = engine.dist.world
    now = host_now(engine)

    def host_ok(n: int) -> bool:
        return _fits(engine, world * _pool_bytes(engine, window_tokens, n), now)

    if fixed is not None:
        n = fixed
    else:
        n = smallest_stash_every(host_ok, n_layers) or (n_layers if check else 1)
    if check and not host_ok(n):
        need = world * _pool_bytes(engine, window_tokens, n)
        _refuse(engine, {f"activation stash and stored gradients, stash_every={n}": need}, need, now)
    budget = gpu_budget(engine)
    if check and budget is not None:
        est = estimate(engine, tokens_per_micro_batch, micro_batches, n)
        if est["gpu_bytes"] > budget:
            why = (f" (stash_every={n} was needed to fit the host budget)" if fixed is None and n > 1 else "")
            ranks = (f" on each of the {world} GPUs (the gathered block, one block's gradient reduction in flight; "
                     f"NCCL's {engine.dist.comm_bytes / GiB:.2f} GiB is already taken)" if world > 1 else "")
            raise MemoryBudgetError(
                f"the stream engine needs about {est['gpu_bytes'] / GiB:.2f} GiB of GPU memory{ranks} for micro-batches "
                f"of {tokens_per_micro_batch} tokens ({micro_batches} per window){why}, but {budget / GiB:.2f} GiB is "
                f"available to this process (peak: {est['gpu_peak_phase']}). Raise the GPU memory cap, use a smaller "
                "per_device_train_batch_size (and more gradient_accumulation_steps), shorter sequences, a smaller "
                "stash_every (or a larger host budget, so that it can be smaller). Breakdown (GiB): "
                + ", ".join(f"{k}={v / GiB:.2f}" for k, v in est["gpu"].items()))
    if getattr(engine.store, "file_backed", False):
        disk_step_note(engine, tokens_per_micro_batch, micro_batches, n)
    return n
