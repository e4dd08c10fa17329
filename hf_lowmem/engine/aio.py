"""File I/O for the SSD tier: direct I/O into the engine's aligned host buffers, from a pool of threads.

* :func:`direct_io_supported` probes a folder once: a file opened with ``O_DIRECT`` and an aligned write and
  read. Where that works, transfers bypass the page cache, so the RAM the tier exists to save is not quietly
  refilled with cached file pages. Where it does not (some network or FUSE file systems), files are opened
  buffered and every transfer is followed by ``posix_fadvise(POSIX_FADV_DONTNEED)`` on its range (after an
  ``fdatasync`` for writes, so the dirty pages can actually be dropped); :class:`FileSet` says which in a log
  line.
* :func:`read_into` / :func:`write_from` move a byte range between a file and a tensor in chunks of
  :data:`CHUNK` bytes, in parallel on a thread pool (``os.preadv`` / ``os.pwritev`` release the GIL), each
  chunk checksummed on the same thread (XXH3-64 when ``xxhash`` imports, else CRC32; both release the GIL).
  Offsets and lengths are multiples of :data:`IO_ALIGN`, and so are buffer addresses (the arena's mappings
  are page-aligned and regions start at multiples of :data:`IO_ALIGN`), as ``O_DIRECT`` requires.
* :func:`measure_bandwidth` is the preflight's probe: sequential direct writes and reads of a scratch file,
  the result cached per device (``~/.cache/hf_lowmem/disks.json``, keyed by the device number and the
  file system's identity) so the probe runs once per disk.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger("hf_lowmem")

IO_ALIGN = 4096
CHUNK = 32 << 20  # bytes per I/O request and per checksum
_PROBE_CACHE: dict[str, bool] = {}


def round_up(n: int, m: int = IO_ALIGN) -> int:
    return -(-int(n) // m) * m


# ---- checksums --------------------------------------------------------------------------------------------
def checksum_name() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3-64/32MiB"
    except ImportError:
        return "crc32/32MiB"


def chunk_checksum(algorithm: str):
    """The per-chunk checksum of ``algorithm`` (bytes-like -> 8 bytes), or ``None`` when it cannot run here."""
    if algorithm == "xxh3-64/32MiB":
        try:
            import xxhash
        except ImportError:
            return None
        return lambda data: xxhash.xxh3_64_digest(data)
    if algorithm == "crc32/32MiB":
        return lambda data: zlib.crc32(data).to_bytes(8, "little")
    return None


def combine(parts: list[bytes], nbytes: int) -> str:
    """A region's digest from its chunks' checksums (and its length)."""
    h = hashlib.blake2b(int(nbytes).to_bytes(8, "little"), digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


# ---- probing and opening ----------------------------------------------------------------------------------
def direct_io_supported(folder: str) -> bool:
    """Whether files in ``folder`` can be opened with ``O_DIRECT`` and moved with aligned transfers."""
    key = str(Path(folder).resolve())
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    ok = False
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        path = os.path.join(folder, f".hf_lowmem-direct-probe-{os.getpid()}")
        buf = mmap.mmap(-1, IO_ALIGN)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flag, 0o600)
            try:
                buf.write(b"hf-lowmem".ljust(IO_ALIGN, b"\0"))
                ok = os.pwritev(fd, [buf], 0) == IO_ALIGN
                back = mmap.mmap(-1, IO_ALIGN)
                ok = ok and os.preadv(fd, [back], 0) == IO_ALIGN and back[:9] == b"hf-lowmem"
                back.close()
            finally:
                os.close(fd)
        except OSError:
            ok = False
        finally:
            buf.close()
            try:
                os.unlink(path)
            except OSError:
                pass
    _PROBE_CACHE[key] = ok
    return ok


def open_file(path: str, direct: bool, create: bool = False) -> int:
    """A block file, opened for direct I/O, or buffered without read-ahead (pages the kernel read ahead of a
    request would stay cached: only the requested ranges are dropped)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
    if direct:
        flags |= os.O_DIRECT
    fd = os.open(path, flags, 0o600)
    if not direct and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass
    return fd


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the file's blocks now (a full disk fails here, not in the middle of training); unwritten
    reserved blocks read as zeros. Falls back to a sparse ``ftruncate`` where ``fallocate`` is unsupported."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        os.ftruncate(fd, nbytes)


def drop_cache(fd: int, offset: int, nbytes: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


# ---- transfers ----------------------------------------------------------------------------------------------
def _view(t) -> memoryview:
    """A writable byte view of a contiguous uint8 CPU tensor."""
    return memoryview(t.numpy()).cast("B")


def _pread_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short read: {done} of {len(mv)} bytes at offset {offset} (the file is shorter "
                                     "than its layout: truncated?)")
        done += n


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        n = os.pwritev(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += n


def _spans(nbytes: int) -> list[tuple[int, int]]:
    return [(lo, min(nbytes, lo + CHUNK)) for lo in range(0, nbytes, CHUNK)]


def read_into(pool: ThreadPoolExecutor, fd: int, t, offset: int, *, direct: bool, algorithm: str | None = None) -> str | None:
    """Fill uint8 tensor ``t`` from the file at ``offset``; returns its digest when ``algorithm`` is given."""
    mv = _view(t)
    check = chunk_checksum(algorithm) if algorithm else None

    def one(span):
        lo, hi = span
        _pread_all(fd, mv[lo:hi], offset + lo)
        if not direct:
            drop_cache(fd, offset + lo, hi - lo)
        return check(mv[lo:hi]) if check else b""

    parts = list(pool.map(one, _spans(len(mv))))
    return combine(parts, len(mv)) if check else None


def write_from(pool: ThreadPoolExecutor, fd: int, t, offset: int, *, direct: bool, algorithm: str | None = None) -> str | None:
    """Write uint8 tensor ``t`` into the file at ``offset``; returns its digest when ``algorithm`` is given."""
    mv = _view(t)
    check = chunk_checksum(algorithm) if algorithm else None

    def one(span):
        lo, hi = span
        digest = check(mv[lo:hi]) if check else b""
        _pwrite_all(fd, mv[lo:hi], offset + lo)
        return digest

    parts = list(pool.map(one, _spans(len(mv))))
    if not direct:  # dirty pages cannot be dropped: write them out first
        os.fdatasync(fd)
        drop_cache(fd, offset, len(mv))
    return combine(parts, len(mv)) if check else None


def digest_of(pool: ThreadPoolExecutor, t, algorithm: str) -> str:
    """The digest :func:`write_from` would record for tensor ``t``."""
    mv = _view(t)
    check = chunk_checksum(algorithm)
    return combine(list(pool.map(lambda s: check(mv[s[0]:s[1]]), _spans(len(mv)))), len(mv))


def copy_file(src: str, dst: str) -> None:
    """Copy a file inside the kernel (``copy_file_range``: a reflink where the file system can), never through
    this process's memory; used where a hard link is impossible (another file system)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        n = os.fstat(fi.fileno()).st_size
        done = 0
        while done < n:
            got = os.copy_file_range(fi.fileno(), fo.fileno(), n - done, done, done)
            if got <= 0:
                raise OSError(errno.EIO, f"copy_file_range stopped at {done} of {n} bytes copying {src}")
            done += got
        os.fsync(fo.fileno())
        drop_cache(fi.fileno(), 0, n)
        drop_cache(fo.fileno(), 0, n)


def link_or_copy(src: str, dst: str) -> str:
    """``dst`` becomes the same file as ``src``: a hard link (no data moves), or an in-kernel copy across file
    systems. Returns ``"link"`` or ``"copy"``."""
    try:
        os.link(src, dst)
        return "link"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    copy_file(src, dst)
    return "copy"


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- bandwidth ------------------------------------------------------------------------------------------------
def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hf_lowmem" / "disks.json"


def device_key(folder: str) -> str:
    """The identity of the disk holding ``folder``: device number and file-system id."""
    st = os.stat(folder)
    try:
        vfs = os.statvfs(folder)
        fsid = getattr(vfs, "f_fsid", 0)
    except OSError:
        fsid = 0
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{fsid}"


def measure_bandwidth(folder: str, *, nbytes: int = 512 << 20, threads: int = 4, use_cache: bool = True) -> dict:
    """Sequential write then read GB/s of the disk holding ``folder``: ``nbytes`` in :data:`CHUNK` requests from
    ``threads`` threads, direct I/O where supported (buffered + fdatasync otherwise, the page cache dropped
    before the read). Cached per device; returns ``{"write_gbps", "read_gbps", "direct", "bytes", "cached"}``."""
    key = device_key(folder)
    cache = _cache_path()
    if use_cache:
        try:
            entry = json.loads(cache.read_text()).get(key)
            if entry and entry.get("bytes", 0) >= nbytes:
                return {**entry, "cached": True}
        except (OSError, ValueError):
            pass
    import torch

    direct = direct_io_supported(folder)
    nbytes = round_up(nbytes, CHUNK)
    path = os.path.join(folder, f".hf_lowmem-bandwidth-{os.getpid()}")
    mm = mmap.mmap(-1, nbytes)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    fd = open_file(path, direct, create=True)
    try:
        preallocate(fd, nbytes)
        with ThreadPoolExecutor(threads, thread_name_prefix="hf-lowmem-probe") as pool:
            t0 = time.perf_counter()
            write_from(pool, fd, buf, 0, direct=direct)
            os.fdatasync(fd)
            t1 = time.perf_counter()
            drop_cache(fd, 0, nbytes)
            t2 = time.perf_counter()
            read_into(pool, fd, buf, 0, direct=direct)
            t3 = time.perf_counter()
    finally:
        os.close(fd)
        del buf
        mm.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    entry = {"write_gbps": round(nbytes / (t1 - t0) / 1e9, 3), "read_gbps": round(nbytes / (t3 - t2) / 1e9, 3),
             "direct": direct, "bytes": nbytes, "threads": threads, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(cache.read_text()) if cache.is_file() else {}
            data[key] = entry
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, cache)
        except (OSError, ValueError):
            pass
    return {**entry, "cached": False}
