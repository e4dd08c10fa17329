"""Writing a checkpoint atomically: into a staging folder, then the manifest, then one rename."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hf_lowmem.checkpoint.manifest import _fsync_dir, write_manifest
from hf_lowmem.errors import CheckpointError
from hf_lowmem.signals import OWNER_FILE, owner_alive, read_owner, write_owner

logger = logging.getLogger("hf_lowmem")

STAGING_DIR = ".hf_lowmem-staging"


def _barrier(trainer: Any) -> None:
    if int(getattr(trainer.args, "world_size", 1) or 1) > 1:
        trainer.accelerator.wait_for_everyone()


def clean_staging(run_dir: str | os.PathLike) -> list[str]:
    """Remove the partial checkpoints an interrupted run left in ``run_dir`` (unless a live process of this
    host owns them). Returns the removed names."""
    root = Path(run_dir) / STAGING_DIR
    if not root.is_dir():
        return []
    owner = read_owner(root)
    if owner_alive(owner) and owner.get("pid") != os.getpid():
        logger.warning("hf-lowmem: %s belongs to process %s, which still runs: another run writes checkpoints into "
                       "this output_dir", root, owner.get("pid"))
        return []
    names = sorted(p.name for p in root.iterdir() if p.name != OWNER_FILE)
    shutil.rmtree(root, ignore_errors=True)
    if names:
        logger.warning("hf-lowmem: removed partial checkpoint(s) %s that an interrupted save left in %s",
                       ", ".join(names), run_dir)
    return names


def describe_write_error(exc: BaseException, folder: str | os.PathLike) -> str:
    """One line for an error raised while writing into ``folder``: a full disk or a file-size limit is
    named as such, with the free space."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {getattr(x, "errno", None) for x in chain}
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    free = _free_bytes(folder)
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or "os error 28" in text or \
            "quota" in text.lower() or (free is not None and free < (16 << 20)):
        return f"the disk holding {str(folder)!r} is full ({_mb(free)} free); free some space or write elsewhere"
    if errno.EFBIG in codes or "File too large" in text:
        return f"a file in {str(folder)!r} hit the file-size limit (EFBIG: `ulimit -f`, or the file system's)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _free_bytes(folder: str | os.PathLike) -> int | None:
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def save_atomically(trainer: Any, model: Any, trial: Any, save) -> str:
    """Run the Trainer's ``save(model, trial)`` into the staging folder, add the manifest, rename the
    folder into place and rotate old checkpoints. Returns the final path."""
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    run_dir = Path(trainer._get_output_dir(trial))
    name = f"checkpoint-{trainer.state.global_step}"
    root, final = run_dir / STAGING_DIR, run_dir / name
    staged = root / name
    main = bool(args.should_save)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        owner = read_owner(root)
        if not owner or owner.get("pid") != os.getpid():
            write_owner(root, "hf-lowmem checkpoints being written")
        if staged.exists():
            shutil.rmtree(staged)
    _barrier(trainer)
    try:
        trainer._lowmem_staging = str(root)
        try:
            save(model, trial)
        finally:
            trainer._lowmem_staging = None
        _barrier(trainer)
        _fix_best_checkpoint(trainer, root, run_dir)
        if main:
            if trainer.state.best_model_checkpoint and (staged / "trainer_state.json").is_file():
                trainer.state.save_to_json(str(staged / "trainer_state.json"))
            write_manifest(staged, trainer)
            _publish(staged, final)
            _drop_if_empty(root)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
    except BaseException as e:
        reason = describe_write_error(e, run_dir) if isinstance(e, Exception) else None
        if main:
            shutil.rmtree(staged, ignore_errors=True)
            _drop_if_empty(root)
        if reason is None or isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"writing {name} into {str(run_dir)!r} failed: {reason}. The earlier checkpoints are "
                              "untouched") from e
    _barrier(trainer)
    trainer._lowmem_last_checkpoint = str(final)
    return str(final)


def _drop_if_empty(root: Path) -> None:
    """Remove the staging folder once it holds nothing but its owner marker."""
    try:
        if not any(p.name != OWNER_FILE for p in root.iterdir()):
            shutil.rmtree(root, ignore_errors=True)
    except OSError:
        pass


def _fix_best_checkpoint(trainer: Any, root: Path, run_dir: Path) -> None:
    """The Trainer looked for the best checkpoint in the staging folder: point it at the real one."""
    best = trainer.state.best_model_checkpoint
    if best and Path(best).parent == root:
        trainer.state.best_model_checkpoint = str(run_dir / Path(best).name)


def _publish(staged: Path, final: Path) -> None:
    trash = None
    if final.exists():  # a checkpoint of the same step (a re-run in this folder): replaced only now
        trash = final.parent / f"{STAGING_DIR}-old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
