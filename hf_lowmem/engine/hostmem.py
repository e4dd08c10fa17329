"""Host memory the stream engine streams from, and host memory measured the way the OOM killer sees it.

:class:`HostArena` is the engine's one allocator of host memory (master weights, optimizer states, the
activation stash, stored gradients). Every buffer is its own page-aligned anonymous mapping that

* forked children do not inherit (``madvise(MADV_DONTFORK)``): Linux copies page-locked pages into a forked
  child eagerly instead of sharing them copy-on-write, so each forked DataLoader worker used to duplicate
  every page the engine had locked (issue 12: a 7B run was OOM-killed with two workers). The child simply
  has no mapping at these addresses; nothing in a DataLoader worker reads them;
* is page-locked in place with ``cudaHostRegister`` on CUDA runs (pageable copies run at a third of the
  speed; PyTorch's pinned allocator would round every buffer up to a power of two);
* is viewed as a tensor (``torch.frombuffer``); the model's parameters become views into these buffers.

Only memory mapped here is ever advised: glibc heap pages are shared with other objects.

:func:`tree_memory` sums the proportional set size (Pss, from ``/proc/<pid>/smaps_rollup``) of a process and
all its descendants, page-locked memory included: pages shared copy-on-write with forked workers are counted
once, pages a worker copied are counted twice, as the kernel's OOM accounting does.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass

import torch

GiB = 2**30
PAGE = mmap.PAGESIZE


@dataclass
class _Region:
    mm: mmap.mmap
    ptr: int
    size: int
    registered: bool


def _release(regions: dict[int, _Region]) -> None:
    """Unregister every region (before its memory can be unmapped). The mappings themselves live on while a
    tensor view of them does: the model's parameters may outlive the engine."""
    registered = [r for r in regions.values() if r.registered]
    if registered:
        try:
            cudart = torch.cuda.cudart()
            for r in registered:
                cudart.cudaHostUnregister(r.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown: the CUDA context may already be gone
            pass
    regions.clear()


class HostArena:
    """The engine's host allocator (see the module docstring). ``pin``: page-lock each buffer (CUDA runs)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._regions: dict[int, _Region] = {}
        weakref.finalize(self, _release, self._regions)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements in a fresh mapping (zero-filled: anonymous pages start zeroed)."""
        es = torch.empty((), dtype=dtype).element_size()
        nbytes = max(int(numel) * es, 1)
        size = -(-nbytes // PAGE) * PAGE
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_DONTFORK"):
            mm.madvise(mmap.MADV_DONTFORK)
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        ptr = raw.data_ptr()
        registered = False
        if self.pin:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(ptr, size, 0)
            if err != cudart.cudaError.success:
                torch.cuda.synchronize()  # clears the sticky error of the failed call
                raise MemoryError(f"cudaHostRegister of {size / GiB:.2f} GiB of host memory failed ({err}); the "
                                  "system may limit locked memory (ulimit -l) or be out of memory")
            registered = True
        self._regions[ptr] = _Region(mm, ptr, size, registered)
        return raw[: int(numel) * es].view(dtype)

    def zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(numel, dtype)  # fresh anonymous pages are zero

    def free(self, t: torch.Tensor) -> None:
        """Give a buffer back: unregistered now, unmapped when the last view of it goes."""
        r = self._regions.pop(t.untyped_storage().data_ptr(), None)
        if r is not None and r.registered:
            torch.cuda.cudart().cudaHostUnregister(r.ptr)

    def owns(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._regions

    def ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` addresses of every live buffer (for tests and diagnostics)."""
        return sorted((r.ptr, r.ptr + r.size) for r in self._regions.values())

    @property
    def nbytes(self) -> int:
        return sum(r.size for r in self._regions.values())


# ---- measuring host memory ------------------------------------------------------------------------------------
def _rollup(pid: int) -> dict[str, int] | None:
    """``/proc/<pid>/smaps_rollup`` in bytes (``Rss``, ``Pss``, ``Private_Dirty``, ...), or ``None``."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                kids = []
            out.extend(kids)
            todo.extend(kids)
    return out


def tree_memory(pid: int | None = None) -> dict[str, int]:
    """Memory of process ``pid`` (default: this one) and all its descendants, in bytes: ``pss`` (the sum of
    their proportional set sizes: what the tree really holds, shared pages counted once), ``rss`` (the sum of
    resident sets: shared pages counted in every process), ``private`` (pages no other process maps),
    ``processes``, and per process ``by_pid`` (pid -> Pss). Falls back to RSS where smaps_rollup is unreadable."""
    pid = os.getpid() if pid is None else pid
    total = {"pss": 0, "rss": 0, "private": 0, "processes": 0}
    by_pid: dict[int, int] = {}
    for p in [pid, *descendants(pid)]:
        r = _rollup(p)
        if r is None:
            try:
                import psutil

                rss = psutil.Process(p).memory_info().rss
            except Exception:  # noqa: BLE001 - the process has exited
                continue
            r = {"Pss": rss, "Rss": rss, "Private_Clean": 0, "Private_Dirty": rss}
        total["pss"] += r.get("Pss", 0)
        total["rss"] += r.get("Rss", 0)
        total["private"] += r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
        total["processes"] += 1
        by_pid[p] = r.get("Pss", 0)
    total["by_pid"] = by_pid  # type: ignore[assignment]
    return total


def _read_int(path: str) -> int | None:
    try:
        raw = open(path).read().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def _cgroup_int(v2: str, v1: str) -> int | None:
    """A cgroup memory file: the v2 name, else the v1 one, or ``None`` where neither reads."""
    for path in (f"/sys/fs/cgroup/{v2}", f"/sys/fs/cgroup/memory/{v1}"):
        v = _read_int(path)
        if v is not None:
            return v
    return None


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or ``None`` when there is none."""
    v = _cgroup_int("memory.max", "memory.limit_in_bytes")
    return v if v is not None and v < 2**60 else None


def cgroup_memory_current() -> int | None:
    """Bytes charged to this process's cgroup now (page cache included), or ``None`` where unreadable."""
    return _cgroup_int("memory.current", "memory.usage_in_bytes")


def cgroup_memory_peak() -> int | None:
    """The cgroup's high-water mark since it was created (``memory.peak``), or ``None``."""
    return _cgroup_int("memory.peak", "memory.max_usage_in_bytes")


def mem_available() -> int:
    """``MemAvailable`` from /proc/meminfo (what the kernel can give without swapping), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def available_bytes() -> int:
    """Host memory this process tree can still take: MemAvailable, capped by the cgroup limit's headroom."""
    avail = mem_available()
    limit = cgroup_memory_limit()
    if limit is not None:  # the tree's own memory, not memory.current (which counts reclaimable page cache)
        avail = min(avail, max(0, limit - tree_memory()["pss"]))
    return avail
