"""Pieces the benchmark scripts share. Imported by scripts run as ``python bench/NAME.py`` (their folder is
on ``sys.path``); nothing here imports torch or transformers at import time."""

from __future__ import annotations

import os
import time


def one_gpu() -> None:
    """Run a one-GPU benchmark on the first GPU (unless ``CUDA_VISIBLE_DEVICES`` says otherwise): with several
    GPUs visible, the Trainer of a single process would use ``torch.nn.DataParallel`` over all of them.
    Call before torch initialises CUDA; child processes inherit it."""
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")


def random_tokens(vocab: int, seq: int, n: int = 100_000):
    """A dataset of ``n`` random token blocks; example ``i`` is seeded with ``i``, the same in every run."""
    import torch

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, vocab, (seq,), generator=g)
            return {"input_ids": ids, "labels": ids.clone()}

    return RandomTokens()


def step_timer(cuda: bool):
    """A ``TrainerCallback`` that appends each optimizer step's wall time to ``.times`` (CUDA-synchronised
    at both ends when ``cuda``)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def write_rows(path: str | None, command: str, smoke: bool, rows: list[dict]) -> None:
    """Write a benchmark's rows with the command that made them (``{"command", "smoke", "rows"}``); called after
    every run, so that a command killed from outside keeps what it measured."""
    import json

    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"command": command, "smoke": smoke, "rows": rows}, f, indent=2)
