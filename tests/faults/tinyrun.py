"""A tiny LowMemTrainer run shared by the fault tests, in process and as a subprocess that a test can
signal or kill at a chosen point.

    python -m tests.faults.tinyrun --out DIR --log LOSSES.jsonl [--hold step:3|save:4] [--wait signal|forever]
                                   [--temp-parent DIR]

``--hold step:N`` stops inside step N (at its beginning), ``--hold save:N`` inside the checkpoint of step
N (after the weights are written, before the optimizer), writes ``DIR.hold`` and waits: with
``--wait signal`` until a signal reaches the run (then it goes on), with ``--wait forever`` until it is
killed. When the first signal arrives it writes ``DIR.got``; ``DIR.release`` ends a ``--wait signal`` hold
too (the rank of a multi-process run that no signal reaches). Under several processes rank R > 0 writes
``DIR.hold.R``; a marker holds the process id. ``--temp-parent`` makes a temporary folder
there through :func:`hf_lowmem.signals.make_temp_dir`, as a plugin that owns temporary files would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

MAX_STEPS = 6


def snapshot(root: str | os.PathLike) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes: equal snapshots mean nothing changed."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def build(out: str | os.PathLike, *, max_steps: int = MAX_STEPS, save_steps: int = 2, callbacks=(), plugin_host=None,
          model=None, **kw):
    from hf_lowmem import LowMemTrainer
    from tests.tiny import RandomTokens, tiny_model, train_args

    base = {"lowmem_optimizer": "adamw", "save_strategy": "steps", "save_steps": save_steps, "max_steps": max_steps}
    base.update(kw)
    return LowMemTrainer(model=model if model is not None else tiny_model(), args=train_args(out, **base),
                         train_dataset=RandomTokens(n=64, seq=16), callbacks=list(callbacks), plugin_host=plugin_host)


def loss_logger(path: str | os.PathLike):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    return LossLog()


def rng_owner(draws: dict):
    """A fake owner of a stochastic-rounding generator: seeds it at the start of training, registers it
    with :func:`hf_lowmem.checkpoint.register_rng`, and draws one number per step into ``draws``."""
    import torch
    from transformers import TrainerCallback

    from hf_lowmem.checkpoint import register_rng

    class RngOwner(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.gen = None

        def on_train_begin(self, args, state, control, **kw):
            self.gen = torch.Generator().manual_seed(1234)
            register_rng(self.trainer.lowmem_ctx, "fake-rounding", self.gen)

        def on_step_end(self, args, state, control, **kw):
            draws[state.global_step] = torch.rand(1, generator=self.gen).item()

    return RngOwner()


def read_losses(path: str | os.PathLike) -> dict[int, float]:
    if not Path(path).is_file():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, Path(path).read_text().splitlines())}


def _hold(trainer, marker: Path, wait: str) -> None:
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:
        marker = marker.with_name(f"{marker.name}.{rank}")
    marker.write_text(f"{os.getpid()}\n")
    got, release = marker.with_suffix(".got"), marker.parent / (marker.name.split(".hold")[0] + ".release")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if trainer._lowmem_stopper.received and not got.exists():
            got.write_text("signal received\n")
            if wait == "signal":
                return
        if wait == "signal" and release.exists():
            return
        time.sleep(0.02)
    raise SystemExit("tinyrun: held for 300 s and nothing came")


def main(argv=None) -> int:
    from transformers import TrainerCallback

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--hold", default="")
    p.add_argument("--wait", default="signal", choices=("signal", "forever"))
    p.add_argument("--temp-parent", default="")
    a = p.parse_args(argv)
    where, _, at = a.hold.partition(":")
    marker = Path(a.out + ".hold")

    class Hold(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if a.temp_parent:
                from hf_lowmem.signals import make_temp_dir

                tmp = make_temp_dir(a.temp_parent, prefix="fake-owner-")
                (tmp / "activations.bin").write_bytes(b"x" * 4096)

        def on_step_begin(self, args, state, control, **kw):
            if where == "step" and state.global_step == int(at) - 1:
                _hold(trainer, marker, a.wait)

    trainer = build(a.out, callbacks=[loss_logger(a.log), Hold()])
    if where == "save":
        inner = trainer._save_optimizer_and_scheduler

        def held_save(output_dir):  # the weights are written, the optimizer not yet
            if trainer.state.global_step == int(at):
                _hold(trainer, marker, a.wait)
            return inner(output_dir)

        trainer._save_optimizer_and_scheduler = held_save
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
