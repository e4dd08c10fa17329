"""Picking the checkpoint to resume from, and verifying it before training starts."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from hf_lowmem.checkpoint.atomic import clean_staging
from hf_lowmem.checkpoint.manifest import (
    MANIFEST_NAME,
    _chunk_checksum,
    file_digest,
    hashing_enabled,
    plugin_record,
    read_manifest,
    selection_difference,
    versions,
)
from hf_lowmem.checkpoint.rng import load_rng
from hf_lowmem.errors import CheckpointError

logger = logging.getLogger("hf_lowmem")

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_MISSING_MEANS = {"optimizer.pt": "a fresh optimizer", "scheduler.pt": "a fresh learning-rate schedule",
                  "trainer_state.json": "step 0", "scaler.pt": "a fresh loss scaler"}


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir``, newest (largest N) first."""
    run_dir = Path(run_dir)
    try:
        found = [(int(m.group(1)), p) for p in run_dir.iterdir()
                 if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    except OSError:
        return []
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def find_resumable(run_dir: str | os.PathLike) -> str:
    """The checkpoint ``resume_from_checkpoint=True`` resumes: the newest with a manifest, or, when none has
    one (a plain Trainer's folder), the newest one, with a warning."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"resume_from_checkpoint=True found no checkpoint-N folder in {str(run_dir)!r}; "
                              "give the checkpoint's path, or drop resume_from_checkpoint to start a new run")
    complete = [p for p in found if (p / MANIFEST_NAME).is_file()]
    if complete:
        skipped = [p.name for p in found if p not in complete and _step(p) > _step(complete[0])]
        if skipped:
            logger.warning("hf-lowmem: skipping %s: no manifest, so not known to be complete (an interrupted save, "
                           "or written by another trainer); resuming from %s", ", ".join(skipped), complete[0].name)
        return str(complete[0])
    usable = [p for p in found if not (p / "checkpoint-is-incomplete.txt").exists()]
    if not usable:
        raise CheckpointError(f"every checkpoint in {str(run_dir)!r} is marked incomplete; start a new run")
    return str(usable[0])


def _step(path: Path) -> int:
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def _earlier(path: Path) -> str:
    older = [p for p in list_checkpoints(path.parent) if _step(p) < _step(path) and (p / MANIFEST_NAME).is_file()]
    return f"resume_from_checkpoint={str(older[0])!r}" if older else "start a new run"


def verify(path: str | os.PathLike, trainer: Any) -> dict[str, Any] | None:
    """Check a checkpoint before resuming from it; raise :class:`CheckpointError` naming what is wrong.
    Returns its manifest (``None`` for a checkpoint written without one, which gets a warning)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {str(path)!r}; pass a checkpoint-N folder, or "
                              "resume_from_checkpoint=True to take the newest complete one in output_dir")
    manifest = read_manifest(folder)
    if manifest is None:
        _verify_legacy(folder, trainer)
        return None
    files = manifest["files"]
    missing = [rel for rel in files if not (folder / rel).is_file()]
    if missing:
        means = next((_MISSING_MEANS[m] for m in missing if m in _MISSING_MEANS), "defaults in place of what is missing")
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: {', '.join(missing[:4])} missing (its "
                              f"manifest lists {'it' if len(missing) == 1 else 'them'}); resuming would silently "
                              f"start from {means}. Restore the file(s), or {_earlier(folder)}")
    algorithm = manifest.get("hash")
    check_hash = hashing_enabled() and algorithm is not None
    if check_hash and _chunk_checksum(algorithm) is None:
        logger.warning("hf-lowmem: %s was checksummed with %s, which this machine cannot compute (pip install "
                       "xxhash); checking file sizes only", folder.name, algorithm)
        check_hash = False
    t0 = time.perf_counter()
    for rel, meta in files.items():
        p = folder / rel
        size = p.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"checkpoint {str(folder)!r} is damaged: {rel} has {size} bytes, {meta.get('size')} "
                                  f"were written; {_earlier(folder)}")
        if check_hash and meta.get("hash") and file_digest(p, algorithm=algorithm) != meta["hash"]:
            raise CheckpointError(f"checkpoint {str(folder)!r} is damaged: {rel} does not match the checksum written "
                                  f"with it (a flipped bit, or the file was changed); {_earlier(folder)}")
    if check_hash:
        logger.info("hf-lowmem: verified %s (%d files) in %.2f s", folder, len(files), time.perf_counter() - t0)
    refusal, notes = selection_difference(manifest.get("plugins") or {}, plugin_record(trainer))
    if refusal:
        raise CheckpointError(f"cannot resume from {str(folder)!r}: {refusal}, or start a new run in another output_dir")
    for note in notes:
        logger.info("hf-lowmem: resuming %s: %s", folder.name, note)
    now = versions()
    changed = {k: (v, now.get(k)) for k, v in (manifest.get("versions") or {}).items() if now.get(k) != v}
    if changed:
        logger.warning("hf-lowmem: resuming %s with other library versions than it was written with: %s", folder.name,
                       ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    if manifest.get("save_only_model"):
        logger.warning("hf-lowmem: %s holds the weights only (save_only_model=True): optimizer and schedule start "
                       "fresh", folder.name)
    return manifest


def _verify_legacy(folder: Path, trainer: Any) -> None:
    names = {p.name for p in folder.iterdir()}
    if "checkpoint-is-incomplete.txt" in names:
        raise CheckpointError(f"checkpoint {str(folder)!r} is marked incomplete (checkpoint-is-incomplete.txt); "
                              f"{_earlier(folder)}")
    engine_states = any(n.startswith(("global_step", "optimizer_", "pytorch_model_fsdp")) for n in names)
    if "trainer_state.json" in names and "optimizer.pt" not in names and not engine_states:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no optimizer.pt: resuming would silently start a fresh "
                              "optimizer. Restore the file, or start a new run from its weights "
                              f"(AutoModelForCausalLM.from_pretrained({str(folder)!r}))")
    logger.warning("hf-lowmem: %s has no %s (written by a plain Trainer or an older hf-lowmem): its files and plugins "
                   "are not verified", folder, MANIFEST_NAME)


def prepare_resume(trainer: Any, resume: Any, trial: Any = None) -> str | None:
    """Before ``train()``: remove partial checkpoints of an interrupted run, resolve ``True`` to the newest
    complete checkpoint, verify it, and read the registered generators' states. Returns the path."""
    run_dir = trainer._get_output_dir(trial)
    if trainer.args.should_save:
        clean_staging(run_dir)
    if resume is None or resume is False:
        return None
    path = find_resumable(run_dir) if resume is True else os.fspath(resume)
    manifest = verify(path, trainer)
    load_rng(trainer.lowmem_ctx, path, trainer.args.process_index, trainer.args.world_size,
             expected=(manifest or {}).get("rng"))
    return path
