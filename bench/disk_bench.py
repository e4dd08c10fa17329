"""Issue 14: the disk the SSD tier would use, measured the way the tier uses it: sequential direct-I/O
(``O_DIRECT``) writes then reads of a scratch file, in requests of ``--block`` bytes from 1, 4 and 8 threads
(each thread its own contiguous share of the file), from page-aligned buffers. One JSON row per thread count:
write and read GB/s, whether O_DIRECT was in use, the file system and the free space.

    python bench/disk_bench.py --dir /mnt/nvme/scratch --size 8GiB --out bench/results/disk_h200.json
    python bench/disk_bench.py --smoke          # 64 MiB in 16 MiB requests: checks the script only

Without O_DIRECT (a file system that refuses it) the file is written buffered, fdatasync'ed, and its pages are
dropped before the read (``posix_fadvise DONTNEED``), so the read still comes from the disk; the row says so.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_lowmem.engine import aio
from hf_lowmem.sizes import parse_size


def fs_type(path: str) -> str:
    best, typ = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, typ = parts[1], parts[2]
    except OSError:
        pass
    return typ


def one(folder: str, size: int, block: int, threads: int, direct: bool) -> dict:
    """Write then read ``size`` bytes in requests of ``block`` from ``threads`` threads."""
    size = -(-size // (block * threads)) * block * threads  # every thread moves whole blocks
    share = size // threads
    path = os.path.join(folder, f".hf_lowmem-disk-bench-{os.getpid()}")
    bufs = [mmap.mmap(-1, block) for _ in range(threads)]
    for b in bufs:
        b.write(os.urandom(1 << 20) * (block >> 20) if block >= 1 << 20 else os.urandom(block))
    fd = aio.open_file(path, direct, create=True)
    try:
        aio.preallocate(fd, size)

        def write(i):
            for off in range(i * share, (i + 1) * share, block):
                aio._pwrite_all(fd, memoryview(bufs[i]), off)

        def read(i):
            for off in range(i * share, (i + 1) * share, block):
                aio._pread_all(fd, memoryview(bufs[i]), off)

        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(write, range(threads)))
            os.fdatasync(fd)
            t1 = time.perf_counter()
            aio.drop_cache(fd, 0, size)
            t2 = time.perf_counter()
            list(pool.map(read, range(threads)))
            t3 = time.perf_counter()
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
        os.unlink(path)
    return {"threads": threads, "block_bytes": block, "bytes": size, "direct": direct,
            "write_gbps": round(size / (t1 - t0) / 1e9, 3), "read_gbps": round(size / (t3 - t2) / 1e9, 3),
            "write_s": round(t1 - t0, 2), "read_s": round(t3 - t2, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 ".ssd_bench"), help="a folder on the disk to measure")
    p.add_argument("--size", default="4GiB", help="bytes written and read per thread count (default 4GiB)")
    p.add_argument("--block", default="1GiB", help="bytes per request (default 1GiB; at most 2GiB-4KiB on Linux)")
    p.add_argument("--threads", default="1,4,8")
    p.add_argument("--out", default=None, help="JSON file the rows are written to")
    p.add_argument("--smoke", action="store_true", help="64 MiB in 16 MiB requests (checks the script only)")
    a = p.parse_args()
    if a.smoke:
        a.size, a.block = "64MiB", "16MiB"
    os.makedirs(a.dir, exist_ok=True)
    size, block = parse_size(a.size, "--size"), parse_size(a.block, "--block")
    block = min(block, (2 << 30) - aio.IO_ALIGN) // aio.IO_ALIGN * aio.IO_ALIGN
    direct = aio.direct_io_supported(a.dir)
    base = {"dir": a.dir, "fs": fs_type(a.dir), "free_gib": round(shutil.disk_usage(a.dir).free / 2**30, 1)}
    rows = []
    for n in (int(x) for x in a.threads.split(",")):
        row = {"name": f"disk:{n}threads", **base, **one(a.dir, size, block, n, direct)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "smoke": a.smoke, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
