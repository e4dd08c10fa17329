"""Time the stream engine's compact-tier update (8-bit gradient in, bf16 master with stochastic rounding,
4-bit moments) on one device at several chunk sizes: the functions ``StreamAdamW`` calls per chunk
(``lowbit.dequantize_8bit``, ``StreamAdamW._update_4bit``, ``lowbit.round_to_bf16_stochastic``), on the
7B shape's largest matrix (4096 x 11008) repeated ``--reps`` times.

Per chunk size, two figures: ``enqueue_s`` (the host's time to issue the kernels: the loop without waiting)
and ``device_s`` (until the device is done). When the two are close, the update is bound by issuing
kernels, and larger chunks (fewer kernels) make it faster.

    python bench/update_chunk_bench.py --chunks 22,23,24 --out bench/results/update_chunks.json
"""

from __future__ import annotations

import argparse
import sys
import time

from benchlib import write_rows


def run(chunk_log2: int, n: int, reps: int, device: str) -> dict:
    import torch

    from hf_lowmem.engine import lowbit
    from hf_lowmem.engine.optim import StreamAdamW

    c = 1 << chunk_log2
    n = (n + c - 1) // c * c
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, device=dev).to(torch.bfloat16)
    gcodes = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
    gabs = torch.rand(n // lowbit.BLOCK_8BIT, device=dev)
    states = {"m": torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=dev),
              "v": torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=dev),
              "m_scale": torch.rand(n // lowbit.BLOCK_4BIT, device=dev),
              "v_scale": torch.rand(n // lowbit.BLOCK_4BIT, device=dev)}
    opt = StreamAdamW.__new__(StreamAdamW)  # only its per-chunk arithmetic is timed
    opt.generator = gen

    def sweep():
        for a in range(0, n, c):
            b = a + c
            g = lowbit.dequantize_8bit(gcodes[a:b], gabs[a // lowbit.BLOCK_8BIT: b // lowbit.BLOCK_8BIT])
            w32 = w[a:b].float()
            opt._update_4bit(w32, g, states, a, b, step=10, lr=1e-4, clip=0.5, betas=(0.9, 0.999), eps=1e-8, wd=0.0)
            lowbit.round_to_bf16_stochastic(w32, w[a:b], gen)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sweep()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        sweep()
    enqueue = time.perf_counter() - t0
    sync()
    total = time.perf_counter() - t0
    row = {"chunk_values": c, "values": n * reps, "chunks": n // c * reps, "enqueue_s": round(enqueue, 4),
           "device_s": round(total, 4), "ns_per_value": round(total / (n * reps) * 1e9, 4),
           "us_per_chunk": round(total / (n // c * reps) * 1e6, 1)}
    if dev.type == "cuda":
        row["update_temp_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", default="22,23,24", help="log2 of the chunk sizes to time")
    p.add_argument("--values", type=int, default=4096 * 11008, help="values of one parameter")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = []
    for k in a.chunks.split(","):
        rows.append(run(int(k), a.values, a.reps, a.device))
        print(rows[-1], flush=True)
        write_rows(a.out, "python bench/update_chunk_bench.py " + " ".join(sys.argv[1:]), a.device == "cpu", rows)


if __name__ == "__main__":
    main()
