"""Random generators that plugins own (stochastic rounding), saved in checkpoints and restored on resume."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_lowmem")

RNG_NAME = "hf_lowmem_rng.pt"
_RNG_KEY = "hf_lowmem.checkpoint.rng"


def register_rng(ctx: Any, name: str, generator: Any) -> None:
    """Save ``generator`` (a ``torch.Generator``, CPU or CUDA, or anything with ``get_state() -> Tensor``
    and ``set_state(Tensor)``) in every checkpoint, and restore it on resume. Register it after seeding
    it: a state read from the checkpoint being resumed is applied at once (or when it is registered, if
    that is later than the start of ``train()``)."""
    if not (callable(getattr(generator, "get_state", None)) and callable(getattr(generator, "set_state", None))):
        raise TypeError(f"register_rng({name!r}) needs an object with get_state()/set_state(), got {type(generator).__name__}")
    slot = ctx.state.setdefault(_RNG_KEY, {"rng": {}, "pending": {}})
    slot["rng"][name] = generator
    pending = slot["pending"].pop(name, None)
    if pending is not None:
        generator.set_state(pending)


def registered_rngs(ctx: Any) -> dict[str, Any]:
    return dict((ctx.state.get(_RNG_KEY) or {}).get("rng") or {})


def rng_file(process_index: int = 0, world_size: int = 1) -> str:
    return RNG_NAME if world_size <= 1 else RNG_NAME.replace(".pt", f"_{process_index}.pt")


def save_rng(ctx: Any, folder: str | os.PathLike, process_index: int = 0, world_size: int = 1) -> None:
    gens = registered_rngs(ctx)
    if not gens:
        return
    import torch

    states = {name: g.get_state() for name, g in gens.items()}
    torch.save(states, os.path.join(folder, rng_file(process_index, world_size)))


def load_rng(ctx: Any, folder: str | os.PathLike, process_index: int = 0, world_size: int = 1,
             expected: list[str] | None = None) -> list[str]:
    """Restore registered generators from a checkpoint (later registrations get theirs on registration)."""
    path = Path(folder) / rng_file(process_index, world_size)
    if not path.is_file():
        if expected:
            logger.warning("hf-lowmem: %s has no %s for %s; their random streams restart", folder, path.name, expected)
        return []
    import torch

    states = torch.load(path, map_location="cpu", weights_only=True)
    slot = ctx.state.setdefault(_RNG_KEY, {"rng": {}, "pending": {}})
    for name, state in states.items():
        if name in slot["rng"]:
            slot["rng"][name].set_state(state)
        else:
            slot["pending"][name] = state
    return sorted(states)
